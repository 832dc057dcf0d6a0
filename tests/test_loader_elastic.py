"""Elastic resume over real shards: a loader state saved mid-epoch on one layout resumes on
another (world size, per-rank batch sizes, workers), reading each sample of the epoch once plus
counted duplicates, with the augmentation each sample had; the same layout stays bit-exact."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import pytest
import torch

from fashionseg.data.loader import LoaderConfig, LoaderStateError, build_loader
from fashionseg.data.shards.reader import iter_split
from test_loader import assert_same_batches, keys_of

CFG = LoaderConfig(workers=0, min_size=[48, 64], max_size=128, color_jitter=0.3, chunk_size=3, mix_chunks=2)
SEED = 5


def layout(shards, batch_sizes, cfg=CFG, seed=SEED, epoch=1):
    loaders = [build_loader(cfg, shards, "train", rank=r, world_size=len(batch_sizes), batch_sizes=batch_sizes, seed=seed)
               for r in range(len(batch_sizes))]
    for ld in loaders:
        ld.set_epoch(epoch)
    return loaders


def run(loaders, steps=None):
    """Every rank's next `steps` batches (all of the epoch's rest when None), in lockstep."""
    its = [iter(ld) for ld in loaders]
    out = [[] for _ in loaders]
    while steps is None or len(out[0]) < steps:
        got = [next(it, None) for it in its]
        if got[0] is None:
            assert all(g is None for g in got), "ranks end the epoch together"
            break
        for o, g in zip(out, got):
            o.append(g)
    return out


def all_keys(per_rank):
    return Counter(k for batches in per_rank for b in keys_of(batches) for k in b)


@pytest.mark.parametrize("a,b,workers_b", [([2, 3], [1, 2, 2], 2), ([2, 3], [4], 0), ([3], [5], 0)])
def test_resume_on_another_layout_reads_the_rest_once(synth_shards, a, b, workers_b):
    train = Counter(k for k, _, _ in iter_split(synth_shards, "train"))
    first = layout(synth_shards, a)
    head = run(first, steps=2)
    states = [ld.state_dict() for ld in first]
    assert all(s == states[0] for s in states), "the position is the same on every rank"
    st = states[0]
    assert st["samples_consumed"] + st["duplicates_consumed"] == 2 * sum(a)

    second = layout(synth_shards, b, dataclasses.replace(CFG, workers=workers_b))
    for ld in second:
        ld.load_state_dict(st)
        ld.set_epoch(1)  # the trainer may call it again: the same epoch keeps the position
    note = second[0].layout_change
    assert note is not None and f"{st['samples_consumed']} of 18 samples consumed" in note
    assert f"on {len(b)} rank" in note and f"batch {','.join(map(str, b))}" in note
    assert {ld.samples_consumed() for ld in second} == {st["samples_consumed"]}
    assert second[0].samples_per_epoch == 18
    left = {ld.steps_left() for ld in second}
    assert left == {-(-(18 - st["samples_consumed"]) // sum(b))}, "equal steps on every rank of the new layout"
    decoded = []
    if workers_b == 0:  # in this process: count what gets decoded
        for ld in second:
            inner = ld.transform

            class Counting:
                def decode(self, key, *args, _inner=inner, **kw):
                    decoded.append(key)
                    return _inner.decode(key, *args, **kw)

            ld.transform = Counting()
    plan = second[0].plan()
    assert plan.duplicates == min(left) * sum(b) - (18 - st["samples_consumed"])
    tail = run(second)
    assert [len(t) for t in tail] == [left.pop()] * len(b)
    assert all(len(imgs) == bs for t, bs in zip(tail, b) for imgs, _ in t), "full batches of the new sizes"
    if workers_b == 0:
        assert Counter(decoded) == all_keys(tail), "only the rest of the epoch is decoded"
    seen = all_keys(head) + all_keys(tail)
    assert set(seen) == set(train), "every training sample is read"
    assert sum(seen.values()) - 18 == st["duplicates_consumed"] + plan.duplicates, "nothing twice but the counted duplicates"
    if plan.duplicates:
        assert f"{plan.duplicates} duplicates added" in note
    # the re-planned samples carry the augmentation they had on the old layout (seed, epoch, key)
    for batches in tail:
        for images, targets in batches:
            assert_same_batches([(images, targets)], [second[0].load_batch([t["key"] for t in targets], epoch=1)])
    for ld in second:
        assert ld.epoch == 2 and ld.steps_left() == ld.steps_per_epoch == len(ld) == -(-18 // sum(b))
        assert ld.state_dict()["samples_consumed"] == 0


def test_replanned_epoch_resumes_bit_exact_on_its_own_layout(synth_shards):
    """A -> B mid-epoch, B runs two steps and saves: B again continues B's plan step for step."""
    first = layout(synth_shards, [2, 3])
    run(first, steps=1)
    st = first[0].state_dict()
    b = [3, 1]
    second = layout(synth_shards, b)
    for ld in second:
        ld.load_state_dict(st)
    run(second, steps=2)
    mid = second[0].state_dict()
    uninterrupted = run(second)
    third = layout(synth_shards, b)
    for ld in third:
        ld.load_state_dict(mid)
        assert ld.layout_change is None and ld.steps_left() == len(uninterrupted[0])
    resumed = run(third)
    for x, y in zip(resumed, uninterrupted):
        assert_same_batches(x, y)


