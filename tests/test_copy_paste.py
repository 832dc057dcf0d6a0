"""Instance copy-paste (`data.copy_paste`, fashionseg/data/copy_paste.py): exact masks, boxes from
masks, the min-area rule, and the same tensors for (seed, epoch, key) whatever the layout or replay."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fashionseg.data.copy_paste import boxes_of, paste, paste_draw, runs_of
from fashionseg.data.loader import LoaderConfig, build_loader
from test_loader import assert_same_batches

CFG = LoaderConfig(workers=0, min_size=[48, 64, 80], max_size=128, hflip=0.5, color_jitter=0.3, chunk_size=3, mix_chunks=2,
                   copy_paste=1.0)


def make(shards, cfg=CFG, batch_sizes=(2,), rank=0, seed=0):
    return build_loader(cfg, shards, "train", rank=rank, world_size=len(batch_sizes), batch_sizes=list(batch_sizes), seed=seed)


def by_key(loaders, epoch=0):
    """{key: (image, target)} of one epoch over every rank of a layout."""
    out = {}
    for ld in loaders:
        ld.set_epoch(epoch)
        for images, targets in ld:
            for img, t in zip(images, targets):
                if t["key"] in out:  # a counted duplicate: the same tensors
                    assert_same_batches([([img], [t])], [([out[t["key"]][0]], [out[t["key"]][1]])])
                out[t["key"]] = (img, t)
    return out


def wire(masks_hw: list[np.ndarray], labels, attrs) -> dict:
    """A decode()-style target of row-major [H, W] masks."""
    m = np.stack(masks_hw).transpose(0, 2, 1).astype(bool)  # [K, W, H]
    h, w = masks_hw[0].shape
    return {"boxes": boxes_of(m), "labels": np.asarray(labels, np.int64), "masks": runs_of(m, h, w),
            "attributes": np.asarray(attrs, np.float32), "image_id": 7, "key": "k", "orig_size": (h, w)}


def test_paste_is_exact_and_drops_small_remnants():
    H, W = 12, 10
    big, small, sliver, lone = (np.zeros((H, W), bool) for _ in range(4))
    big[2:10, 1:9] = True  # 64 px, partly covered
    sliver[0:2, 0:4] = True  # 8 px, 6 of them covered -> 2 left < min_area 4: dropped
    lone[11, 9] = True  # 1 px, never covered: stays although under min_area
    small[4:6, 4:6] = True  # 4 px, fully covered: dropped
    target = wire([big, sliver, lone, small], [1, 2, 3, 4], np.eye(4, 5))
    p1, p2, p3 = (np.zeros((H, W), bool) for _ in range(3))
    p1[0:6, 3:7] = True
    p2[0:2, 0:2] = True  # next to p1; with it covers 6 sliver pixels
    p3[8:12, 0:2] = True  # not chosen: must not be pasted
    src = wire([p1, p2, p3], [5, 6, 7], np.eye(3, 5) * 2)
    img = np.zeros((3, H, W), np.uint8)
    src_img = np.full((3, H, W), 200, np.uint8)
    out_img, out = paste(img, target, src_img, src, np.array([0, 1]), min_area=4)
    cover = p1 | p2
    assert (out_img[:, cover] == 200).all() and (out_img[:, ~cover] == 0).all()
    masks = out["masks"].planes().transpose(0, 2, 1)  # [K, H, W]
    assert out["labels"].tolist() == [1, 3, 5, 6]
    assert np.array_equal(masks[0], big & ~cover), "the occluded instance loses exactly the pasted pixels"
    assert np.array_equal(masks[1], lone)
    assert np.array_equal(masks[2], p1) and np.array_equal(masks[3], p2), "pasted masks are the partner's, bit for bit"
    assert not (masks[:2].any(0) & cover).any(), "no instance beneath keeps a pasted pixel"
    assert np.array_equal(out["attributes"], np.concatenate([np.eye(4, 5)[[0, 2]], np.eye(3, 5)[[0, 1]] * 2]))
    ys, xs = np.nonzero(big & ~cover)
    assert out["boxes"][0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert out["boxes"].dtype == np.float32 and out["key"] == "k" and out["image_id"] == 7


def test_paste_draw_is_a_pure_function_and_never_picks_itself():
    draws = [paste_draw(3, 1, f"key{i}", i, 5, 0.5) for i in range(200)]
    again = [paste_draw(3, 1, f"key{i}", i, 5, 0.5) for i in range(200)]
    assert [d and d.partner for d in draws] == [d and d.partner for d in again]
    pasted = [(i, d) for i, d in enumerate(draws) if d is not None]
    assert 60 < len(pasted) < 140, "about prob of the samples"
    assert all(d.partner != i and 0 <= d.partner < 5 for i, d in pasted)
    assert paste_draw(3, 1, "key0", 0, 5, 0.0) is None and paste_draw(3, 1, "key0", 0, 1, 1.0) is None


def test_loader_output_masks_boxes_and_layout(synth_shards):
    plain, pasted = by_key([make(synth_shards, dataclasses.replace(CFG, copy_paste=0.0))]), by_key([make(synth_shards)])
    cp = make(synth_shards).copy_paste
    assert plain.keys() == pasted.keys()
    seen_pasted = 0
    for key, (img, t) in pasted.items():
        img0, t0 = plain[key]
        n = t["boxes"].shape[0]
        assert img.dtype == torch.uint8 and img.shape == img0.shape
        assert t["masks"].shape == (n, *img.shape[1:]) and t["masks"].dtype == torch.uint8
        assert t["masks"].stride() == t0["masks"].stride(), "the loader's column-major layout"
        assert t["attributes"].shape == (n, t0["attributes"].shape[1]) and t["labels"].dtype == torch.int64
        m = t["masks"].bool()
        ys, xs = m.any(1), m.any(2)  # [N, W], [N, H]
        expect = torch.stack([ys.int().argmax(1), xs.int().argmax(1), ys.shape[1] - ys.flip(1).int().argmax(1),
                              xs.shape[1] - xs.flip(1).int().argmax(1)], 1).float()
        assert torch.equal(t["boxes"], expect), "boxes are the masks' boxes"
        got = cp.partner(key, 0, tuple(img.shape[1:]))
        assert got is not None
        src_img, src, chosen = got
        k = len(chosen)
        assert torch.equal(t["masks"][n - k:], torch.from_numpy(src["masks"].planes()[chosen]).transpose(1, 2).to(torch.uint8))
        assert t["labels"][n - k:].tolist() == src["labels"][chosen].tolist()
        cover = t["masks"][n - k:].bool().any(0)
        assert torch.equal(img[:, cover], torch.from_numpy(src_img)[:, cover])
        assert torch.equal(img[:, ~cover], img0[:, ~cover]), "outside the paste the sample's own augmented image"
        assert not (m[: n - k] & cover).any()
        # every kept instance of the sample is its own mask minus the pasted pixels
        own = t0["masks"].bool() & ~cover
        kept = [int(j) for j in range(own.shape[0]) if own[j].sum() == t0["masks"][j].sum() or own[j].sum() >= CFG.copy_paste_min_area]
        assert torch.equal(m[: n - k], own[kept]) and t["labels"][: n - k].tolist() == t0["labels"][kept].tolist()
        seen_pasted += 1
    assert seen_pasted == len(pasted) == 18


def test_same_tensors_on_any_layout_and_worker_count(synth_shards):
    cfg = dataclasses.replace(CFG, copy_paste=0.5)
    one = by_key([make(synth_shards, cfg)], epoch=1)
    other = by_key([make(synth_shards, dataclasses.replace(cfg, workers=2), batch_sizes=(1, 3), rank=r) for r in range(2)], epoch=1)
    assert one.keys() == other.keys()
    for k in one:
        assert_same_batches([([one[k][0]], [one[k][1]])], [([other[k][0]], [other[k][1]])])
    plain = by_key([make(synth_shards, dataclasses.replace(cfg, copy_paste=0.0))], epoch=1)
    changed = sum(not torch.equal(one[k][0], plain[k][0]) for k in one)
    assert 0 < changed < len(one), "prob 0.5 pastes onto some samples, not all"
    later = by_key([make(synth_shards, cfg)], epoch=2)
    assert any(not torch.equal(one[k][0], later[k][0]) for k in one), "a new draw each epoch"


def test_prob_zero_is_the_feature_absent(synth_shards):
    absent = {f.name: getattr(CFG, f.name) for f in dataclasses.fields(LoaderConfig) if not f.name.startswith("copy_paste")}
    a, b = make(synth_shards, LoaderConfig(**absent)), make(synth_shards, dataclasses.replace(CFG, copy_paste=0.0))
    assert a.copy_paste is None and b.copy_paste is None
    assert_same_batches(list(a), list(b))


def test_replayed_batch_equals_the_original(synth_shards):
    ld = make(synth_shards)
    ld.set_epoch(1)
    batches = list(ld)
    for images, targets in batches[:4]:
        assert_same_batches([(images, targets)], [ld.load_batch([t["key"] for t in targets], epoch=1)])


@pytest.mark.parametrize("bad, message", [({"copy_paste": 1.5}, "data.copy_paste is a probability"),
                                          ({"copy_paste": -0.1}, "data.copy_paste is a probability"),
                                          ({"copy_paste_min_area": 0}, "data.copy_paste_min_area must be >= 1")])
def test_bad_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LoaderConfig(**bad)
