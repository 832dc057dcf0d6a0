"""Reading Fashionpedia-like COCO files: subfolders, crowd regions, malformed entries, image folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.sources import coco as coco_source
from fashionseg.data.sources.records import SourceError
from source_helpers import read_all


def _coco(tmp_path: Path) -> tuple[Path, dict[int, np.ndarray]]:
    """Fashionpedia-like JSON: subfolders (two files named q3.jpg), polygons, uncompressed and
    compressed RLE, a crowd region, non-contiguous category ids, missing attribute_ids, malformed
    entries of every kind."""
    root = tmp_path / "coco"
    rng = np.random.default_rng(5)
    cats = [{"id": c, "name": f"c{c}", "supercategory": "s", "level": 1} for c in (1, 5, 100)]
    attrs = [{"id": a, "name": f"a{a}", "supercategory": "x", "level": 1} for a in (0, 7, 340)]
    images = [{"id": 7, "file_name": "q3.jpg", "height": 33, "width": 45},
              {"id": 8, "file_name": "other/q3.jpg", "height": 20, "width": 30},
              {"id": 9, "file_name": "empty.jpg", "height": 10, "width": 10}]
    for im in images:
        (root / "images" / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)).save(root / "images" / im["file_name"])
    refs, anns = {}, []

    def add(image_id, h, w, kind, **extra):
        aid = 100 + len(anns)
        if kind == "poly":
            poly = (rng.uniform(0, 1, (5, 2)) * [w, h]).flatten().round(2).tolist()
            seg, ref = [poly], mask_util.decode(mask_util.merge(mask_util.frPyObjects([poly], h, w)))
        else:
            ref = (rng.random((h, w)) < 0.4).astype(np.uint8)
            enc = mask_util.encode(np.asfortranarray(ref))
            seg = {"size": [h, w], "counts": enc["counts"].decode()}
            if kind == "uncompressed":
                flat, counts, cur, n = ref.flatten(order="F"), [], 0, 0
                for v in flat:
                    if v != cur:
                        counts.append(n)
                        n, cur = 0, v
                    n += 1
                seg = {"size": [h, w], "counts": counts + [n]}
        anns.append({"id": aid, "image_id": image_id, "category_id": extra.pop("category_id", 100), "segmentation": seg,
                     "area": int(ref.sum()), "iscrowd": 0, "bbox": [0, 0, 1, 1], "attribute_ids": [7, 340], **extra})
        refs[aid] = ref

    add(7, 33, 45, "poly", category_id=5)
    add(7, 33, 45, "uncompressed")
    add(7, 33, 45, "compressed", category_id=1)
    anns[-1].pop("attribute_ids")
    add(8, 20, 30, "poly")
    add(8, 20, 30, "compressed", iscrowd=1)
    add(8, 20, 30, "poly", segmentation=[[float("nan"), 1, 5, 1, 5, 5]])
    add(8, 20, 30, "poly", segmentation=[[1e30, 1, 5, 1, 5, 5]])
    add(8, 20, 30, "poly", segmentation=[[1e9, 1, 5, 1, 5, 5]])
    add(8, 20, 30, "poly", attribute_ids=7)
    add(8, 20, 30, "poly")
    anns[-1]["image_id"] = [8]
    add(8, 20, 30, "poly", category_id=True)
    images.append({"id": [1], "file_name": "x.jpg"})
    images.append({"id": 7, "file_name": "dup.jpg"})
    d = {"images": images, "annotations": anns + ["not an object"], "categories": cats, "attributes": attrs}
    (root / "instances_attributes_train2020.json").write_text(json.dumps(d))
    return root, refs


def test_coco_malformed_entries_are_reported_not_fatal(tmp_path):
    """Bugs: an unhashable image id / annotation image_id or a non-list attribute_ids crashed the
    reader with a TypeError; a NaN or 1e30 polygon coordinate segfaulted pycocotools and a 1e9 one
    exhausted memory (a dead worker then hung multiprocessing.Pool); category_id True counted as 1;
    crowd regions were silently kept as instances; two `q3.jpg` in different folders got the same
    image_id."""
    root, refs = _coco(tmp_path)
    out = tmp_path / "out"
    code, report = build(BuildConfig(str(root), str(out), val_fraction=0, workers=2, max_bad_fraction=1, progress=False))
    assert code == 0, report
    reasons = {(p["where"], p["reason"]) for p in report["problems"]}
    for where, reason in [("annotation id 104", "iscrowd annotation (a crowd region, not an instance)"),
                          ("annotation id 105", "polygon has a NaN or infinite coordinate"),
                          ("annotation id 106", "polygon coordinate beyond +-240 for a 20x30 image"),
                          ("annotation id 107", "polygon coordinate beyond +-240 for a 20x30 image"),
                          ("annotation id 108", "attribute_ids is int, not a list (ignored, instance kept)"),
                          ("annotation id 109", "image_id [8] is not in 'images'"),
                          ("annotation id 110", "unknown category_id True"),
                          ("annotations[11]", "annotation is not an object"),
                          ("images[3]", "image entry without an integer/string id or a file_name"),
                          ("images[4]", "duplicate image id 7 (the first entry is kept)")]:
        assert (where, reason) in reasons, (where, reason, sorted(reasons, key=str))
    crowd = next(p for p in report["problems"] if p["where"] == "annotation id 104")
    assert crowd["bad"] is False
    # every report entry has the keys docs/design.md lists
    assert all(set(p) == {"action", "reason", "image_id", "where", "bad", "instances"} for p in report["problems"])

    got = read_all(out)
    assert set(got) == {"q3", "other/q3"}  # subfolders keep ids apart
    d = json.loads((root / "instances_attributes_train2020.json").read_text())
    by_image: dict = {}
    for a in d["annotations"]:
        if isinstance(a, dict) and a["id"] in (100, 101, 102, 103, 108):
            by_image.setdefault(a["image_id"], []).append(a)
    for image_id, key in ((7, "q3"), (8, "other/q3")):
        insts = got[key]["instances"]
        assert len(insts) == len(by_image[image_id])
        for inst, a in zip(insts, by_image[image_id]):
            seg = inst["segmentation"]
            assert np.array_equal(mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}), refs[a["id"]])
            assert inst["category_id"] == a["category_id"]
            want_attrs = a.get("attribute_ids") if isinstance(a.get("attribute_ids"), list) else []
            assert inst["attribute_ids"] == sorted(want_attrs)


def test_coco_image_id_keeps_subfolders():
    assert coco_source.image_id_of("a/b/x.y.jpg") == "a/b/x.y"
    assert coco_source.image_id_of("x.jpg") == "x"
    assert coco_source.image_id_of("noext") == "noext"


def test_coco_images_found_in_a_sibling_folder_or_named_when_absent(tmp_path):
    """Bug: images were looked for only beside the JSON and under images/, so Fashionpedia's own
    layout (train/ beside the JSON) or COCO's (annotations/ beside train2017/) dropped every image."""
    root, refs = _coco(tmp_path)
    layout = tmp_path / "layout"
    (layout / "annotations").mkdir(parents=True)
    (root / "images").rename(layout / "train2020")
    (root / "instances_attributes_train2020.json").rename(layout / "annotations" / "instances_attributes_train2020.json")
    code, report = build(BuildConfig(str(layout / "annotations"), str(tmp_path / "out"), val_fraction=0, workers=1,
                                     max_bad_fraction=1, progress=False))
    assert code == 0 and set(read_all(tmp_path / "out")) == {"q3", "other/q3"}
    assert not [p for p in report["problems"] if "missing" in p["reason"]]
    with pytest.raises(SourceError, match=r"none of its images \(e\.g\. 'q3\.jpg'\) is under .*--images DIR"):
        build(BuildConfig(str(layout / "annotations"), str(tmp_path / "out2"), images=str(tmp_path), progress=False))