def test_epoch_end_state_starts_the_next_epoch_on_any_layout(synth_shards):
    first = layout(synth_shards, [2, 3], dataclasses.replace(CFG, workers=1))
    run(first)
    st = first[0].state_dict()
    assert st["epoch"] == 2 and st["samples_consumed"] == st["duplicates_consumed"] == 0
    # an epoch end may also change the stream options (chunks, repeat-factor sampling)
    other = dataclasses.replace(CFG, chunk_size=5, repeat_factor_threshold=0.5)
    ld = layout(synth_shards, [2], other, epoch=0)[0]
    ld.load_state_dict(st)
    assert ld.samples_per_epoch > 18, "repeat-factor copies"
    assert ld.epoch == 2 and ld.steps_left() == ld.steps_per_epoch == -(-ld.samples_per_epoch // 2)
    assert ld.samples_consumed() == 0
    assert ld.layout_change.startswith("data position: epoch 2 starts on 1 rank x batch 2, 0 workers (was 2 ranks x batch 2,3, 1 worker)")
    assert keys_of(run([ld])[0]) == [[ld.pool.keys[i] for i in b] for b in ld.plan(2).rank_batches(0)]


def test_what_cannot_continue_is_refused_by_name(synth_shards, tmp_path):
    first = layout(synth_shards, [2])
    run(first, steps=2)
    st = first[0].state_dict()
    with pytest.raises(LoaderStateError, match="seed: 5 -> 6"):
        layout(synth_shards, [2], seed=6)[0].load_state_dict(st)
    with pytest.raises(LoaderStateError, match="subset: None -> 12"):
        layout(synth_shards, [2], dataclasses.replace(CFG, subset=12))[0].load_state_dict(st)
    with pytest.raises(LoaderStateError, match=r"mid-epoch.*chunk_size: 3 -> 4.*only at an epoch end"):
        layout(synth_shards, [2], dataclasses.replace(CFG, chunk_size=4))[0].load_state_dict(st)
    # the same shard names and counts with other contents (a rebuilt split)
    other = tmp_path / "shards"
    shutil.copytree(synth_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "f" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LoaderStateError, match="shard_files"):
        layout(other, [2])[0].load_state_dict(st)
    old = {"epoch": 1, "batches_consumed": 2, "fingerprint": "x", "data_fingerprint": "y", "layout": {}}
    with pytest.raises(LoaderStateError, match="batches_consumed.*record no consumed set"):
        layout(synth_shards, [2])[0].load_state_dict(old)


def test_state_survives_torch_save_weights_only(synth_shards, tmp_path):
    """Checkpoints are read with torch.load(weights_only=True): the state is plain data."""
    ld = layout(synth_shards, [2, 2])
    run(ld, steps=3)
    st = ld[1].state_dict()
    torch.save({"loader": st}, tmp_path / "s.pth")
    assert torch.load(tmp_path / "s.pth", weights_only=True)["loader"] == st
