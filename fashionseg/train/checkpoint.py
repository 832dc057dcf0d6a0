"""Checkpoints made of stateful parts, complete, atomic and step-exact.

A checkpoint is a folder `RUN_DIR/checkpoints/step_NNNNNNNN/` holding `trainer.pth`:
`{"format", "version", "step", "meta": {...}, "parts": {name: part.state_dict()},
"ranks": [{"rank": r, name: part.state_dict()} per rank]}`. `parts` are the shared ones (model, optimizer,
schedule, scaler, trainer counters; rank 0 writes them), `ranks` the per-rank ones (loader
position, hard miner, RNG; gathered to rank 0) - torchtitan's `states={...}` pattern. Under
DeepSpeed the sharded model/optimizer go to `ds/` beside it through accelerate's `save_state`.

The folder is written under a temporary name and renamed into place, so a folder with a final
name is always complete; a run killed mid-write leaves the previous checkpoint as the latest.
Everything loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from fashionseg.io import atomic_open

CKPT_DIR = "checkpoints"
TRAINER_FILE = "trainer.pth"
DS_DIR = "ds"
FORMAT = "fashionseg-checkpoint"
VERSION = 2
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run (the message says why)."""


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


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


def read(path: str | Path) -> dict[str, Any]:
    """`trainer.pth` of a checkpoint folder (or the file itself), checked for format and version."""
    path = Path(path)
    file = path / TRAINER_FILE if path.is_dir() else path
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"{file}: cannot read the checkpoint ({e}); delete this folder to resume from the one before") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a fashionseg checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format version {state.get('version')} was written by an older fashionseg (this one reads "
            f"version {VERSION}, made of stateful parts). Resume it with the fashionseg that wrote it (run_info.json has its "
            f"git commit), or start a new run from its weights: `fashionseg average {file.parent.parent.parent} --last 1` "
            "writes them as a weights file for model.pretrained")
    return state


def load_parts(parts: Mapping[str, Stateful | None], states: Mapping[str, Any], where: str,
               optional: tuple[str, ...] = ("scaler",)) -> None:
    """part.load_state_dict(states[name]) for every part that exists in this run. An `optional`
    part without a saved state starts fresh (e.g. the GradScaler of a run resumed in fp16)."""
    for name, part in parts.items():
        if part is None:
            continue
        if name not in states or states[name] is None:
            if name in optional:
                continue
            raise CheckpointError(f"{where}: has no '{name}' state, which this run needs")
        part.load_state_dict(states[name])


def _states(parts: Mapping[str, Stateful | None]) -> dict[str, Any]:
    return {name: (part.state_dict() if part is not None else None) for name, part in parts.items()}


def save(run_dir: str | Path, step: int, accelerator, *, parts: Mapping[str, Stateful | None],
         rank_parts: Mapping[str, Stateful | None], meta: dict[str, Any], keep: int,
         external: Callable[[Path], None] | None = None) -> Path | None:
    """Write checkpoint `step` (collective: every rank calls it). `external(folder)` is a collective
    writer of parts kept outside trainer.pth (DeepSpeed's sharded states). Returns the folder on
    rank 0, None elsewhere."""
    from accelerate.utils import gather_object

    mine = {"rank": accelerator.process_index, **_states(rank_parts)}
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    root = Path(run_dir) / CKPT_DIR
    final, tmp = root / checkpoint_name(step), root / f".{checkpoint_name(step)}.tmp"
    main = accelerator.is_main_process
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if external is not None:
        external(tmp / DS_DIR)
        accelerator.wait_for_everyone()
    if main:
        payload = {"format": FORMAT, "version": VERSION, "step": step, "meta": meta, "parts": _states(parts), "ranks": ranks}
        with atomic_open(tmp / TRAINER_FILE, "wb") as f:
            torch.save(payload, f)
        if final.exists():  # the same step saved twice (e.g. interval and epoch end): keep the new one
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if main else None
