"""Masks transformed in the RLE domain equal transforming the decoded mask, bit for bit."""
from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from fashionseg.data import rle
from fashionseg.data.transforms import (Geometry, SampleTransform, apply_jitter, aug_params, decode_counts, output_size,
                                        mask_runs, rle_counts)
from fashionseg.data.vocab import Vocab


def masks_strategy(max_side=23):
    return st.tuples(st.integers(1, max_side), st.integers(1, max_side)).flatmap(
        lambda hw: arrays(np.uint8, hw, elements=st.integers(0, 1)))


def _src(n_out: int, n_in: int) -> list[int]:
    # output pixel centre (i + 1/2) * n_in / n_out, in exact arithmetic, lies in source pixel floor(.)
    return [int((Fraction(2 * i + 1, 2) * n_in / n_out)) for i in range(n_out)]


def reference(mask: np.ndarray, oh: int, ow: int, flip: bool) -> np.ndarray:
    """Decode-then-transform: nearest resize (half-pixel centres) of the full mask, then mirror.
    Same rule as interpolate(mode="nearest-exact"), which agrees except where float32 rounding
    breaks an exact tie (tested below)."""
    out = mask[_src(oh, mask.shape[0])][:, _src(ow, mask.shape[1])]
    return out[:, ::-1] if flip else out


def test_nearest_rule_is_torch_nearest_exact_up_to_float_ties():
    for n_in in range(1, 40):
        for n_out in range(1, 40):
            t = torch.arange(n_in, dtype=torch.float64)[None, None, :, None]
            r = torch.nn.functional.interpolate(t, size=(n_out, 1), mode="nearest-exact")[0, 0, :, 0].long().tolist()
            mine = _src(n_out, n_in)
            for i, (a, b) in enumerate(zip(r, mine)):
                assert a == b or (2 * i + 1) * n_in % (2 * n_out) == 0, (n_in, n_out, i)


@settings(max_examples=400, deadline=None)
@given(masks_strategy(40))
def test_rle_counts_matches_pycocotools(mask):
    coco = rle.encode_coco(mask)
    counts = rle_counts(coco["counts"])
    vals = np.zeros(len(counts), np.uint8)
    vals[1::2] = 1
    back = np.repeat(vals, counts).reshape(mask.shape[1], mask.shape[0]).T
    assert np.array_equal(back, mask)
    assert counts.sum() == mask.size


def test_rle_counts_large_runs():
    # long runs need several 5-bit groups and negative deltas: a 600x900 grid with a few big blocks
    m = np.zeros((600, 900), np.uint8)
    m[10:590, 5:400] = 1
    m[:, 700:701] = 1
    m[599, 899] = 1
    c = rle_counts(rle.encode_coco(m)["counts"])
    vals = np.zeros(len(c), np.uint8)
    vals[1::2] = 1
    assert np.array_equal(np.repeat(vals, c).reshape(900, 600).T, m)


def _check(ms: list[np.ndarray], oh: int, ow: int, flip: bool) -> None:
    h, w = ms[0].shape
    runs, boxes, kept = mask_runs([rle.encode_coco(m)["counts"] for m in ms], Geometry(h, w, oh, ow, flip))
    masks = runs.paint()
    refs = [reference(m, oh, ow, flip) for m in ms]
    assert kept.tolist() == [i for i, r in enumerate(refs) if r.any()], "exactly the vanished masks are dropped"
    assert masks.shape == (len(kept), oh, ow) and masks.dtype == torch.uint8
    for j, i in enumerate(kept.tolist()):
        assert np.array_equal(masks[j].numpy(), refs[i])
        ys, xs = np.nonzero(refs[i])
        assert boxes[j].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@settings(max_examples=400, deadline=None)
@given(masks_strategy(), st.integers(1, 47), st.integers(1, 47), st.booleans())
def test_rle_resize_flip_equals_decoded(mask, oh, ow, flip):
    _check([mask], oh, ow, flip)


