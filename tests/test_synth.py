"""`shard synth`: exact Kaggle layout, deterministic bytes, sound masks, attributes in the pixels."""
from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from fashionseg.data import rle, synth
from fashionseg.data.vocab import Vocab

MAIN = {synth.SHIRT, synth.TOP, synth.JACKET, synth.PANTS, synth.SHORTS, synth.SKIRT, synth.DRESS, synth.HAT, synth.SHOE, synth.BAG}
PARTS = {synth.COLLAR, synth.SLEEVE, synth.POCKET, synth.NECKLINE, synth.ZIPPER}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(src: Path) -> dict[str, list[dict]]:
    by_image = defaultdict(list)
    with open(src / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_image[row["ImageId"]].append(row)
    return by_image


def test_layout_and_vocabulary(synth_src):
    assert (synth_src / "label_descriptions.json").read_bytes() == \
        resources.files("fashionseg.data").joinpath("label_descriptions.json").read_bytes()
    with open(synth_src / "train.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    vocab = Vocab.from_file(synth_src / "label_descriptions.json")
    rows = _rows(synth_src)
    assert len(rows) == 24 and len(list((synth_src / "train").glob("*.jpg"))) == 24
    for image_id, rs in rows.items():
        im = Image.open(synth_src / "train" / f"{image_id}.jpg")
        assert im.format == "JPEG" and im.mode == "RGB"
        for r in rs:
            assert (int(r["Height"]), int(r["Width"])) == (im.height, im.width)
            assert vocab.has_category(int(r["ClassId"]))
            assert all(vocab.has_attribute(int(a)) for a in r["AttributesIds"].split(",") if a)


def test_deterministic_for_a_seed(tmp_path):
    a = synth.write_dataset(tmp_path / "a", 6, seed=3, size=64, progress=False)
    b = synth.write_dataset(tmp_path / "b", 6, seed=3, size=64, progress=False)
    c = synth.write_dataset(tmp_path / "c", 6, seed=4, size=64, progress=False)
    assert _digest(a) == _digest(b)
    assert _digest(a)["train.csv"] != _digest(c)["train.csv"]


def _instances(synth_src):
    """Per image: list of (category, attributes, mask)."""
    out = {}
    for image_id, rs in _rows(synth_src).items():
        out[image_id] = [(int(r["ClassId"]), [int(a) for a in r["AttributesIds"].split(",") if a],
                          rle.decode_kaggle(r["EncodedPixels"], int(r["Height"]), int(r["Width"])).astype(bool)) for r in rs]
    return out


def _parent(mask, mains):
    for i, (_, _, m) in enumerate(mains):
        if (mask & ~m).sum() == 0:
            return i
    return None


def test_visible_garments_are_disjoint_and_parts_lie_inside_one_garment(synth_src):
    seen = set()
    for insts in _instances(synth_src).values():
        mains = [x for x in insts if x[0] in MAIN]
        union = np.zeros_like(mains[0][2], dtype=np.int32)
        for _, _, m in mains:
            union += m
        assert union.max() == 1  # masks are the visible parts after occlusion
        for cat, _, m in insts:
            seen.add(cat)
            if cat in PARTS:
                assert _parent(m, mains) is not None
    assert {synth.SLEEVE, synth.NECKLINE, synth.POCKET, synth.SHOE, synth.PANTS} <= seen


def test_attributes_are_visible_in_pixels(synth_src):
    """Pattern -> texture contrast; length -> hem height; sleeve length -> sleeve extent."""
    stds = {True: [], False: []}
    extent = defaultdict(list)
    sleeve_len = defaultdict(list)
    for image_id, insts in _instances(synth_src).items():
        grey = np.asarray(Image.open(synth_src / "train" / f"{image_id}.jpg").convert("L"), np.float32)
        mains = [x for x in insts if x[0] in MAIN]
        for cat, attrs, m in mains:
            pat = set(attrs) & set(synth.PATTERNS.values())
            inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
            if pat and inner.sum() >= 150:
                stds[pat != {synth.PATTERNS["plain"]}].append(grey[inner].std())
            for a in set(attrs) & set(synth.LENGTHS.values()):
                ys = np.flatnonzero(m.any(1))
                extent[a].append((ys[-1] - ys[0]) / m.shape[0])
        for cat, attrs, m in insts:
            if cat == synth.SLEEVE:
                parent = mains[_parent(m, mains)]
                ys = np.flatnonzero(m.any(1))
                for a in set(parent[1]) & set(synth.SLEEVES.values()):
                    sleeve_len[a].append((ys[-1] - ys[0]) / m.shape[0])
    assert stds[False] and stds[True]
    assert np.median(stds[False]) * 3 < np.median(stds[True])
    L = synth.LENGTHS
    means = {k: np.mean(v) for k, v in extent.items()}
    assert means[L["mini"]] < means[L["maxi"]]
    S = synth.SLEEVES
    assert S["sleeveless"] not in sleeve_len  # sleeveless garments have no sleeve instances
    assert np.mean(sleeve_len[S["short"]]) < np.mean(sleeve_len[S["wrist"]])
