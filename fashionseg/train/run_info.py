"""run_info.json: what a run directory records about how it was made (git commit, versions,
layout, command), so a result can be traced back and rebuilt."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "accelerate", "webdataset", "pycocotools", "numpy", "deepspeed", "transformers",
            "pydantic", "fashionseg")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    from importlib import metadata
    found: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
    return found


def run_info(accelerator, argv: list[str], batch_sizes: list[int]) -> dict[str, Any]:
    return {
        "git_commit": git_commit(), "versions": versions(), "python": platform.python_version(),
        "hostname": socket.gethostname(), "command": list(argv), "cwd": os.getcwd(),
        "world_size": accelerator.num_processes, "batch_sizes": batch_sizes,
        "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
