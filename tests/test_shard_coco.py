"""`shard build --format coco`: polygons, uncompressed and compressed RLE, the file's own vocabulary."""
from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.shards.verify import verify

from test_shard_build import read_back

# A vocabulary unlike the packaged one: 3 categories with sparse ids, 3 sparse attribute ids.
CATEGORIES = [{"id": 3, "name": "top", "supercategory": "upperbody", "level": 2},
              {"id": 7, "name": "pants", "supercategory": "lowerbody", "level": 2},
              {"id": 50, "name": "sleeve", "supercategory": "garment parts", "level": 2}]
ATTRIBUTES = [{"id": 2, "name": "plain", "supercategory": "textile pattern", "level": 1},
              {"id": 90, "name": "stripe", "supercategory": "textile pattern", "level": 1},
              {"id": 400, "name": "maxi", "supercategory": "length", "level": 1}]


@pytest.fixture(scope="module")
def coco_src(synth_src, tmp_path_factory):
    """COCO JSON over 8 synth images (images under images/): each instance as a polygon,
    an uncompressed RLE or a compressed RLE, plus a few bad annotations. -> (json path, expected masks)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rows = defaultdict(list)
    with open(synth_src / "train.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows[r["ImageId"]].append(r)
    images, anns, expect = [], [], {}
    rng = np.random.default_rng(0)
    for n, image_id in enumerate(sorted(rows)[:8]):
        shutil.copy(synth_src / "train" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
        h, w = int(rows[image_id][0]["Height"]), int(rows[image_id][0]["Width"])
        images.append({"id": 1000 + n, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        expect[image_id] = []
        for k, r in enumerate(rows[image_id][:3]):
            m = rle.decode_kaggle(r["EncodedPixels"], h, w)
            kind = (n + k) % 3
            if kind == 0:  # polygons: two random quads (a multi-part instance)
                polys = [rng.uniform([0, 0] * 4, [w, h] * 4).round(1).tolist() for _ in range(2)]
                seg = polys
                m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w)))
            elif kind == 1:  # uncompressed RLE: counts as a list
                seg = {"size": [h, w], "counts": rle.runs_to_counts(rle.parse_kaggle(r["EncodedPixels"], h, w)[0], h, w)}
            else:  # compressed RLE string
                seg = rle.encode_coco(m)
            if not m.any():
                continue
            cat = CATEGORIES[k % 3]["id"]
            attrs = [ATTRIBUTES[(n + k) % 3]["id"]]
            anns.append({"id": len(anns) + 1, "image_id": 1000 + n, "category_id": cat, "attribute_ids": attrs,
                         "segmentation": seg, "area": int(m.sum()), "iscrowd": 0, "bbox": [0, 0, 1, 1]})
            expect[image_id].append((cat, attrs, m))
    first = images[0]
    bad = [
        {"category_id": 99, "segmentation": [[1, 1, 5, 1, 5, 5]]},  # unknown category
        {"category_id": 3, "segmentation": [[1, 1, 5, 1]]},  # polygon with 2 points
        {"category_id": 3, "segmentation": {"size": [first["height"] + 1, first["width"]], "counts": [5, 5]}},  # wrong grid
        {"category_id": 3, "segmentation": {"size": [first["height"], first["width"]], "counts": [5, 5]}},  # counts don't sum
    ]
    for b in bad:
        anns.append({"id": len(anns) + 1, "image_id": first["id"], "attribute_ids": [], "iscrowd": 0, **b})
    anns.append({"id": len(anns) + 1, "image_id": 1001, "category_id": 7, "attribute_ids": [2, 555],  # 555 unknown
                 "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]], "iscrowd": 0})
    second = sorted(rows)[1]
    expect[second].append((7, [2], mask_util.decode(mask_util.merge(mask_util.frPyObjects([[2, 2, 20, 2, 20, 20, 2, 20]],
                                                                                          images[1]["height"], images[1]["width"])))))
    path = root / "instances_attributes_train2020.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": CATEGORIES, "attributes": ATTRIBUTES}))
    return path, expect


def _check(out, expect):
    assert all(not r.errors for r in verify(out))
    got = {meta["source_id"]: meta for _, meta in read_back(out).values()}
    assert set(got) == set(expect)
    for image_id, insts in expect.items():
        meta = got[image_id]
        assert len(meta["instances"]) == len(insts)
        for inst, (cat, attrs, m) in zip(meta["instances"], insts):
            assert inst["category_id"] == cat and inst["attribute_ids"] == attrs
            np.testing.assert_array_equal(mask_util.decode({"size": inst["segmentation"]["size"],
                                                            "counts": inst["segmentation"]["counts"].encode()}), m)


def test_coco_json_builds_bit_exact_masks_with_its_own_vocabulary(coco_src, tmp_path):
    path, expect = coco_src
    out = tmp_path / "out"
    code, report = build(BuildConfig(src=str(path), out=str(out), samples_per_shard=3, val_fraction=0.25, workers=1,
                                     max_bad_fraction=0.5, progress=False))
    assert code == 0, report.get("error")
    _check(out, expect)
    m = read_manifest(out)
    assert m["categories"] == CATEGORIES and m["attributes"] == ATTRIBUTES and m["settings"]["format"] == "coco"
    reasons = [(p["action"], p["reason"]) for p in report["problems"]]
    assert ("dropped instance", "unknown category_id 99") in reasons
    assert ("dropped instance", "no polygon with >= 3 points") in reasons
    assert any(a == "dropped instance" and r.startswith("RLE size") for a, r in reasons)
    assert any(a == "dropped instance" and "do not sum" in r for a, r in reasons)
    assert ("dropped attribute", "unknown attribute id 555 (instance kept)") in reasons


def test_coco_folder_src_and_images_dir(coco_src, tmp_path):
    path, expect = coco_src
    moved = tmp_path / "elsewhere"
    shutil.copytree(path.parent / "images", moved)
    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    shutil.copy(path, ann_dir / path.name)
    out = tmp_path / "out"
    code, report = build(BuildConfig(src=str(ann_dir), out=str(out), images=str(moved), samples_per_shard=4,
                                     workers=1, max_bad_fraction=0.5, progress=False))
    assert code == 0, report.get("error")
    _check(out, expect)
