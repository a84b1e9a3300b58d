"""Provenance of stage jobs: the facts of a run (device, GPU, package versions, threads, wall seconds),
merged per stage folder into settings.json, and summed per experiment path into its metrics row."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import numpy as np

PACKAGES = ("torch", "timm", "faiss-cpu", "numpy", "scikit-learn", "opencv-python-headless", "snakemake")


def package_versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_facts(device: str | None) -> dict:
    """The device a torch stage ran on ('cpu', 'cuda:0') and the GPU's name; CPU stages say cpu."""
    if device is None:
        return {"device": "cpu", "gpu": None}
    from .devices import resolve_device

    resolved = resolve_device(device)
    gpu = None
    if resolved.type == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(resolved)
    return {"device": str(resolved), "gpu": gpu}


def run_facts(device: str | None, threads: int, seconds: float) -> dict:
    return {**device_facts(device), "threads": int(threads), "seconds": float(seconds), "jobs": 1,
            "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "versions": package_versions()}


def merge_runs(runs: list[dict]) -> dict:
    """One stage folder's run facts from its jobs': seconds summed, devices and GPUs listed."""
    if not runs:
        return {"seconds": 0.0, "jobs": 0}
    return {"seconds": float(sum(r["seconds"] for r in runs)), "jobs": int(sum(r.get("jobs", 1) for r in runs)),
            "device": ", ".join(sorted({r["device"] for r in runs})),
            "gpu": ", ".join(sorted({r["gpu"] for r in runs if r.get("gpu")})) or None,
            "threads": max(r["threads"] for r in runs), "host": ", ".join(sorted({r["host"] for r in runs})),
            "python": runs[0]["python"], "cpus": runs[0]["cpus"], "versions": runs[0]["versions"]}


def read_runs(paths) -> list[dict]:
    return [json.loads(open(p).read()) for p in paths]


def path_columns(settings_paths, stages) -> dict:
    """Metrics-row columns of an experiment's path: seconds_<stage> (NaN where the path skips the stage)
    and device (the devices of its stages, GPU names included)."""
    records = [json.loads(open(p).read()) for p in settings_paths]
    columns = {f"seconds_{s}": float("nan") for s in stages}
    devices = set()
    for record in records:
        key, run = f"seconds_{record['stage']}", record["run"]
        columns[key] = np.nansum([columns[key], run["seconds"]])  # a stage met twice on the path adds up
        devices.add(f"{run['device']} ({run['gpu']})" if run.get("gpu") else run.get("device", "cpu"))
    columns["device"] = ", ".join(sorted(devices - {"cpu"}) or ["cpu"])
    return columns
