"""bench/gpu_check.sh in its CPU smoke mode: every code path of the GPU check, tiny sizes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("attmask_train:", "saghog_train:", "embed:", "torchrun_ddp: PASS", "resume: PASS", "total:")


def test_the_cpu_smoke_mode_runs_every_check_and_prints_every_figure():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--steps", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = proc.stdout[proc.stdout.index("== gpu_check summary"):].splitlines()
    for figure in FIGURES:
        assert any(line.startswith(figure) for line in summary), (figure, summary)
    assert "images/s" in summary[1] and "windows/s" in summary[3]
