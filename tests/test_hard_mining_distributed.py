"""Hard mining under real two-process DDP (accelerate launch, gloo on CPU).

1. The miner's protocol in a small DDP run (tests/hard_mining_ddp_worker.py): both ranks replay at
   exactly the same steps (each its own batch, a rank whose batches all exceed the ceiling replays
   a fallback), finish with identical weights, and a resume across a replay is step-exact.
2. The same through the real trainer (`-m fashionseg.train`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from train_utils import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("hard_mining_ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")



def launch(args: list[str], timeout: int = 240) -> None:
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def read_run(out: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return logs, weights


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


WORKER_ARGS = ["--steps", "9", "--every", "2", "--warmup", "1", "--max-loss", "20"]


@pytest.fixture(scope="module", params=["batch", "image"])
def uninterrupted(request, tmp_path_factory) -> tuple[str, Path]:
    """(hard_mining.unit, the run's output folder)."""
    out = tmp_path_factory.mktemp(f"hm_full_{request.param}")
    launch([str(WORKER), str(out), *WORKER_ARGS, "--unit", request.param])
    return request.param, out


def test_both_ranks_replay_at_the_same_steps_with_identical_weights(uninterrupted):
    unit, out = uninterrupted
    logs, weights = read_run(out)
    steps = [[r["step"] for r in log["replays"]] for log in logs]
    assert steps[0] == steps[1] == [3, 5, 7, 9]   # warmup 1, every 2: windows (1,3], (3,5], ...
    # each rank replays its own batches (rank-local mining) of its own batch size, from its own window
    for rank, log in enumerate(logs):
        for r in log["replays"]:
            assert len(r["keys"]) == 2 + rank
            assert all(k.startswith(f"r{rank}_") for k in r["keys"])
            mined_steps = [int(k.split("_")[1][1:]) for k in r["keys"]]
            assert r["fallback"] or all(r["step"] - 2 < s <= r["step"] for s in mined_steps)
            if unit == "image":  # the hardest images: not necessarily one batch's, hardest first
                assert len(set(r["keys"])) == len(r["keys"])
    # the ceiling rejected rank 1's samples at least once and it still replayed (fallback)
    assert logs[1]["stats"]["skipped_above_max"] > 0
    assert logs[0]["stats"]["replays"] == logs[1]["stats"]["replays"] == 4
    if unit == "image":
        assert logs[1]["stats"]["fallback_images"] > 0
        assert any(len(set(map(lambda k: k.split("_")[1], r["keys"]))) > 1 for r in logs[0]["replays"] + logs[1]["replays"])
    assert_same_weights(*weights)


def test_resume_across_a_replay_is_step_exact(uninterrupted, tmp_path):
    # stop after step 4: the window (3,5] holds step 4's batch; the replay at step 5 happens after resume
    unit, out = uninterrupted
    launch([str(WORKER), str(tmp_path), *WORKER_ARGS, "--unit", unit, "--stop-after", "4"])
    assert not (tmp_path / "rank0.pt").exists()
    launch([str(WORKER), str(tmp_path), *WORKER_ARGS, "--unit", unit, "--resume"])
    full_logs, full_w = read_run(out)
    res_logs, res_w = read_run(tmp_path)
    for rank in range(2):
        assert res_logs[rank]["replays"] == full_logs[rank]["replays"]
        assert res_logs[rank]["stats"] == full_logs[rank]["stats"]
        assert_same_weights(res_w[rank], full_w[rank])


# -- through the real trainer -----------------------------------------------------------------------
def trainer_args(shards: Path, run: Path, unit: str) -> list[str]:
    return ["-m", "fashionseg.train", "--config", "configs/debug.yaml", "--shards", str(shards), "--out", str(run),
            "hard_mining.enabled=true", "hard_mining.every=2", "hard_mining.start_after=0", f"hard_mining.unit={unit}",
            "train.max_steps=4", "train.checkpoint_every=3", "train.keep_checkpoints=10", "log.every=1",
            "eval.every_epochs=0", "eval.at_end=false"]


@pytest.fixture(scope="module", params=["batch", "image"])
def trainer_run(request, synth_shards, tmp_path_factory) -> Path:
    """A two-rank run of the real trainer with hard_mining.unit=batch|image (per-image losses go
    through DDP's forward as `model(images, targets, image_losses=True)`)."""
    run = tmp_path_factory.mktemp(f"hm_trainer_{request.param}") / "run"
    launch(trainer_args(synth_shards, run, request.param), timeout=540)
    return run


def test_trainer_replays_in_step_on_two_ranks(trainer_run):
    """`-m fashionseg.train` on two ranks, hard_mining.every=2: replays after steps 2 and 4 (rank 0's
    metrics row per step), the same number on every rank, and identical weights on both ranks
    (every rank's count and weight digest in ranks.json)."""
    rows = [json.loads(line) for line in (trainer_run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in rows if "hard_mining/replays" in r}
    assert sorted(by_step) == [1, 2, 3, 4], f"no per-step hard_mining/* rows: {sorted(rows[-1])}"
    assert [by_step[s]["hard_mining/replays"] for s in range(1, 5)] == [0, 1, 1, 2]
    assert [by_step[s].get("hard_mining/last_replay_step") for s in range(1, 5)] == [None, 2, 2, 4]
    # the replayed batch's loss is logged in the replay step's forward and after its update
    for s in (2, 4):
        before, after = by_step[s]["hard_mining/last_loss_before"], by_step[s]["hard_mining/last_loss_after"]
        assert math.isfinite(before) and math.isfinite(after) and before > 0 and after > 0
    ranks = json.loads((trainer_run / "ranks.json").read_text())
    assert [r["replays"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [4, 4]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]


def test_trainer_resume_across_a_replay_is_step_exact(trainer_run, synth_shards, tmp_path):
    """Resuming from the checkpoint at step 3 (inside a window, before the replay at step 4) ends
    with the same weights (torch.equal) as the uninterrupted run."""
    step3 = trainer_run / "checkpoints" / "step_00000003"
    assert step3.is_dir(), sorted(p.name for p in (trainer_run / "checkpoints").iterdir())
    resumed_run = tmp_path / "resumed"
    shutil.copytree(step3, resumed_run / "checkpoints" / step3.name)
    unit = yaml.safe_load((trainer_run / "config.yaml").read_text())["hard_mining"]["unit"]
    launch(trainer_args(synth_shards, resumed_run, unit) + ["--resume"], timeout=540)
    assert [r["replays"] for r in json.loads((resumed_run / "ranks.json").read_text())] == [2, 2]
    final = torch.load(trainer_run / "model_final.pth", weights_only=True)["model"]
    resumed = torch.load(resumed_run / "model_final.pth", weights_only=True)["model"]
    assert_same_weights(final, resumed)
