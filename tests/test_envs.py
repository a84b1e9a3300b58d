"""The conda environments (envs/) agree with pyproject.toml, and CPU stages never need torch."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GPU_ONLY = {"torch", "torchvision", "timm", "segment-anything", "mobilesam-mirror"}
WORKFLOW_ONLY = {"snakemake", "snakemake-executor-plugin-slurm"}  # the scheduler's, not the jobs'


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0].lower()


def pip_pins(env_file: str) -> dict[str, str]:
    env = yaml.safe_load((REPO / "envs" / env_file).read_text())
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert "python=3.11" in env["dependencies"]
    return {name_of(r): r for r in pip}


def project_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {name_of(r): r for r in project["dependencies"]}


def test_env_pins_match_pyproject():
    project = project_pins()
    gpu, cpu = pip_pins("gpu.yaml"), pip_pins("cpu.yaml")
    assert set(gpu) == set(project) - WORKFLOW_ONLY
    assert set(cpu) == set(project) - WORKFLOW_ONLY - GPU_ONLY
    for env in (gpu, cpu):
        for name, requirement in env.items():
            assert requirement.replace(" ", "") == project[name].replace(" ", ""), name


def rule_envs() -> dict[str, str]:
    """rule name -> conda env file it declares."""
    envs = {}
    for smk in (REPO / "rules").glob("*.smk"):
        rule = None
        for line in smk.read_text().splitlines():
            if m := re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", line):
                rule = m.group(1)
            elif m := re.match(r"\s+conda:\s*$", line):
                envs[rule] = "pending"
            elif rule and envs.get(rule) == "pending" and (m := re.search(r'"\.\./envs/(\w+)\.yaml"', line)):
                envs[rule] = m.group(1)
    return envs


GPU_RULES = {"segment_shard", "segment", "pretrain", "finetune", "embed_shard", "embed", "embed_patches_shard",
             "embed_patches"}


def test_every_script_rule_declares_an_environment():
    envs = rule_envs()
    scripted = set()
    for smk in (REPO / "rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) )", text):
            m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
            if m and "script:" in block:
                scripted.add(m.group(1))
    assert scripted and scripted <= set(envs), scripted - set(envs)
    for rule in scripted:
        assert envs[rule] == ("gpu" if rule in GPU_RULES else "cpu"), rule


def script_envs() -> dict[str, str]:
    """scripts/<name>.py -> the env of the rules that run it."""
    out = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) )", smk.read_text()):
            m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block)
            script = re.search(r'"\.\./scripts/(\w+\.py)"', block)
            if m and script:
                out[script.group(1)] = "gpu" if m.group(1) in GPU_RULES else "cpu"
    return out


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("*.py")))
def test_cpu_scripts_import_without_torch(script):
    """The CPU environment has no torch: a CPU stage's script must import without it."""
    if script_envs().get(script) != "cpu":
        pytest.skip(f"{script} runs in the GPU environment")
    block = ("import sys\n"
             "class NotInTheCpuEnv:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):\n"
             "            raise ImportError(name + ' is not in the CPU environment')\n"
             "sys.meta_path.insert(0, NotInTheCpuEnv())\n")
    source = (REPO / "scripts" / script).read_text()
    imports = "\n".join(ast.get_source_segment(source, node) for node in ast.parse(source).body
                        if isinstance(node, (ast.Import, ast.ImportFrom)))  # multi-line imports too
    proc = subprocess.run([sys.executable, "-c", block + imports], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
