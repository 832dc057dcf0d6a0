"""The loader over real shards: plan order whatever the workers, step-exact resume, replay by key."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashionseg.data import rle
from fashionseg.data.loader import LoaderConfig, LoaderStateError, build_loader
from fashionseg.data.plan import PlanError
from fashionseg.data.shards.reader import iter_split

CFG = LoaderConfig(batch_size=2, workers=0, min_size=[48, 64, 80], max_size=128, hflip=0.5, color_jitter=0.3,
                   chunk_size=3, mix_chunks=2)


def keys_of(batches):
    return [[t["key"] for t in targets] for _, targets in batches]


def assert_same_batches(a, b):
    assert keys_of(a) == keys_of(b)
    for (ia, ta), (ib, tb) in zip(a, b):
        for x, y in zip(ia, ib):
            assert torch.equal(x, y)
        for x, y in zip(ta, tb):
            assert x.keys() == y.keys()
            for k in x:
                assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


def test_yields_the_plan_and_targets(synth_shards):
    ld = build_loader(CFG, synth_shards, "train", rank=0, world_size=1, seed=0, train=True)
    batches = list(ld)
    plan = ld.plan(0)
    assert len(batches) == len(plan.rank_batches(0)) == 9  # 18 samples, batch 2
    assert keys_of(batches) == [[plan.pool.keys[i] for i in b] for b in plan.rank_batches(0)]
    assert sorted(k for b in keys_of(batches) for k in b) == sorted(plan.pool.keys)
    C, A = ld.vocab.num_categories, ld.vocab.num_attributes
    for images, targets in batches:
        assert len(images) == len(targets) == 2
        for img, t in zip(images, targets):
            h, w = img.shape[1:]
            assert img.dtype == torch.float32 and img.shape[0] == 3 and min(h, w) in (48, 64, 80)
            n = t["boxes"].shape[0]
            assert t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.uint8
            assert t["labels"].dtype == torch.int64 and ((t["labels"] >= 1) & (t["labels"] <= C)).all()
            assert t["attributes"].shape == (n, A)
            assert (t["masks"].flatten(1).sum(1) > 0).all(), "vanished instances are dropped"
            assert t["image_id"].item() == plan.pool.keys.index(t["key"])
    assert ld.epoch == 1 and ld.state_dict()["batches_consumed"] == 0, "an exhausted epoch moves on"


def test_masks_equal_decode_then_transform(synth_shards):
    """End to end against the shard's own RLE: decode, nearest-resize, flip, drop the vanished."""
    from test_transforms import reference

    ld = build_loader(dataclasses.replace(CFG, color_jitter=0.0, hflip=0.5), synth_shards, "train", rank=0, world_size=1,
                      seed=4, train=True)
    metas = {k: m for k, _, m in iter_split(synth_shards, "train")}
    flips = 0
    for _, targets in ld:
        for t in targets:
            meta = metas[t["key"]]
            oh, ow = t["masks"].shape[1:] if t["masks"].shape[0] else (None, None)
            if oh is None:
                continue
            p = ld.transform.params(0, t["key"])
            flips += p.flip
            refs = [reference(rle.decode_coco(i["segmentation"]), oh, ow, p.flip) for i in meta["instances"]]
            refs = [torch.from_numpy(r.copy()) for r in refs if r.any()]
            assert len(refs) == len(t["masks"])
            for r, m in zip(refs, t["masks"]):
                assert torch.equal(r, m)
    assert flips > 0


