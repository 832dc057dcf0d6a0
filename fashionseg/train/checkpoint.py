"""Checkpoints that are complete, atomic and step-exact.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNNN/` holding `trainer.pth`: model,
optimizer, GradScaler and scheduler state, step, epoch, counters, and one entry per rank with that
rank's RNG states, loader position and hard-miner state (gathered to rank 0). Under DeepSpeed the
sharded model/optimizer state goes to `ds/` beside it (accelerate's save_state). The folder is
written under a temporary name and renamed into place, so a folder with a final name is always
complete; a run killed mid-write leaves the previous checkpoint as the latest.

Everything stored loads with `torch.load(weights_only=True)`: numpy's RNG state is kept as a
tensor, never as a pickled object.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionseg.io import atomic_open

CKPT_DIR = "checkpoints"
TRAINER_FILE = "trainer.pth"
DS_DIR = "ds"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- listing --------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """`trainer.pth` of a checkpoint folder (or the file itself), loaded with weights_only=True."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAINER_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise RuntimeError(f"{path}: cannot read the checkpoint ({e}); delete this folder to resume from the one before") from e


# -- writing --------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], accelerator, *,
                    keep: int, deepspeed: bool = False) -> Path | None:
    """Write checkpoint `step` (collective: every rank must call it). `state` is rank 0's payload
    and must already include the gathered per-rank entries. Returns the folder on rank 0."""
    root = Path(run_dir) / CKPT_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(str(tmp / DS_DIR))  # collective; each rank writes its shards
    accelerator.wait_for_everyone()
    if main:
        with atomic_open(tmp / TRAINER_FILE, "wb") as f:
            torch.save(state, f)
        if final.exists():  # the same step saved twice (e.g. interval and epoch end): keep the new one
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if main else None
