"""Helpers for the trainer tests: run `python -m fashionseg.train` / `accelerate launch` as real
subprocesses (the deterministic-algorithms switch and Accelerate's singleton state must not leak
into the pytest process) and read what a run leaves behind."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# tiny and quick: 64-96 px images, no evaluation unless a test asks for it
FAST = ["log.every=1", "eval.every_epochs=0", "eval.at_end=false", "log.log_with=[]"]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "fashionseg.train", "--config", str(ROOT / "configs" / "debug.yaml"),
            "--shards", str(shards), "--out", str(out), *FAST, *extra]


def run(cmd: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_cmd(nproc: int, *args: str) -> list[str]:
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def save_random_weights(shard_dir: Path, path: Path, detections_per_img: int, extra_config: dict | None = None) -> Path:
    """A randomly initialised light model saved as the trainer saves model_final.pth (score_thresh 0,
    so every image yields `detections_per_img` detections); test scale 64 px (data.test_size)."""
    from dataclasses import asdict

    from fashionseg.data.shards.reader import read_manifest
    from fashionseg.data.vocab import Vocab
    from fashionseg.model.build import ModelConfig, build_model
    from fashionseg.model.weights_file import WeightsFile, save_weights

    vocab = Vocab.from_dict(read_manifest(shard_dir))
    cfg = ModelConfig(backbone="mobilenet_v3_large_fpn", score_thresh=0.0, detections_per_img=detections_per_img,
                      attribute_hidden=0, mask_head_hidden=32, mask_thresh=0.5)
    torch.manual_seed(0)
    model = build_model(cfg, vocab.num_classes, vocab.num_attributes)
    config = {"model": asdict(cfg), "data": {"min_size": [64], "max_size": 96, "test_size": 64}, **(extra_config or {})}
    return save_weights(path, WeightsFile(model.state_dict(), config, vocab.categories, vocab.attributes))
