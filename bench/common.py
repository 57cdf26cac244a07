"""Shared helpers for benchmarks: machine description and writing results under bench/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info.update(code_version())
    return info


def code_version() -> dict:
    """The commit the benchmark ran from (and whether the tree had changes beyond it), where git knows."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "../src"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def write_result(name: str, device: torch.device, payload: dict) -> Path:
    """Write ``bench/results/<name>_<device type>.json`` with the machine info and a timestamp."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device.type}.json"
    record = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(device), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
