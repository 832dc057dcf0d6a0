"""The trainer's own stateful parts: its counters and this process's random generators.

Both follow the `state_dict()` / `load_state_dict()` protocol, like the model, optimizer, scaler,
schedule, loader and miner, so a checkpoint is just a dict of such parts (checkpoint.py).
Everything is stored as tensors or plain types, loadable with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Where the run is: optimizer steps taken (data steps, skipped ones included), skips, replays."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    replays: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


class RNGState:
    """This process's RNG states: python, numpy, torch CPU and every CUDA device."""

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