@settings(max_examples=200, deadline=None)
@given(st.tuples(st.integers(1, 19), st.integers(1, 19), st.integers(1, 5)).flatmap(
    lambda t: st.lists(arrays(np.uint8, t[:2], elements=st.integers(0, 1)), min_size=t[2], max_size=t[2])),
    st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_many_masks_in_one_pass(ms, oh, ow, flip):
    _check(ms, oh, ow, flip)


def test_decode_counts_many_strings():
    rng = np.random.default_rng(1)
    ms = [(rng.random((40, 70)) < p).astype(np.uint8) for p in (0.0, 0.02, 0.5, 1.0)] + [np.eye(40, 70, dtype=np.uint8)]
    counts, owner, m = decode_counts([rle.encode_coco(x)["counts"] for x in ms])
    for i, x in enumerate(ms):
        c = counts[owner == i]
        assert m[owner == i].tolist() == list(range(len(c)))
        vals = np.zeros(len(c), np.uint8)
        vals[1::2] = 1
        assert np.array_equal(np.repeat(vals, c).reshape(70, 40).T, x)


def test_upscale_downscale_realistic_sizes():
    rng = np.random.default_rng(2)
    h, w = 301, 203
    ms = []
    for _ in range(6):
        m = np.zeros((h, w), np.uint8)
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
        m[y : y + rng.integers(1, 120), x : x + rng.integers(1, 90)] = 1
        ms.append(m)
    for oh, ow, flip in ((800, 539, True), (150, 101, False), (97, 66, True), (301, 203, True)):
        _check(ms, oh, ow, flip)


def make_sample(h=64, w=48, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    big = np.zeros((h, w), np.uint8)
    big[5:50, 4:40] = 1
    tiny = np.zeros((h, w), np.uint8)
    tiny[30, 21] = 1  # one pixel: vanishes at half size unless it is the sampled one
    instances = [
        {"category_id": 10, "attribute_ids": [115, 317], "segmentation": rle.encode_coco(big)},
        {"category_id": 31, "attribute_ids": [], "segmentation": rle.encode_coco(tiny)},
    ]
    return buf.getvalue(), {"image_id": "x", "height": h, "width": w, "orig_height": h, "orig_width": w,
                            "instances": instances}, [big, tiny]


def test_sample_transform_targets():
    vocab = Vocab.default()
    jpg, meta, masks = make_sample()
    t = SampleTransform(vocab, min_size=[32], max_size=1000, hflip=1.0, color_jitter=0.0, train=True, seed=3)
    img, tgt = t("k0", jpg, meta, epoch=0, image_id=7)
    assert img.shape == (3, 43, 32) and img.dtype == torch.uint8
    oh, ow = output_size(64, 48, 32, 1000)
    assert (oh, ow) == (43, 32)
    ref_big = reference(masks[0], oh, ow, True)
    ref_tiny = reference(masks[1], oh, ow, True)
    n = 1 + int(ref_tiny.any())
    assert tgt["masks"].shape == (n, oh, ow)
    assert torch.equal(tgt["masks"][0], torch.from_numpy(ref_big.copy()))
    assert tgt["labels"].tolist() == [vocab.category_index(10), vocab.category_index(31)][:n]
    # boxes from the transformed masks: xyxy with exclusive max edges (COCO toBbox convention)
    for m, b in zip(tgt["masks"], tgt["boxes"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    a = tgt["attributes"][0]
    assert a.shape == (vocab.num_attributes,) and a.sum() == 2
    assert a[vocab.attribute_index(115)] == 1 and a[vocab.attribute_index(317)] == 1
    assert tgt["image_id"].item() == 7 and tgt["key"] == "k0" and tgt["orig_size"] == (64, 48)
    # the image flipped too: compare with the unflipped decode
    t0 = SampleTransform(vocab, min_size=[32], max_size=1000, hflip=0.0, train=True, seed=3)
    img0, _ = t0("k0", jpg, meta, epoch=0, image_id=7)
    assert torch.equal(img, img0.flip(-1))


def test_vanished_instances_are_dropped():
    vocab = Vocab.default()
    jpg, meta, masks = make_sample()
    t = SampleTransform(vocab, min_size=[8], max_size=1000, hflip=0.0, train=False)
    _, tgt = t("k", jpg, meta, epoch=0, image_id=0)
    g = Geometry(64, 48, *output_size(64, 48, 8, 1000), False)
    kept = [m for m in masks if reference(m, g.out_height, g.out_width, False).any()]
    assert len(kept) == 1 and tgt["masks"].shape[0] == 1 and tgt["attributes"].shape == (1, vocab.num_attributes)
    assert tgt["labels"].tolist() == [vocab.category_index(10)]


def test_augmentation_is_a_function_of_seed_epoch_key():
    vocab = Vocab.default()
    jpg, meta, _ = make_sample()
    t = SampleTransform(vocab, min_size=[24, 32, 40, 48], max_size=1000, hflip=0.5, color_jitter=0.4, train=True, seed=5)
    a = t("key-a", jpg, meta, epoch=2, image_id=0)
    b = t("key-a", jpg, meta, epoch=2, image_id=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])
    ps = {aug_params(5, e, "key-a", min_size=[24, 32, 40, 48], hflip=0.5, color_jitter=0.4) for e in range(20)}
    assert len({p.min_size for p in ps}) > 1 and len({p.flip for p in ps}) == 2
    # eval: deterministic, no flip, no jitter, test size = the largest train size
    ev = SampleTransform(vocab, min_size=[24, 32], max_size=1000, hflip=0.5, color_jitter=0.4, train=False)
    assert ev.params(0, "x") == ev.params(9, "y") and ev.params(0, "x").min_size == 32


def test_jitter_matches_torchvision_chain():
    rng = np.random.default_rng(0)
    u8 = torch.from_numpy(rng.integers(60, 160, (3, 20, 30)).astype(np.uint8))
    for b, c, s in ((1.2, 0.8, 1.3), (0.7, 1.3, 0.6), (1.0, 1.0, 1.0)):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(u8.float() / 255, b), c), s)
        ref = (ref * 255).round().to(torch.uint8)  # no clamping needed in this range
        out = apply_jitter(u8, (b, c, s))
        assert out.dtype == torch.uint8
        assert (out.int() - ref.int()).abs().max() <= 1  # float rounding at .5 only
        assert (out == ref).float().mean() > 0.99


def test_bad_sample_names_the_key():
    from fashionseg.data.transforms import SampleError

    vocab = Vocab.default()
    jpg, meta, _ = make_sample()
    t = SampleTransform(vocab, min_size=[32], max_size=1000, train=False)
    with pytest.raises(SampleError, match="sample 'bad'.*cannot decode"):
        t("bad", b"not a jpeg", meta, epoch=0, image_id=0)
    meta2 = dict(meta, width=47)
    with pytest.raises(SampleError, match="sample 'k'.*json says 47x64"):
        t("k", jpg, meta2, epoch=0, image_id=0)
    meta3 = dict(meta, instances=[dict(meta["instances"][0], category_id=999)])
    with pytest.raises(SampleError, match="category id 999"):
        t("k", jpg, meta3, epoch=0, image_id=0)


def test_large_shrink_decodes_at_reduced_scale():
    """A 2x+ shrink decodes the JPEG at 1/2..1/8 scale (PIL draft): the image stays close to a full
    decode + resize, the masks are exactly the same as always."""
    from torchvision.io import decode_image

    vocab = Vocab.default()
    h, w = 400, 300
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    mask = np.zeros((h, w), np.uint8)
    mask[50:300, 40:200] = 1
    meta = {"height": h, "width": w, "instances": [{"category_id": 1, "attribute_ids": [], "segmentation": rle.encode_coco(mask)}]}
    t = SampleTransform(vocab, min_size=[60], max_size=1000, hflip=0.0, train=True)
    out, tgt = t("big", buf.getvalue(), meta, epoch=0, image_id=0)
    assert out.shape == (3, 80, 60)
    full = TF.resize(decode_image(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)), [80, 60], antialias=True)
    assert (out.float() - full.float()).abs().mean() < 2
    assert torch.equal(tgt["masks"][0], torch.from_numpy(reference(mask, 80, 60, False).copy()))
    # PNG bytes behind the name: no reduced decode, the full decoder handles them
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    out_png, _ = t("png", png.getvalue(), meta, epoch=0, image_id=0)
    assert out_png.shape == (3, 80, 60)
    with pytest.raises(Exception, match="json says 299x400"):
        t("big", buf.getvalue(), dict(meta, width=299), epoch=0, image_id=0)
