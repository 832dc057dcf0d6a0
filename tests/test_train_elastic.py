"""Elastic resume through the real trainer (issue 12's acceptance): a two-process CPU run killed
after its first checkpoint resumes with one process and with three, finishes its epoch, and its
samples.jsonl shows every train sample of the epoch exactly once plus the counted duplicates."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import psutil
import pytest
import torch

from train_utils import ROOT, accelerate_cmd, env, run, train_cmd

pytestmark = pytest.mark.slow
EPOCH = ["train.max_steps=null", "train.epochs=1", "train.checkpoint_every=2", "train.record_samples=true",
         "train.lr=0.01"]


def _kill_after_first_checkpoint(cmd, out, timeout=400):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = out / "checkpoints" / "step_00000002" / "trainer.pth"
    t0 = time.time()
    while not first.exists():
        assert proc.poll() is None, "the two-process run ended before its first checkpoint"
        assert time.time() - t0 < timeout, f"{first} did not appear"
        time.sleep(0.05)
    # every rank and the launcher at once, no handler runs (ranks may sit in their own sessions)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs([p for p in map(_proc, tree) if p is not None], timeout=60)


def _proc(pid):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture(scope="module")
def killed_run(synth_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "run"
    _kill_after_first_checkpoint(accelerate_cmd(2, *train_cmd(synth_shards, out, *EPOCH)[1:]), out)
    state = torch.load(out / "checkpoints" / "step_00000002" / "trainer.pth", weights_only=True)
    assert state["meta"]["world_size"] == 2 and state["step"] == 2
    return out, state


def _train_keys(shards) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [s["key"] for sh in manifest["splits"]["train"]["shards"] for s in sh["samples"]]


@pytest.mark.parametrize("nproc", [1, 3])
def test_killed_two_process_run_resumes_on_another_world_size(killed_run, synth_shards, tmp_path, nproc):
    src, state = killed_run
    out = tmp_path / f"resume{nproc}"
    shutil.copytree(src, out)
    cmd = train_cmd(synth_shards, out, *EPOCH, "--resume")
    proc = run(accelerate_cmd(nproc, *cmd[1:]) if nproc > 1 else cmd, timeout=500)
    said = proc.stdout
    assert f"elastic resume: 2 -> {nproc} process(es)" in said, said[-3000:] + proc.stderr[-3000:]
    assert f"elastic resume: 2 -> {nproc} process(es)" in said and "the step counter continues at 2" in said
    added = int(re.search(r"(\d+) duplicates added", said).group(1))
    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks) == nproc and len({r["step"] for r in ranks}) == 1 and len({r["params_sha256"] for r in ranks}) == 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # steps 1-2 by the two original ranks, then every step by each of the new ranks
    assert sorted({(r["step"], r["rank"]) for r in rows if r["step"] <= 2}) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    last = ranks[0]["step"]
    assert sorted({(r["step"], r["rank"]) for r in rows if r["step"] > 2}) == [(s, k) for s in range(3, last + 1) for k in range(nproc)]
    seen = Counter(k for r in rows for k in r["keys"])
    keys = _train_keys(synth_shards)
    assert set(seen) == set(keys)                                     # every train sample of the epoch
    before = state["ranks"][0]["loader"]["duplicates_consumed"]
    assert sum(seen.values()) - len(keys) == before + added           # exactly once, plus the counted duplicates
    assert (out / "model_final.pth").exists()
