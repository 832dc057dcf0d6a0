"""Two real processes (`accelerate launch --multi_gpu --num_processes 2`, gloo on CPU) read disjoint
samples, in proportion to unequal batch sizes, and both finish the epoch with equal step counts."""
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



def test_two_processes_equal_steps_disjoint_samples(synth_shards, tmp_path):
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(WORKER), str(synth_shards), str(tmp_path), "--batch-sizes", "2,3", "--workers", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in res] == [2, 2]

    train = [r["train"] for r in res]
    # 18 samples, global batch 2 + 3 = 5: 4 steps on both ranks, 2 duplicates to fill the last step
    assert train[0]["steps"] == train[1]["steps"] == train[0]["len"] == train[1]["len"] == 4
    assert train[0]["all_steps"] == [4, 4]
    assert train[0]["sizes"] == [2] * 4 and train[1]["sizes"] == [3] * 4
    dup = train[0]["summary"]["duplicates"]
    assert dup == 2
    seen = Counter(train[0]["keys"] + train[1]["keys"])
    all_train = {k for k, _, _ in iter_split(synth_shards, "train")}
    assert set(seen) == all_train, "every training sample is read"
    assert sum(seen.values()) - len(all_train) == dup, "nothing twice except the counted duplicates"
    disjoint = set(train[0]["keys"]) & set(train[1]["keys"])
    assert len(disjoint) <= dup

    val = [r["val"] for r in res]
    all_val = sorted(k for k, _, _ in iter_split(synth_shards, "val"))
    assert sorted(val[0]["keys"] + val[1]["keys"]) == all_val, "each val sample exactly once over both ranks"
    assert not set(val[0]["keys"]) & set(val[1]["keys"])