def test_workers_do_not_change_the_batches(synth_shards):
    base = build_loader(dataclasses.replace(CFG, workers=0), synth_shards, "train", rank=0, world_size=1, seed=1, train=True)
    par = build_loader(dataclasses.replace(CFG, workers=2), synth_shards, "train", rank=0, world_size=1, seed=1, train=True)
    # the plan depends on the worker count (each worker reads its own chunks), the decoded samples do not
    a, b = list(base), list(par)
    assert len(a) == len(b) == 9
    plan = par.plan(0)
    assert keys_of(b) == [[plan.pool.keys[i] for i in x] for x in plan.rank_batches(0)]
    by_key_a = {t["key"]: (i, t) for imgs, ts in a for i, t in zip(imgs, ts)}
    for imgs, ts in b:
        for img, t in zip(imgs, ts):
            assert torch.equal(by_key_a[t["key"]][0], img)
            assert torch.equal(by_key_a[t["key"]][1]["masks"], t["masks"])
    # and the parallel loader is deterministic run to run
    again = build_loader(dataclasses.replace(CFG, workers=2), synth_shards, "train", rank=0, world_size=1, seed=1, train=True)
    assert_same_batches(b, list(again))


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 4), (2, 1)])
def test_resume_is_step_exact(synth_shards, workers, stop):
    cfg = dataclasses.replace(CFG, workers=workers)
    full = build_loader(cfg, synth_shards, "train", rank=0, world_size=1, seed=7, train=True)
    full.set_epoch(1)
    uninterrupted = list(full)
    first = build_loader(cfg, synth_shards, "train", rank=0, world_size=1, seed=7, train=True)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    del it
    assert state["epoch"] == 1 and state["batches_consumed"] == stop
    resumed = build_loader(cfg, synth_shards, "train", rank=0, world_size=1, seed=7, train=True)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the trainer may call it again: same epoch keeps the position
    decoded = []
    if workers == 0:
        inner = resumed.transform

        class Counting:  # records which samples get decoded
            def decode(self, key, *a, **k):
                decoded.append(key)
                return inner.decode(key, *a, **k)

        resumed.transform = Counting()
    tail = list(resumed)
    assert_same_batches(head + tail, uninterrupted)
    if workers == 0:
        assert decoded == [k for b in keys_of(uninterrupted[stop:]) for k in b], "skipped samples are not decoded"


def test_state_from_another_layout_is_refused(synth_shards):
    a = build_loader(CFG, synth_shards, "train", rank=0, world_size=1, seed=0, train=True)
    it = iter(a)
    next(it)
    state = a.state_dict()
    b = build_loader(dataclasses.replace(CFG, batch_size=3), synth_shards, "train", rank=0, world_size=1, seed=0, train=True)
    with pytest.raises(LoaderStateError, match=r"batch_sizes: \[2\] -> \[3\]"):
        b.load_state_dict(state)
    c = build_loader(CFG, synth_shards, "train", rank=0, world_size=1, seed=1, train=True)
    with pytest.raises(LoaderStateError, match="seed: 0 -> 1"):
        c.load_state_dict(state)
    # at an epoch boundary a new layout is fine (resume on another number of GPUs)
    list(it)
    b.load_state_dict(a.state_dict())
    assert b.epoch == 1 and b.consumed == 0


def test_ranks_with_unequal_batch_sizes(synth_shards):
    cfg = dataclasses.replace(CFG, batch_sizes=[1, 2, 3], workers=1)
    loaders = [build_loader(cfg, synth_shards, "train", rank=r, world_size=3, seed=2, train=True) for r in range(3)]
    assert len({len(ld) for ld in loaders}) == 1 and len(loaders[0]) == 3  # 18 samples / (1+2+3)
    seen = Counter()
    for r, ld in enumerate(loaders):
        batches = list(ld)
        assert [len(i) for i, _ in batches] == [r + 1] * 3
        seen.update(k for b in keys_of(batches) for k in b)
    assert len(seen) == 18 and set(seen.values()) == {1}
    assert loaders[0].plan_summary()["duplicates"] == 0
    with pytest.raises(PlanError, match="fewer than one global batch"):
        build_loader(dataclasses.replace(CFG, batch_size=10), synth_shards, "train", rank=0, world_size=2, seed=0, train=True)
    with pytest.raises(PlanError, match="lists 2 sizes for 3 ranks"):
        build_loader(dataclasses.replace(CFG, batch_sizes=[1, 2]), synth_shards, "train", rank=0, world_size=3, seed=0, train=True)


