"""The train/val split: stratified, deterministic, and never silently empty."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.shards.split import stratified_split

from source_helpers import encode_column_major, kaggle_src


@pytest.mark.parametrize("n, fraction", [(2, 0.5), (2, 0.9), (2, 0.1), (3, 0.5), (3, 0.95), (5, 0.2)])
def test_both_splits_have_an_image_once_there_are_two(n, fraction):
    for seed, cats in itertools.product(range(5), ([{i} for i in range(n)], [{0}] * n, [set()] * n, [{0, i} for i in range(n)])):
        split = stratified_split(cats, [f"img{i}" for i in range(n)], fraction, seed)
        assert set(split) == {"train", "val"}, (seed, cats, split)
        assert split == stratified_split(cats, [f"img{i}" for i in range(n)], fraction, seed)  # deterministic


def test_no_val_when_asked_for_none_or_with_one_image():
    assert stratified_split([{1}, {2}], ["a", "b"], 0.0, 0) == ["train", "train"]
    assert stratified_split([{1}], ["a"], 0.5, 0) == ["train"]


def test_stratification_is_kept_where_it_was_already_non_empty():
    rng = np.random.default_rng(0)
    cats = [{int(c) for c in rng.choice(6, 2, replace=False)} for _ in range(200)]
    split = stratified_split(cats, [str(i) for i in range(200)], 0.25, 0)
    assert abs(split.count("val") - 50) <= 3
    for c in range(6):
        have = [s for cs, s in zip(cats, split) if c in cs]
        assert abs(have.count("val") / len(have) - 0.25) < 0.05


def test_build_of_two_images_fills_both_splits_and_one_image_says_why_val_is_empty(tmp_path):
    m = np.eye(6, 7, dtype=np.uint8)
    header = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    src = kaggle_src(tmp_path / "two", [["a", encode_column_major(m), 6, 7, 1, ""], ["b", encode_column_major(m), 6, 7, 2, ""]],
                     {"a": (6, 7), "b": (6, 7)}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out2"), val_fraction=0.5, workers=1, progress=False))
    assert code == 0 and report["warnings"] == []
    assert {s: v["num_samples"] for s, v in read_manifest(tmp_path / "out2")["splits"].items()} == {"train": 1, "val": 1}
    src = kaggle_src(tmp_path / "one", [["a", encode_column_major(m), 6, 7, 1, ""]], {"a": (6, 7)}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out1"), val_fraction=0.5, workers=1, progress=False))
    assert code == 0 and report["warnings"] == [
        "split 'val' is empty: the source has 1 annotated image(s), at least 2 are needed for a val split"]
