"""bench/gpu_suite.sh --smoke: the GPU suite's code on the CPU (CI), and its pure helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from train_utils import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from gpu_parts import ratios, summarize_metrics, unsupported_key  # noqa: E402
from gpu_suite import targets  # noqa: E402

PARTS = ("gpu_tests", "train", "data_wait", "deepspeed", "inference")
STATUSES = {"ok", "error", "unsupported", "timeout", "skipped", "failed"}


def test_smoke_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PY=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trainer_vs_peer" in proc.stdout and (out / "gpu_suite.txt").read_text().strip() in proc.stdout
    report = json.loads((out / "gpu_suite.json").read_text())
    log = (out / "gpu_suite_log.txt").read_text()
    assert report["env"]["profile"] == "smoke" and report["env"]["torch"] == torch.__version__
    assert "error" not in report["data"] and report["data"]["splits"]["train"] > 0
    res = report["results"]
    assert set(res) == set(PARTS) and all(res[p]["status"] in STATUSES for p in PARTS), {p: res[p].get("error") for p in PARTS}

    tests = res["gpu_tests"]  # no CUDA here: every GPU test is collected and skipped, saying why
    assert tests["status"] == "ok" and tests["skipped"] == len(tests["tests"]) >= 8
    assert all("CUDA" in t["message"] for t in tests["tests"])

    train = res["train"]
    nchw = [r for r in train["trainer"] if not r["channels_last"]]
    assert [r["status"] for r in nchw] == ["ok"], nchw
    assert nchw[0]["images_per_sec"] > 0 and 0 <= nchw[0]["data_wait_frac"] <= 1 and nchw[0]["timed_steps"] >= 1
    assert "python -m fashionseg.train" in log.replace(sys.executable + " -m", "python -m")
    cl = [r for r in train["trainer"] if r["channels_last"]]
    assert len(cl) == 1 and cl[0]["status"] in ("ok", "unsupported"), cl
    if cl[0]["status"] == "unsupported":
        assert cl[0]["unsupported_key"] == "train.channels_last"
    assert sorted(r["channels_last"] for r in train["peer"]) == [False, True], train.get("peer_error")
    assert all(r["images_per_sec"] > 0 and r["data"] == "coco" for r in train["peer"])
    assert train["trainer_vs_peer"]["fp32"]["trainer_vs_peer"] > 0

    wait = res["data_wait"]
    assert [r["workers"] for r in wait["rows"]] == report["profile"]["data_wait_workers"]
    assert all(r["status"] == "ok" and 0 <= r["data_wait_frac"] <= 1 for r in wait["rows"])
    assert wait["decode"]["cpu_images_per_sec"] > 0 and wait["decode"]["images"] > 0
    assert wait["decode_device_run"]["status"] in ("ok", "unsupported")

    ds = res["deepspeed"]["rows"]
    assert [r["precision"] for r in ds] == report["profile"]["ds_precisions"]
    assert all(r["status"] == "ok" or r["error"] for r in ds)  # a failure is recorded with its message

    infer = {r["mode"]: r for r in res["inference"]["rows"]}
    assert {"single", "tta"} <= set(infer) and infer["single"]["status"] == "ok", infer
    assert infer["single"]["images_per_sec"] > 0 and infer["single"]["images"] == report["data"]["splits"]["val"]
    assert res["inference"]["fold"]
    assert set(report["targets"]) == {"fp16_vs_fp32", "bf16_vs_fp32", "trainer_vs_peer", "data_wait_shipped_config"}


def test_summarize_metrics_weights_intervals_by_time_and_drops_warmup():
    rows = [{"step": 5, "images_per_sec": 1.0, "step_time": 4.0, "data_wait_frac": 0.9, "max_mem_mb": 900.0, "loss": 3.0},
            {"step": 10, "images_per_sec": 10.0, "step_time": 0.4, "data_wait_frac": 0.0, "max_mem_mb": 1000.0, "loss": 2.0},
            {"step": 15, "images_per_sec": 5.0, "step_time": 0.8, "data_wait_frac": 0.3, "max_mem_mb": 1000.0,
             "loss": 1.0, "skipped_steps": 1},
            {"step": 15, "eval/segm_AP": 0.1}]
    s = summarize_metrics(rows, warm_steps=5)
    # 5 steps at 0.4 s (20 images) + 5 steps at 0.8 s (20 images): 40 images in 6 s
    assert s["images_per_sec"] == pytest.approx(40 / 6) and s["data_wait_frac"] == pytest.approx(0.3 * 4 / 6)
    assert s["timed_steps"] == 10 and s["peak_mem_mb"] == 1000.0 and s["last_loss"] == 1.0 and s["skipped_steps"] == 1
    assert summarize_metrics(rows[:1], warm_steps=5)["images_per_sec"] == 1.0  # nothing later: the last interval
    assert summarize_metrics([], warm_steps=5) == {}


def test_unsupported_key_reads_the_config_error_only_for_optional_keys():
    ours = "error: configs/x.yaml: unknown key 'train.channels_last'; valid keys: batch_size, lr"
    pydantic_style = "1 validation error for DataSection\ndecode_device\n  Extra inputs are not permitted [type=extra_forbidden]"
    assert unsupported_key(ours, ["train.lr=1", "train.channels_last=true"]) == "train.channels_last"
    assert unsupported_key(pydantic_style, ["data.decode_device=cuda"]) == "data.decode_device"
    assert unsupported_key("error: unknown key 'train.lrr'", ["train.lrr=1"]) is None  # not an optional key
    assert unsupported_key("CUDA out of memory", ["train.channels_last=true"]) is None
    assert unsupported_key("error: unknown key 'data.foo'; valid keys: channels_last", ["train.channels_last=true"]) is None


def test_ratios_and_targets():
    def row(arm, precision, cl, ips, mem=None):
        return {"arm": arm, "precision": precision, "channels_last": cl, "images_per_sec": ips, "peak_mem_mb": mem, "status": "ok"}

    trainer = [row("trainer", "fp32", False, 10.0, 8000), row("trainer", "fp16", False, 16.0, 5000),
               row("trainer", "fp16", True, 18.0, 5000), {**row("trainer", "bf16", True, None), "status": "unsupported"}]
    peer = [row("peer", "fp32", False, 8.0), row("peer", "fp16", False, 20.0), row("peer", "fp16", True, 30.0)]
    r = ratios(trainer, peer)
    assert r["fp32"] == {"trainer_vs_peer": 1.25, "trainer_best_vs_peer": 1.25}
    assert r["fp16"] == {"trainer_vs_peer": 0.8, "trainer_best_vs_peer": 0.9}
    t = targets({"train": {"trainer": trainer, "trainer_vs_peer": r},
                 "data_wait": {"shipped_workers": 6, "rows": [{"workers": 6, "status": "ok", "data_wait_frac": 0.02}]}})
    assert t["fp16_vs_fp32"] == {"speedup": 1.8, "peak_mem_ratio": 0.625, "met": True}
    assert t["bf16_vs_fp32"]["met"] is None
    assert t["trainer_vs_peer"]["met"] is False and t["data_wait_shipped_config"]["met"] is True
