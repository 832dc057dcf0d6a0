"""The trainer under real multi-process launches on CPU (gloo): DDP with uneven per-rank batch
sizes, the loss weighting that makes the DDP average the global-batch mean, DeepSpeed ZeRO-2."""
from __future__ import annotations

import json

import pytest
import torch

from train_utils import PY, ROOT, accelerate_cmd, metrics, run, train_cmd

WORKER = str(ROOT / "tests" / "train_weighting_worker.py")
FAULTS = str(ROOT / "tests" / "train_fault_worker.py")

pytestmark = pytest.mark.slow


def _ranks(out):
    return json.loads((out / "ranks.json").read_text())


def test_ddp_two_ranks_uneven_batches_end_identical(synth_shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = accelerate_cmd(2, *train_cmd(synth_shards, out, "train.max_steps=4", "train.checkpoint_every=2",
                                       "train.batch_sizes=[1,3]")[1:])
    proc = run(cmd, timeout=400)
    assert "global 4 = per-rank [1, 3]" in proc.stdout
    ranks = _ranks(out)
    assert [r["batch_size"] for r in ranks] == [1, 3]
    assert [r["step"] for r in ranks] == [4, 4]                        # equal step counts
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]      # identical weights on both ranks
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ckpt = torch.load(out / "checkpoints" / "step_00000004" / "trainer.pth", weights_only=True)
    assert [r["rank"] for r in ckpt["ranks"]] == [0, 1]               # every rank's RNG and loader position


def test_uneven_batch_weighting_equals_one_process_with_all_samples(tmp_path):
    run(accelerate_cmd(2, WORKER, str(tmp_path / "ddp"), "train.batch_sizes=[1,3]"), timeout=300)
    run([PY, WORKER, str(tmp_path / "one"), "train.batch_size=4"], timeout=300)
    ddp = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], rtol=0, atol=1e-6)
    # without the weights, DDP's plain average of the two ranks' mean-loss gradients is another update
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(4, 3, generator=g), torch.randn(4, generator=g) * 3
    grads = []
    for sl in (slice(0, 1), slice(1, 4)):
        lin.zero_grad()
        ((lin(xs[sl]).squeeze(1) - ys[sl]) ** 2).mean().backward()
        grads.append(lin.weight.grad.clone())
    naive = lin.weight.detach() - 0.1 * (grads[0] + grads[1]) / 2
    assert (naive - one["lin.weight"]).abs().max() > 1e-3
    info_ddp = json.loads((tmp_path / "ddp" / "info.json").read_text())
    info_one = json.loads((tmp_path / "one" / "info.json").read_text())
    assert info_ddp["batch_sizes"] == [1, 3] and info_one["batch_sizes"] == [4]
    assert info_ddp["loss"] == pytest.approx(info_one["loss"], rel=1e-6)  # the logged loss is the global mean too


def test_deepspeed_zero2_runs_and_skips_a_non_finite_step(synth_shards, tmp_path):
    """ZeRO-2 on two CPU ranks trains, checkpoints through DeepSpeed and keeps the ranks equal; a
    non-finite step is skipped as under DDP: two steps with the second poisoned end with the weights
    of one step (ZeRO's own overflow check does the skipping). DeepSpeed start-up is the cost here
    (~30 s a launch on 2 cores), so both properties share the one-step run."""
    pytest.importorskip("deepspeed")
    ds = ["train.backend=deepspeed", "train.zero_stage=2"]
    one, poisoned = tmp_path / "one", tmp_path / "poisoned"
    proc = run(accelerate_cmd(2, *train_cmd(synth_shards, one, "train.max_steps=1", "train.checkpoint_every=1", *ds)[1:]),
               timeout=500)
    assert "backend=deepspeed" in proc.stdout
    ranks = _ranks(one)
    assert [r["step"] for r in ranks] == [1, 1] and ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert (one / "checkpoints" / "step_00000001" / "ds").is_dir()
    a = torch.load(one / "model_final.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())

    cmd = train_cmd(synth_shards, poisoned, "train.max_steps=2", "train.checkpoint_every=100", *ds)
    run(accelerate_cmd(2, FAULTS, "--nan-steps", "2", "--", *cmd[3:]), timeout=500)
    assert [r["skipped_steps"] for r in _ranks(poisoned)] == [1, 1]
    b = torch.load(poisoned / "model_final.pth", weights_only=True)["model"]
    weights = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(a[k], b[k]) for k in weights)