def test_validation_each_sample_once_deterministic(synth_shards):
    cfg = dataclasses.replace(CFG, batch_size=2, workers=2)
    keys, sizes = [], set()
    for r in range(4):
        ld = build_loader(cfg, synth_shards, "val", rank=r, world_size=4, seed=0, train=False)
        b0, b1 = list(ld), list(ld)  # the second pass is the next epoch: identical for val
        assert_same_batches(b0, b1)
        assert len(b0) == len(ld)
        keys += [k for b in keys_of(b0) for k in b]
        sizes |= {min(i.shape[1:]) for imgs, _ in b0 for i in imgs}
    assert sorted(keys) == sorted(k for k, _, _ in iter_split(synth_shards, "val"))
    assert sizes == {80}, "val resizes to the largest train size"


def test_load_batch_replays_exact_tensors(synth_shards):
    ld = build_loader(CFG, synth_shards, "train", rank=0, world_size=1, seed=3, train=True)
    ld.set_epoch(2)
    batches = list(ld)
    for images, targets in batches[2:4]:
        keys = [t["key"] for t in targets]
        assert_same_batches([ld.load_batch(keys, epoch=2)], [(images, targets)])
    raw = {k: (k, j, m) for k, j, m in iter_split(synth_shards, "train")}
    images, targets = batches[5]
    assert ld.read_raw([t["key"] for t in targets]) == [raw[t["key"]] for t in targets]
    again = ld.decode_samples([raw[t["key"]] for t in targets], epoch=2)
    assert_same_batches([again], [(images, targets)])
    with pytest.raises(KeyError, match="not in split 'train'"):
        ld.load_batch(["nope"], epoch=0)


def test_subset_and_rfs(synth_shards):
    ld = build_loader(dataclasses.replace(CFG, subset=8, batch_size=2), synth_shards, "train", rank=0, world_size=1, seed=0, train=True)
    assert len(ld) == 4 and len({k for b in keys_of(list(ld)) for k in b}) == 8
    rfs = build_loader(dataclasses.replace(CFG, repeat_factor_threshold=0.5), synth_shards, "train", rank=0, world_size=1,
                       seed=0, train=True)
    s = rfs.plan_summary()
    assert s["rfs_repeats"] > 0 and s["steps"] == len(rfs) == -(-(18 + s["rfs_repeats"]) // 2)
    lens = set()
    for e in range(3):
        rfs.set_epoch(e)
        lens.add(len(rfs))
    assert len(lens) == 1, "steps per epoch do not change with repeat-factor sampling"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 4), workers=st.integers(0, 3), bs=st.lists(st.integers(1, 3), min_size=4, max_size=4),
       chunk=st.integers(1, 5), mix=st.integers(1, 3), group=st.booleans(), seed=st.integers(0, 99), data=st.data())
def test_reading_from_any_step_gives_the_planned_samples(synth_shards, world, workers, bs, chunk, mix, group, seed, data):
    """What a worker reads from local batch k on (a resume) is exactly the plan's samples, for any layout."""
    from fashionseg.data.loader import iter_raw_batches
    from fashionseg.data.plan import PlanConfig, build_plan
    from fashionseg.data.shards.reader import read_manifest

    split = read_manifest(synth_shards)["splits"]["train"]
    bs = bs[:world]
    if sum(bs) > split["num_samples"]:
        return
    plan = build_plan(split, seed=seed, epoch=1, batch_sizes=bs, workers=workers, train=True,
                      cfg=PlanConfig(chunk_size=chunk, mix_chunks=mix, group_aspect_ratio=group))
    for c in plan.consumers.values():
        k = data.draw(st.integers(0, len(c.batches)))
        got = [[key for _, (key, _, _) in b] for b in iter_raw_batches(synth_shards, plan, c.batches[k:])]
        assert got == [[plan.pool.keys[plan.stream_pool[p]] for p in b] for b in c.batches[k:]]
