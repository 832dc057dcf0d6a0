"""Real processes (`accelerate launch --multi_gpu --num_processes N`, gloo on CPU): two ranks read
disjoint samples in proportion to unequal batch sizes with equal step counts; the loader state
they save mid-epoch resumes in one process and in three, and the keys read over the interrupted
epoch are every training sample once plus the counted duplicates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fashionseg.data.shards.reader import iter_split
from train_utils import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("loader_ddp_worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
SAVE_AT = 2


def launch(n: int, shards, out: Path, *args: str) -> list[dict]:
    if n == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(WORKER)]
    cmd += [str(shards), str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    tag = next((a.split("=")[1] for a in args if a.startswith("--tag=")), "")
    res = [json.loads((out / f"{tag}rank{r}.json").read_text()) for r in range(n)]
    assert [r["world"] for r in res] == [n] * n
    return res


def test_two_processes_then_resume_in_one_and_three(synth_shards, tmp_path):
    all_train = Counter(k for k, _, _ in iter_split(synth_shards, "train"))
    full = launch(2, synth_shards, tmp_path, "--batch-sizes", "2,3", "--workers", "1", f"--save-at={SAVE_AT}", "--tag=a")
    # 18 samples, global batch 2 + 3 = 5: 4 steps on both ranks, 2 duplicates to fill the last step
    assert [r["len"] for r in full] == [r["steps_left"] for r in full] == full[0]["all_steps"] == [4, 4]
    assert full[0]["sizes"] == [2] * 4 and full[1]["sizes"] == [3] * 4
    dup = full[0]["summary"]["duplicates"]
    assert dup == 2
    seen = Counter(k for r in full for b in r["keys"] for k in b)
    assert set(seen) == set(all_train), "every training sample is read"
    assert sum(seen.values()) - len(all_train) == dup, "nothing twice except the counted duplicates"
    assert len(set(sum(full[0]["keys"], [])) & set(sum(full[1]["keys"], []))) <= dup, "the ranks' samples are disjoint"

    import torch

    states = [torch.load(tmp_path / f"arank{r}.pth", weights_only=True) for r in range(2)]
    assert states[0] == states[1], "every rank saves the same layout-free position"
    head = Counter(k for r in full for b in r["keys"][:SAVE_AT] for k in b)
    assert states[0]["samples_consumed"] + states[0]["duplicates_consumed"] == sum(head.values()) == SAVE_AT * 5

    for n, sizes, state in ((1, "3", tmp_path / "arank0.pth"), (3, "1,2,2", tmp_path / "arank1.pth")):
        rest = launch(n, synth_shards, tmp_path, "--batch-sizes", sizes, "--workers", "1", f"--resume={state}", f"--tag=b{n}")
        bs = [int(b) for b in sizes.split(",")]
        steps = -(-(18 - states[0]["samples_consumed"]) // sum(bs))
        assert [r["steps_left"] for r in rest] == rest[0]["all_steps"] == [steps] * n, "equal steps on the new layout"
        assert all(r["sizes"] == [b] * steps for r, b in zip(rest, bs))
        assert all(r["epoch_after"] == 2 for r in rest)
        assert "on 2 ranks x batch 2,3" in rest[0]["layout_change"]
        added = rest[0]["summary"]["duplicates"]
        assert added == steps * sum(bs) - (18 - states[0]["samples_consumed"])
        epoch = head + Counter(k for r in rest for b in r["keys"] for k in b)
        assert set(epoch) == set(all_train), f"{n} process(es): every training sample of the epoch is read"
        assert sum(epoch.values()) - len(all_train) == states[0]["duplicates_consumed"] + added, \
            f"{n} process(es): nothing twice except the counted duplicates"