def test_windows_backslash_file_names_and_image_ids(tmp_path):
    """COCO files written on Windows name `other\\q3.jpg`; integer ids are the file's own, and a
    file with string ids gets 1..N in its images order (the string is the source_id)."""
    root, _ = _coco(tmp_path)
    path = root / "instances_attributes_train2020.json"
    d = json.loads(path.read_text())
    d["images"][1]["file_name"] = "other\\q3.jpg"
    path.write_text(json.dumps(d))
    source = coco_source.read(path)
    assert {(im.source_id, im.image_id) for im in source.images if im.instances} == {("q3", 7), ("other/q3", 8)}
    code, report = build(BuildConfig(str(path), str(tmp_path / "out"), val_fraction=0, workers=1, max_bad_fraction=1, progress=False))
    got = read_all(tmp_path / "out")
    assert code == 0 and {k: m["image_id"] for k, m in got.items()} == {"q3": 7, "other/q3": 8}
    assert not [p for p in report["problems"] if "missing" in p["reason"]]

    for im in d["images"]:
        im["id"] = f"img-{im['id']}" if isinstance(im.get("id"), int) else im.get("id")
    for a in d["annotations"]:
        if isinstance(a, dict) and isinstance(a.get("image_id"), int):
            a["image_id"] = f"img-{a['image_id']}"
    path.write_text(json.dumps(d))
    assert [(im.source_id, im.image_id) for im in coco_source.read(path).images] == [("q3", 1), ("other/q3", 2), ("empty", 3)]
