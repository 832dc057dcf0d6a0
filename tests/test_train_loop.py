"""The trainer in one process on synthetic shards: run folder contents, NaN skipping and the
abort after K in a row, overfit mode, config errors, report and checkpoint averaging."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from train_utils import PY, ROOT, final_weights, metrics, run, train_cmd

FAULTS = str(ROOT / "tests" / "train_fault_worker.py")


def nan_cmd(steps: str, shards, out, *extra: str, fault: str = "--nan-steps") -> list[str]:
    """train_cmd through the fault-injection worker: NaN losses at these 1-based steps."""
    cmd = train_cmd(shards, out, *extra)
    return [PY, FAULTS, fault, steps, "--", *cmd[3:]]  # drop `python -m fashionseg.train`

LOSS_TERMS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss_attributes"}


def test_run_folder_has_everything(synth_shards, tmp_path):
    out = tmp_path / "run"
    proc = run(train_cmd(synth_shards, out, "train.max_steps=4", "train.checkpoint_every=2", "log.every=2",
                         "log.log_with=[tensorboard]", "eval.at_end=true", "eval.max_images=4"))
    # the start-up facts and torchvision's MetricLogger line
    assert "global 2 = per-rank [2]" in proc.stdout and "lr 0.02" in proc.stdout
    assert "Epoch: [0]" in proc.stdout and "eta:" in proc.stdout and "loss: " in proc.stdout and "data: " in proc.stdout
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for r in train_rows:
        assert LOSS_TERMS | {"step", "epoch", "lr", "loss", "images_per_sec", "data_time", "skipped_steps",
                             "data_wait_frac"} <= set(r)
        assert math.isfinite(r["loss"]) and r["images_per_sec"] > 0 and 0 <= r["data_wait_frac"] <= 1
        assert r["loss"] == pytest.approx(sum(r[k] for k in LOSS_TERMS), rel=1e-5)
    eval_rows = [r for r in rows if "eval/segm_AP" in r]
    assert len(eval_rows) == 1 and 0.0 <= eval_rows[0]["eval/segm_AP"] <= 1.0
    # resolved config, run info, TensorBoard events, checkpoints, final weights
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 4 and cfg["data"]["shards"] == str(synth_shards)
    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["versions"]["torch"] == torch.__version__.split("+")[0]
    assert info["git_commit"] and info["command"]
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert set(final) >= {"model", "config", "categories", "attributes"}
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    assert final["categories"] == manifest["categories"] and final["config"]["model"]["backbone"] == "resnet18_fpn"
    ckpt = torch.load(out / "checkpoints" / "step_00000004" / "trainer.pth", weights_only=True)
    assert set(ckpt["parts"]) >= {"model", "optimizer", "schedule", "trainer"} and set(ckpt["ranks"][0]) == {"rank", "loader", "miner", "rng"}
    assert ckpt["parts"]["trainer"]["step"] == 4 and ckpt["parts"]["schedule"]["position"] == 4
    assert all(torch.equal(ckpt["parts"]["model"][k], final["model"][k]) for k in final["model"])
    # `fashionseg report` and `fashionseg average`
    run([PY, "-m", "fashionseg.cli", "report", str(out)])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run([PY, "-m", "fashionseg.cli", "average", str(out), "--last", "2", "--out", str(tmp_path / "avg.pth")])
    avg = torch.load(tmp_path / "avg.pth", weights_only=True)["model"]
    a = torch.load(out / "checkpoints" / "step_00000002" / "trainer.pth", weights_only=True)["parts"]["model"]
    k = "roi_heads.box_predictor.cls_score.weight"
    assert torch.allclose(avg[k], (a[k] + final["model"][k]) / 2, atol=1e-7)


def test_nan_loss_is_skipped_and_counted_then_aborts(synth_shards, tmp_path):
    """The test's fault worker poisons the loss of step 2: it is skipped on every count, and
    nothing moves (weights, momentum, schedule position) compared with the checkpoint before it."""
    out = tmp_path / "nan"
    run(nan_cmd("2", synth_shards, out, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=4"))
    rows = metrics(out)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert "loss" not in rows[1] and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[1]["lr"] == rows[0]["lr"] and rows[2]["lr"] != rows[1]["lr"]  # the schedule waits too
    assert all(torch.isfinite(v).all() for v in final_weights(out).values() if v.is_floating_point())
    # K non-finite in a row: abort with a message, the last good checkpoint stays the latest
    out2 = tmp_path / "abort"
    proc = run(nan_cmd("2,3", synth_shards, out2, "train.max_steps=6", "train.checkpoint_every=1", "train.max_nonfinite=2"),
               ok=False)
    assert proc.returncode == 1
    assert "2 non-finite losses in a row (step 3)" in proc.stderr and "step_00000001" in proc.stderr
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (out2 / "model_final.pth").exists()


def test_skipped_step_moves_nothing(synth_shards, tmp_path):
    """A skipped step leaves weights, optimizer state (momentum) and the schedule position as they were.
    (BatchNorm running statistics of a model trained from scratch do move: they update in the forward.)"""
    out = tmp_path / "skip"
    run(nan_cmd("2", synth_shards, out, "train.max_steps=2", "train.checkpoint_every=1"))
    a, b = (torch.load(out / "checkpoints" / f"step_0000000{s}" / "trainer.pth", weights_only=True)["parts"] for s in (1, 2))
    assert b["trainer"] == dict(a["trainer"], step=2, skipped_steps=1, consecutive_nonfinite=1)
    assert a["schedule"] == b["schedule"] == {"position": 1}
    weights = [k for k in a["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(weights) > 100 and all(torch.equal(a["model"][k], b["model"][k]) for k in weights)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


def test_overfit_batches_passes_and_fails_loudly(synth_shards, tmp_path):
    proc = run(train_cmd(synth_shards, tmp_path / "ok", "--overfit-batches", "1", "train.max_steps=16",
                         "train.batch_size=1", "train.warmup_iters=2", "train.milestones=[1.0]"))
    assert "overfit: loss" in proc.stdout and "passed" in proc.stdout
    proc = run(train_cmd(synth_shards, tmp_path / "bad", "--overfit-batches", "1", "train.max_steps=4",
                         "train.batch_size=1", "train.lr=0.0"),
               ok=False)
    assert proc.returncode == 1 and "FAILED" in proc.stdout


def test_config_typo_is_a_clear_error(synth_shards, tmp_path):
    proc = run(train_cmd(synth_shards, tmp_path / "x", "train.batch_szie=3"), ok=False)
    assert proc.returncode == 2
    assert "unknown key 'train.batch_szie'" in proc.stderr and "did you mean 'train.batch_size'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_training_from_pretrained_weights_says_what_was_loaded(synth_shards, tmp_path):
    """Logging is configured for every command: the pretrained report reaches the user."""
    import torchvision
    torch.manual_seed(0)
    coco = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "coco_shaped.pth"
    torch.save(coco.state_dict(), path)
    proc = run(train_cmd(synth_shards, tmp_path / "pre", "train.max_steps=1", "model.backbone=mobilenet_v3_large_fpn",
                         f"model.pretrained={path}"))
    assert "pretrained: loaded" in proc.stderr and "re-initialised 4 class-specific (91 -> " in proc.stderr


def test_stall_watchdog_dumps_stacks_and_exits(synth_shards, tmp_path):
    """A step that never ends (the fault worker hangs step 2): after train.stall_timeout_s the
    watchdog writes every thread's stack to the run dir and exits non-zero for a launcher to see."""
    out = tmp_path / "stall"
    proc = run(nan_cmd("2", synth_shards, out, "train.max_steps=4", "train.stall_timeout_s=8", fault="--hang-step"),
               ok=False, timeout=240)
    assert proc.returncode == 3, proc.stderr[-2000:]
    dump = (out / "stall_rank0.txt").read_text()
    assert "no training step completed" in dump and "train_fault_worker.py" in dump and "Thread" in dump
    assert "stalled: no step for" in proc.stderr
