"""The loader over real shards: plan order whatever the workers, step-exact resume, replay by key
(elastic resume: tests/test_loader_elastic.py)."""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashionseg.data import rle
from fashionseg.data.loader import LoaderConfig, build_loader
from fashionseg.data.plan import PlanError
from fashionseg.data.shards.reader import iter_split

CFG = LoaderConfig(workers=0, min_size=[48, 64, 80], max_size=128, hflip=0.5, color_jitter=0.3, chunk_size=3, mix_chunks=2)


def make(shards, cfg=CFG, batch_sizes=(2,), rank=0, seed=0):
    return build_loader(cfg, shards, "train", rank=rank, world_size=len(batch_sizes), batch_sizes=list(batch_sizes),
                        seed=seed)


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
    ld = make(synth_shards)
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
            assert img.dtype == torch.uint8 and img.shape[0] == 3 and min(h, w) in (48, 64, 80)
            n = t["boxes"].shape[0]
            assert t["masks"].shape == (n, h, w) and t["masks"].dtype == torch.uint8
            assert t["labels"].dtype == torch.int64 and ((t["labels"] >= 1) & (t["labels"] <= C)).all()
            assert t["attributes"].shape == (n, A)
            assert (t["masks"].flatten(1).sum(1) > 0).all(), "vanished instances are dropped"
            assert t["image_id"].item() == plan.pool.keys.index(t["key"])
    assert ld.epoch == 1 and ld.state_dict()["samples_consumed"] == 0, "an exhausted epoch moves on"
    assert ld.steps_left() == len(ld) == ld.steps_per_epoch == 9


def test_masks_equal_decode_then_transform(synth_shards):
    """End to end against the shard's own RLE: decode, nearest-resize, flip, drop the vanished."""
    from test_transforms import reference

    ld = make(synth_shards, dataclasses.replace(CFG, color_jitter=0.0, hflip=0.5), seed=4)
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
    base = make(synth_shards, dataclasses.replace(CFG, workers=0), seed=1)
    par = make(synth_shards, dataclasses.replace(CFG, workers=2), seed=1)
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
    again = make(synth_shards, dataclasses.replace(CFG, workers=2), seed=1)
    assert_same_batches(b, list(again))


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 4), (2, 1)])
def test_resume_is_step_exact(synth_shards, workers, stop):
    cfg = dataclasses.replace(CFG, workers=workers)
    full = make(synth_shards, cfg, seed=7)
    full.set_epoch(1)
    uninterrupted = list(full)
    first = make(synth_shards, cfg, seed=7)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    del it
    assert state["epoch"] == 1 and state["plan"]["steps"] == stop and state["samples_consumed"] == 2 * stop
    resumed = make(synth_shards, cfg, seed=7)
    resumed.load_state_dict(state)
    assert resumed.layout_change is None and resumed.steps_left() == 9 - stop
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


def test_ranks_with_unequal_batch_sizes(synth_shards):
    cfg = dataclasses.replace(CFG, workers=1)
    loaders = [make(synth_shards, cfg, batch_sizes=[1, 2, 3], rank=r, seed=2) for r in range(3)]
    assert len({len(ld) for ld in loaders}) == 1 and len(loaders[0]) == 3  # 18 samples / (1+2+3)
    seen = Counter()
    for r, ld in enumerate(loaders):
        batches = list(ld)
        assert [len(i) for i, _ in batches] == [r + 1] * 3
        seen.update(k for b in keys_of(batches) for k in b)
    assert len(seen) == 18 and set(seen.values()) == {1}
    assert loaders[0].plan(0).summary()["duplicates"] == 0
    with pytest.raises(PlanError, match="fewer than one global batch"):
        make(synth_shards, batch_sizes=[10, 10])
    with pytest.raises(PlanError, match="2 per-rank batch sizes for 3 ranks"):
        build_loader(CFG, synth_shards, "train", rank=0, world_size=3, batch_sizes=[1, 2], seed=0)


def test_no_validation_mode(synth_shards):
    with pytest.raises(ValueError, match="eval_source"):
        build_loader(CFG, synth_shards, "val", rank=0, world_size=1, batch_sizes=[2], seed=0, train=False)


def test_load_batch_replays_exact_tensors(synth_shards):
    ld = make(synth_shards, seed=3)
    ld.set_epoch(2)
    batches = list(ld)
    for images, targets in batches[2:4]:
        keys = [t["key"] for t in targets]
        assert_same_batches([ld.load_batch(keys, epoch=2)], [(images, targets)])
    with pytest.raises(KeyError, match="not in split 'train'"):
        ld.load_batch(["nope"], epoch=0)


def test_subset_and_rfs(synth_shards):
    ld = make(synth_shards, dataclasses.replace(CFG, subset=8))
    assert len(ld) == 4 and len({k for b in keys_of(list(ld)) for k in b}) == 8
    rfs = make(synth_shards, dataclasses.replace(CFG, repeat_factor_threshold=0.5))
    s = rfs.plan().summary()
    assert s["rfs_repeats"] > 0 and s["ranks"][0]["steps"] == len(rfs) == -(-(18 + s["rfs_repeats"]) // 2)
    lens = set()
    for e in range(3):
        rfs.set_epoch(e)
        lens.add(len(rfs))
        lens.add(rfs.steps_left())
    assert len(lens) == 1, "steps per epoch do not change with repeat-factor sampling"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=st.integers(1, 4), workers=st.integers(0, 3), bs=st.lists(st.integers(1, 3), min_size=4, max_size=4),
       chunk=st.integers(1, 5), mix=st.integers(1, 3), group=st.booleans(), seed=st.integers(0, 99), data=st.data())
def test_reading_from_any_step_gives_the_planned_samples(synth_shards, world, workers, bs, chunk, mix, group, seed, data):
    """What a worker reads from local batch k on (a resume) is exactly the plan's samples, for any
    layout, also in a plan of an epoch's rest (any consumed set; duplicates that may cycle)."""
    from fashionseg.data.loader import iter_raw_batches
    from fashionseg.data.plan import PlanConfig, build_plan
    from fashionseg.data.shards.reader import read_manifest

    split = read_manifest(synth_shards)["splits"]["train"]
    bs = bs[:world]
    if sum(bs) > split["num_samples"]:
        return
    consumed = data.draw(st.none() | st.lists(st.booleans(), min_size=18, max_size=18).map(np.array))
    plan = build_plan(split, seed=seed, epoch=1, batch_sizes=bs, workers=workers,
                      cfg=PlanConfig(chunk_size=chunk, mix_chunks=mix, group_aspect_ratio=group), consumed=consumed)
    for c in plan.consumers.values():
        k = data.draw(st.integers(0, len(c.batches)))
        got = [[key for _, (key, _, _) in b] for b in iter_raw_batches(synth_shards, plan, c.batches[k:])]
        assert got == [[plan.pool.keys[plan.stream_pool[p]] for p in b] for b in c.batches[k:]]
