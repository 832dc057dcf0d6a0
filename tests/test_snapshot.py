"""Snapshot ensembles: the cosine_restarts LR curve, snapshots written at the cycle ends by the real
trainer, a resume across a cycle end that neither loses nor rewrites a snapshot, and the snapshots
evaluated as an ensemble."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fashionseg.train import config as config_lib
from fashionseg.train.config import ConfigError
from fashionseg.train.schedule import LRFactor
from train_utils import ROOT, assert_identical, final_weights, metrics, run, train_cmd


def _factor(steps: int, cycles: int, warmup: int, **extra) -> LRFactor:
    over = ["train.schedule=cosine_restarts", f"train.cycles={cycles}", f"train.max_steps={steps}",
            f"train.warmup_iters={warmup}", *(f"train.{k}={v}" for k, v in extra.items())]
    return LRFactor(config_lib.load(None, over).train, steps, warmup)


def test_cosine_restarts_curve():
    f = _factor(110, 4, 10, min_lr_factor=0.1)  # warmup 10, then 4 cycles of 25 steps
    assert f.cycle_ends() == [35, 60, 85, 110]
    assert f(0) == pytest.approx(0.001) and f(5) == pytest.approx(0.001 * 0.5 + 0.5)  # torchvision's warmup, as today
    for start, end in [(10, 35), (35, 60), (60, 85), (85, 110)]:
        assert f(start) == 1.0  # the step after a cycle end starts at the peak again
        curve = [f(p) for p in range(start, end)]
        assert all(a > b for a, b in zip(curve, curve[1:]))  # falls within the cycle
        mid = (start + end) // 2
        assert f(mid) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (mid - start) / (end - start))))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # the run's end (and past it): the floor
    # a pure function of the position: any order, any instance, the same values
    g = _factor(110, 4, 10, min_lr_factor=0.1)
    positions = list(range(0, 120))
    assert [f(p) for p in reversed(positions)] == [g(p) for p in reversed(positions)]
    # one cycle is today's cosine
    one, cos = _factor(100, 1, 10), LRFactor(config_lib.load(None, ["train.schedule=cosine"]).train, 100, 10)
    assert [one(p) for p in range(101)] == [cos(p) for p in range(101)]
    # cycles that do not divide the run: ends on integer positions, the last one the run's end
    assert _factor(17, 3, 0).cycle_ends() == [5, 11, 17]


def test_cycles_are_validated():
    with pytest.raises(ConfigError, match="train.cycles must be >= 1"):
        config_lib.load(None, ["train.schedule=cosine_restarts", "train.cycles=0"])
    with pytest.raises(ConfigError, match="train.cycles=3 has no effect with train.schedule=cosine"):
        config_lib.load(None, ["train.schedule=cosine", "train.cycles=3"])
    with pytest.raises(ConfigError, match="train.cycles=8 leaves less than one step per cycle"):
        config_lib.load(None, ["train.schedule=cosine_restarts", "train.cycles=8", "train.max_steps=10",
                               "train.warmup_iters=3"])
    # a run length known only at start (epochs, default warmup): refused there, naming the key
    t = config_lib.load(None, ["train.schedule=cosine_restarts", "train.cycles=8", "train.max_steps=null",
                               "train.epochs=1"]).train
    with pytest.raises(ConfigError, match="train.cycles=8 leaves less than one step per cycle"):
        LRFactor(t, 10, 3)


def test_schedule_command_names_the_snapshot_steps(capsys):
    from fashionseg.cli import main
    assert main(["schedule", "--config", str(ROOT / "configs" / "debug.yaml"),
                 "--steps-per-epoch", "9", "train.schedule=cosine_restarts", "train.cycles=3", "train.max_steps=40"]) == 0
    out = capsys.readouterr().out
    assert "3 cycles; a snapshot after steps 20, 30, 40" in out  # warmup 10, then 3 cycles of 10


# -- through the real trainer ---------------------------------------------------------------------
RESTARTS = ["train.schedule=cosine_restarts", "train.cycles=3", "train.max_steps=6", "train.warmup_iters=0",
            "train.checkpoint_every=1", "train.keep_checkpoints=10"]


@pytest.fixture(scope="module")
def restarts_run(synth_shards, tmp_path_factory):
    """3 cycles of 2 steps, a checkpoint after every step (debug config, 9 steps per epoch)."""
    out = tmp_path_factory.mktemp("restarts") / "run"
    run(train_cmd(synth_shards, out, *RESTARTS))
    return out


def _snapshot(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_snapshots_at_cycle_ends(restarts_run):
    snaps = restarts_run / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["cycle_1.pth", "cycle_2.pth", "cycle_3.pth"]
    for k, step in [(1, 2), (2, 4), (3, 6)]:
        snap = _snapshot(snaps / f"cycle_{k}.pth")
        assert snap["snapshot"] == {"cycle": k, "cycles": 3, "step": step, "position": step}
        ckpt = torch.load(restarts_run / "checkpoints" / f"step_{step:08d}" / "trainer.pth", weights_only=True)
        assert_identical(snap["model"], ckpt["parts"]["model"])  # the weights after that step, exactly
        assert snap["categories"] and snap["config"]["train"]["cycles"] == 3
    assert_identical(_snapshot(snaps / "cycle_3.pth")["model"], final_weights(restarts_run))
    lr = [r["lr"] for r in metrics(restarts_run)]  # logged after each step's update
    peak = max(lr)
    assert lr == pytest.approx([0.5 * peak, peak, 0.5 * peak, peak, 0.5 * peak, 0.0], abs=1e-12)


@pytest.mark.slow
def test_resume_across_a_cycle_end_keeps_every_snapshot_once(restarts_run, synth_shards, tmp_path):
    """What a kill right after step 2's checkpoint leaves (cycle 1 written, nothing after it),
    resumed: cycle 1 is not written again, cycles 2 and 3 are, equal to the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(restarts_run, resumed)
    for ckpt in (resumed / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > 2:
            shutil.rmtree(ckpt)
    for name in ("snapshots/cycle_2.pth", "snapshots/cycle_3.pth", "model_final.pth"):
        (resumed / name).unlink()
    first = (resumed / "snapshots" / "cycle_1.pth").stat()
    run(train_cmd(synth_shards, resumed, *RESTARTS, "--resume"))
    again = (resumed / "snapshots" / "cycle_1.pth").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
    for k in (1, 2, 3):
        assert_identical(_snapshot(resumed / "snapshots" / f"cycle_{k}.pth")["model"],
                         _snapshot(restarts_run / "snapshots" / f"cycle_{k}.pth")["model"])
    assert sorted(p.name for p in (resumed / "snapshots").iterdir()) == ["cycle_1.pth", "cycle_2.pth", "cycle_3.pth"]
    assert [r["lr"] for r in metrics(resumed)] == [r["lr"] for r in metrics(restarts_run)]


@pytest.mark.slow
def test_snapshots_evaluate_as_an_ensemble(restarts_run, synth_shards, tmp_path):
    from fashionseg.cli import main
    snaps = [str(restarts_run / "snapshots" / f"cycle_{k}.pth") for k in (1, 2, 3)]
    out = tmp_path / "ens.json"
    assert main(["eval", "--weights", *snaps, "--shards", str(synth_shards), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--no-iou-f1"]) == 0
    m = json.loads(out.read_text())
    assert m["weights"] == snaps and m["num_images"] == 6 and 0.0 <= m["segm"]["AP"] <= 1.0
    # with TTA: every snapshot x every variant
    assert main(["eval", "--weights", *snaps[1:], "--shards", str(synth_shards), "--out", str(out), "--device", "cpu",
                 "--no-progress", "--no-iou-f1", "--tta", "--tta-scales", "1.0", "--max-images", "2"]) == 0
    m = json.loads(out.read_text())
    assert m["tta_scales"] == [1.0] and m["num_images"] == 2 and 0.0 <= m["segm"]["AP"] <= 1.0
