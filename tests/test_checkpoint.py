"""Checkpoint files: parts round-trip, older formats are refused with a way forward, optional parts."""
from __future__ import annotations

import pytest
import torch

from fashionseg.train import checkpoint as ckpt_lib
from fashionseg.train.schedule import LRFactor, LRSchedule
from fashionseg.train.config import TrainConfig
from fashionseg.train.state import RNGState, TrainState


def test_version_1_checkpoints_are_refused_with_a_way_forward(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"
    folder.mkdir(parents=True)
    torch.save({"format": "fashionseg-checkpoint", "version": 1, "step": 3, "model": {}}, folder / "trainer.pth")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"version 1 was written by an older fashionseg.*fashionseg average"):
        ckpt_lib.read(folder)
    (folder / "trainer.pth").write_bytes(b"not a torch file")
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot read the checkpoint"):
        ckpt_lib.read(folder)


def test_parts_round_trip_and_optional_scaler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = LRSchedule(opt, 0.1, LRFactor(TrainConfig(max_steps=10, warmup_iters=4), 10, 4))
    for _ in range(3):
        sched.step()
    state, rng = TrainState(step=3, skipped_steps=1), RNGState()
    saved = {"schedule": sched.state_dict(), "trainer": state.state_dict(), "rng": rng.state_dict()}
    drawn = torch.rand(3)
    sched2 = LRSchedule(opt, 0.1, LRFactor(TrainConfig(max_steps=20, warmup_iters=4), 20, 4))
    state2 = TrainState()
    ckpt_lib.load_parts({"schedule": sched2, "trainer": state2, "rng": rng, "scaler": object()}, saved, "x")
    assert sched2.position == 3 and state2 == state and torch.equal(torch.rand(3), drawn)
    # the LR is recomputed from the current config at the saved position, not restored
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (0.001 * 0.25 + 0.75))
    with pytest.raises(ckpt_lib.CheckpointError, match="has no 'miner' state"):
        ckpt_lib.load_parts({"miner": state2}, saved, "ckpt")
