"""The epoch plan: equal steps on every rank, full coverage, counted duplicates, for any layout."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fashionseg.data.plan import PlanConfig, PlanError, build_plan, run, add_arguments
from fashionseg.io import atomic_write_json


def make_split(shard_sizes, seed=0, n_cats=5):
    """An in-memory manifest split: shard i holds shard_sizes[i] samples."""
    rng = np.random.default_rng(seed)
    shards, k = [], 0
    for si, n in enumerate(shard_sizes):
        samples, off = [], 0
        for _ in range(n):
            w, h = (int(rng.integers(32, 96)) for _ in range(2))
            cats = sorted(set(rng.integers(0, n_cats, size=int(rng.integers(0, 3))).tolist()))
            samples.append({"key": f"s{k:05d}", "offset": off, "width": w, "height": h, "categories": cats})
            off += 4096
            k += 1
        shards.append({"name": f"train-{si:06d}.tar", "num_samples": n, "bytes": off, "sha256": "0" * 64, "samples": samples})
    return {"num_samples": k, "num_instances": 0, "shards": shards}


layouts = st.fixed_dictionaries({
    "shards": st.lists(st.integers(1, 40), min_size=1, max_size=6),
    "world": st.integers(1, 16),
    "workers": st.integers(0, 4),
    "equal": st.booleans(),
    "bs": st.lists(st.integers(1, 4), min_size=16, max_size=16),
    "seed": st.integers(0, 2**40),
    "epoch": st.integers(0, 5),
    "group": st.booleans(),
    "chunk": st.integers(1, 9),
    "mix": st.integers(1, 4),
})


def _sizes(lay):
    return [lay["bs"][0]] * lay["world"] if lay["equal"] else lay["bs"][: lay["world"]]


def _check_train_plan(plan, split, bs):
    P = sum(s["num_samples"] for s in split["shards"])
    W = max(1, plan.workers)
    steps = plan.rank_steps[0]
    assert plan.rank_steps == [steps] * len(bs), "every rank runs the same number of steps"
    seen = Counter()
    for r, b in enumerate(bs):
        batches = plan.rank_batches(r)
        assert len(batches) == steps
        assert all(len(x) == b for x in batches), "rank r takes exactly b_r samples per step"
        seen.update(i for x in batches for i in x)
        for w in range(W):
            c = plan.consumers[(r, w)]
            assert c.steps == list(range(w, steps, W))
            pos = sorted(p for x in c.batches for p in x)
            assert pos == list(range(pos[0], pos[0] + len(pos))) if pos else True, "one contiguous segment"
    n = len(plan.stream_pool) - plan.duplicates
    assert sum(seen.values()) == steps * sum(bs) == n + plan.duplicates
    assert plan.duplicates < sum(bs)
    assert set(seen) == set(range(P)), "every sample is used"
    assert sum(seen.values()) - P == plan.duplicates + plan.rfs_repeats
    if plan.rfs_repeats == 0:
        assert sum(c - 1 for c in seen.values()) == plan.duplicates, "nothing twice except the counted duplicates"
    assert (np.diff(plan.stream_window) >= 0).all(), "windows are read in stream order"


@settings(max_examples=300, deadline=None)
@given(layouts)
def test_train_plan_properties(lay):
    split = make_split(lay["shards"], seed=lay["seed"] % 1000)
    bs = _sizes(lay)
    cfg = PlanConfig(chunk_size=lay["chunk"], mix_chunks=lay["mix"], group_aspect_ratio=lay["group"])
    kw = dict(seed=lay["seed"], epoch=lay["epoch"], batch_sizes=bs, workers=lay["workers"], cfg=cfg)
    if split["num_samples"] < sum(bs):
        with pytest.raises(PlanError, match="fewer than one global batch"):
            build_plan(split, **kw)
        return
    plan = build_plan(split, **kw)
    _check_train_plan(plan, split, bs)
    again = build_plan(split, **kw)
    assert all(plan.rank_batches(r) == again.rank_batches(r) for r in range(len(bs))), "pure function"
    if lay["group"]:
        land = plan.pool.landscape
        for c in plan.consumers.values():
            pure = [b for b in c.batches if len(set(land[plan.stream_pool[b]].tolist())) == 1]
            assert len(c.batches) - len(pure) <= 1, "at most one mixed-orientation batch per consumer"


def test_rfs_repeats_rare_categories():
    # category 9 in 2 of 400 images: r = sqrt(0.1 / 0.005) = 4.47 -> those images 4 or 5 times
    split = make_split([100] * 4, n_cats=3)
    for i, sh in enumerate(split["shards"]):
        for s in sh["samples"]:
            s["categories"] = [0]
    split["shards"][0]["samples"][3]["categories"] = [0, 9]
    split["shards"][2]["samples"][7]["categories"] = [9]
    rare = {"s00003", "s00207"}
    for epoch in range(4):
        plan = build_plan(split, seed=1, epoch=epoch, batch_sizes=[2, 3], workers=2,
                          cfg=PlanConfig(repeat_factor_threshold=0.1))
        _check_train_plan(plan, split, [2, 3])
        counts = Counter(plan.pool.keys[i] for r in range(2) for b in plan.rank_batches(r) for i in b)
        assert plan.rfs_repeats == 7  # round(2 x 3.47): the same every epoch, so are the steps
        assert plan.rank_steps[0] == -(-(400 + 7) // 5)
        for k, c in counts.items():
            if k in rare:
                assert c >= 4
            else:
                assert c <= 2  # 1, or 2 when it is one of the few padding duplicates


def test_shuffle_changes_with_epoch_and_seed_but_reads_stay_chunked():
    split = make_split([50] * 6)
    a = build_plan(split, seed=0, epoch=0, batch_sizes=[4], workers=0).rank_batches(0)
    b = build_plan(split, seed=0, epoch=1, batch_sizes=[4], workers=0).rank_batches(0)
    c = build_plan(split, seed=1, epoch=0, batch_sizes=[4], workers=0).rank_batches(0)
    assert a != b and a != c
    plan = build_plan(split, seed=0, epoch=0, batch_sizes=[4], workers=0, cfg=PlanConfig(chunk_size=10, mix_chunks=2))
    # a window holds 2 chunks of 10 consecutive samples: 20 positions come from <= 2 runs of a shard
    for wi in range(int(plan.stream_window.max())):
        idx = np.sort(plan.stream_pool[plan.stream_window == wi])
        runs = 1 + int((np.diff(idx) > 1).sum())
        assert runs <= 2


def test_layout_errors():
    split = make_split([3, 2])
    with pytest.raises(PlanError, match=r"fewer than one global batch \(2\+2\+2 = 6\)"):
        build_plan(split, seed=0, epoch=0, batch_sizes=[2, 2, 2], workers=1)
    with pytest.raises(PlanError, match="batch size must be >= 1"):
        build_plan(split, seed=0, epoch=0, batch_sizes=[2, 0], workers=1)
    with pytest.raises(PlanError, match="workers"):
        build_plan(split, seed=0, epoch=0, batch_sizes=[2], workers=-1)


# -- `shard plan` ---------------------------------------------------------------------------------
@pytest.fixture
def manifest_dir(tmp_path):
    split = make_split([30, 30, 17])
    val = make_split([9])
    manifest = {"format": "fashionseg-shards", "version": 1,
                "categories": [{"id": i, "name": f"c{i}", "supercategory": "x", "level": 1} for i in range(5)],
                "attributes": [], "settings": {}, "splits": {"train": split, "val": val}}
    atomic_write_json(tmp_path / "manifest.json", manifest)
    return tmp_path


def _cli(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return run(p.parse_args(argv))


def test_cli_json(manifest_dir, capsys):
    assert _cli([str(manifest_dir), "--world-size", "3", "--batch-sizes", "2,2,4", "--workers", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # 77 samples, global batch 8: 10 steps, 3 duplicates
    assert out == {"ranks": [{"rank": 0, "batch_size": 2, "steps": 10, "samples": 20},
                             {"rank": 1, "batch_size": 2, "steps": 10, "samples": 20},
                             {"rank": 2, "batch_size": 4, "steps": 10, "samples": 40}],
                   "duplicates": 3}


def test_cli_table_and_errors(manifest_dir, capsys):
    assert _cli([str(manifest_dir), "--world-size", "2"]) == 0
    assert "duplicates 3" in capsys.readouterr().out
    assert _cli([str(manifest_dir), "--world-size", "2", "--batch-sizes", "2,2,4"]) != 0
    assert "lists 3 sizes but --world-size is 2" in capsys.readouterr().err
    assert _cli([str(manifest_dir), "--world-size", "16", "--batch-size", "8"]) != 0
    assert "fewer than one global batch" in capsys.readouterr().err
    assert _cli([str(manifest_dir / "nope"), "--world-size", "1"]) != 0
    assert "no shard manifest" in capsys.readouterr().err
    assert _cli([str(manifest_dir), "--world-size", "2", "--split", "test"]) != 0
    assert "no split 'test'" in capsys.readouterr().err


def test_cli_registered():
    from fashionseg.cli import SHARD_COMMANDS

    assert SHARD_COMMANDS["plan"][0] == "fashionseg.data.plan"
