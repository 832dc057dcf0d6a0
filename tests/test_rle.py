"""Kaggle RLE <-> COCO RLE: bit-exact against pycocotools, odd sizes, and the transpose trap."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util

from fashionseg.data import rle


@st.composite
def masks(draw, max_side=23):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    density = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return (np.random.default_rng(seed).random((h, w)) < density).astype(np.uint8)


@settings(max_examples=200, deadline=None)
@given(masks())
def test_kaggle_to_coco_matches_pycocotools_bit_exactly(m):
    h, w = m.shape
    encoded = rle.encode_kaggle(m)
    ref = mask_util.encode(np.asfortranarray(m))
    if not m.any():
        assert encoded == ""
        return
    coco, repaired = rle.kaggle_to_coco(encoded, h, w)
    assert not repaired
    assert coco["size"] == [h, w]
    assert coco["counts"] == ref["counts"].decode("ascii")  # the same compressed string, not just the same mask
    np.testing.assert_array_equal(rle.decode_kaggle(encoded, h, w), m)
    np.testing.assert_array_equal(rle.decode_coco(coco), m)
    assert rle.encode_kaggle(rle.decode_coco(coco)) == encoded
    assert rle.encode_coco(m)["counts"] == coco["counts"]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 17), st.integers(1, 17), st.data())
def test_overlapping_and_unsorted_runs_decode_to_their_union(h, w, data):
    total = h * w
    runs = data.draw(st.lists(st.tuples(st.integers(1, total), st.integers(1, total)), min_size=1, max_size=6))
    runs = [(s, min(n, total - s + 1)) for s, n in runs]
    expect = np.zeros(total, np.uint8)
    for s, n in runs:
        expect[s - 1 : s - 1 + n] = 1
    expect = expect.reshape(w, h).T  # column-major: pixel = x*H + y + 1
    encoded = " ".join(f"{s} {n}" for s, n in runs)
    coco, repaired = rle.kaggle_to_coco(encoded, h, w)
    np.testing.assert_array_equal(rle.decode_coco(coco), expect)
    np.testing.assert_array_equal(rle.decode_kaggle(encoded, h, w), expect)
    assert coco["counts"] == mask_util.encode(np.asfortranarray(expect))["counts"].decode()
    by_start = sorted(runs, key=lambda r: r[0])  # stable, like the parser
    unsorted = [s for s, _ in runs] != [s for s, _ in by_start]
    overlap = any(b[0] < a[0] + a[1] for a, b in zip(by_start, by_start[1:]))
    assert repaired == (unsorted or overlap)


def test_transpose_trap_column_major_numbering():
    # H=3, W=5: pixels 2..4 are (y=1,x=0), (y=2,x=0), (y=0,x=1) in column-major numbering.
    m = rle.decode_kaggle("2 3", 3, 5)
    expect = np.zeros((3, 5), np.uint8)
    expect[1, 0] = expect[2, 0] = expect[0, 1] = 1
    np.testing.assert_array_equal(m, expect)
    # the row-major reading (the usual tutorial bug) yields a different, plausible mask
    row_major = np.zeros(15, np.uint8)
    row_major[1:4] = 1
    assert not np.array_equal(m, row_major.reshape(3, 5))
    coco, _ = rle.kaggle_to_coco("2 3", 3, 5)
    np.testing.assert_array_equal(mask_util.decode({"size": [3, 5], "counts": coco["counts"].encode()}), expect)


@pytest.mark.parametrize("encoded,why", [
    ("14 5", "leaves"),  # 3x5 grid has 15 pixels: 14..18 leaves it
    ("0 2", "before pixel 1"),
    ("3 0", "length <= 0"),
    ("1 2 3", "odd number"),
    ("a 2", "non-integer"),
    ("", "empty"),
])
def test_bad_runs_raise_with_reason(encoded, why):
    with pytest.raises(rle.RLEError, match=why):
        rle.kaggle_to_coco(encoded, 3, 5)


def test_overlap_is_reported_as_repaired():
    coco, repaired = rle.kaggle_to_coco("1 4 3 4", 3, 5)
    assert repaired
    np.testing.assert_array_equal(rle.decode_coco(coco).flatten(order="F")[:8], [1] * 6 + [0, 0])
