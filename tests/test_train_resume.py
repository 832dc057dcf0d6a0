"""Step-exact resume on CPU: a run killed with SIGKILL after a checkpoint and resumed ends with
weights identical (torch.equal) to an uninterrupted run; SIGTERM writes a checkpoint and exits
(128 + SIGTERM) at the end of the current step."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from train_utils import ROOT, assert_identical, env, final_weights, metrics, run, train_cmd

STEPS = ["train.max_steps=7", "train.checkpoint_every=3", "train.record_samples=true"]  # 9 steps/epoch: checkpoints at 3, 6, 7

pytestmark = pytest.mark.slow


def _wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read() if proc.stdout else ''}"
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_then_resume_equals_uninterrupted(synth_shards, tmp_path):
    full = tmp_path / "full"
    run(train_cmd(synth_shards, full, *STEPS))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(synth_shards, killed, *STEPS), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(killed / "checkpoints" / "step_00000003" / "trainer.pth", proc)
    proc.send_signal(signal.SIGKILL)  # for real: no handler runs, no checkpoint is written
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model_final.pth").exists()
    run(train_cmd(synth_shards, killed, *STEPS, "--resume"))
    assert_identical(final_weights(full), final_weights(killed))
    # metrics.jsonl reads as one run: every step once, the same losses
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 8))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    # samples.jsonl holds exactly what the finished run trained on: rows past the checkpoint dropped
    rows = [json.loads(l) for l in (killed / "samples.jsonl").read_text().splitlines()]
    assert rows == [json.loads(l) for l in (full / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8)) and all(len(r["keys"]) == 2 and r["rank"] == 0 for r in rows)
    seen = [k for r in rows for k in r["keys"]]
    assert len(seen) == len(set(seen)) == 14  # 7 steps x 2 images, no sample twice within the epoch


def test_sigterm_writes_a_checkpoint_and_exits(synth_shards, tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(synth_shards, out, "train.max_steps=40", "train.checkpoint_every=100"),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "metrics.jsonl", proc)
    t0 = time.time()
    while not metrics(out):  # the first row: the run is inside its loop
        assert proc.poll() is None and time.time() - t0 < 240, "no metrics row within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # the launcher and torchrun both forward one: still a clean stop
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "stopped by signal SIGTERM" in text
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and not (out / "model_final.pth").exists()
    step = int(ckpts[0].name.split("_")[1])
    assert 1 <= step < 40 and metrics(out)[-1]["step"] <= step
    state = torch.load(ckpts[0] / "trainer.pth", weights_only=True)
    assert state["step"] == step and len(state["ranks"]) == 1 and "loader" in state["ranks"][0]


def test_resume_with_more_steps_follows_the_new_schedule(synth_shards, tmp_path):
    """`--resume train.max_steps=<more>` extends a cosine run: the LR follows the new length instead
    of the saved schedule (which would sit at 0 after its old end)."""
    out = tmp_path / "extend"
    cosine = ["train.schedule=cosine", "train.warmup_iters=0", "train.checkpoint_every=100"]
    run(train_cmd(synth_shards, out, "train.max_steps=4", *cosine))
    run(train_cmd(synth_shards, out, "--resume", "train.max_steps=8", *cosine))
    lr = {r["step"]: r["lr"] for r in metrics(out) if "lr" in r}
    assert sorted(lr) == list(range(1, 9))
    assert all(lr[s] > 0 for s in range(5, 8)), lr
    assert lr[5] > lr[6] > lr[7]
