"""QA regressions for `shard build/verify` on hand-made data unlike the synthetic set.

Each test pins a bug found by building data the synthetic generator never produces: a Kaggle CSV
in another column order with CRLF, a BOM and padded header names; a Fashionpedia-like COCO file
with subfolders, crowd regions and malformed entries; corrupt manifests.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards import build as build_mod
from fashionseg.data.shards.build import BuildConfig, WorkerDied, build
from fashionseg.data.shards.manifest import ManifestError
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.sources import coco as coco_source
from fashionseg.data.sources import kaggle as kaggle_source
from fashionseg.data.sources.records import SourceError
from fashionseg.data.vocab import Vocab, VocabError


def _vocab(n_cats: int = 48, n_attrs: int = 320) -> dict:
    """Older-Fashionpedia-sized vocabulary with sparse attribute ids."""
    attr_ids = sorted(np.random.default_rng(1).choice(400, n_attrs, replace=False).tolist())
    return {"categories": [{"id": i, "name": f"c{i}", "supercategory": "s", "level": 1} for i in range(n_cats)],
            "attributes": [{"id": int(a), "name": f"a{a}", "supercategory": "x", "level": 1} for a in attr_ids]}


def _encode_column_major(m: np.ndarray) -> str:
    """Independent Kaggle encoder (plain loops), so the test does not trust rle.py."""
    h, w = m.shape
    flat = [int(m[y, x]) for x in range(w) for y in range(h)]
    runs, i = [], 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            runs += [i + 1, j - i]
            i = j
        else:
            i += 1
    return " ".join(map(str, runs))


def _read_all(out: Path) -> dict[str, dict]:
    """image_id -> sample json, read with plain tarfile."""
    got = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        got[meta["source_id"]] = meta
    return got


def _kaggle_src(root: Path, rows, images: dict[str, tuple[int, int]], header: list[str]) -> Path:
    src = root / "kag"
    (src / "train").mkdir(parents=True)
    (src / "label_descriptions.json").write_text(json.dumps(_vocab()))
    rng = np.random.default_rng(0)
    for iid, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / "train" / f"{iid}.jpg")
    with open(src / "train.csv", "w", newline="", encoding="utf-8-sig") as f:  # BOM
        wr = csv.writer(f, lineterminator="\r\n")  # CRLF
        wr.writerow(header)
        wr.writerows(rows)
    return src


def test_kaggle_padded_header_float_sizes_and_nan_attributes_are_read(tmp_path):
    """Bugs: ' EncodedPixels' in the header was a fatal 'missing column'; '61.0' sizes (pandas
    writes int columns with gaps as floats) dropped the row; 'nan' attributes were reported as an
    unknown attribute id."""
    rng = np.random.default_rng(3)
    masks = {"img.with.dots": (rng.random((61, 97)) < 0.3).astype(np.uint8),
             "odd#id é": (rng.random((97, 61)) < 0.3).astype(np.uint8)}
    header = ["ClassId", " Extra", " ImageId", " Width ", "Height", "AttributesIds", " EncodedPixels"]
    rows = [["47.0", "x,y", "img.with.dots", "97.0", "61.0", "nan", _encode_column_major(masks["img.with.dots"])],
            ["3", "", "odd#id é", "61", "97", " 0 , 399 ".replace("399", str(_vocab()["attributes"][-1]["id"])),
             _encode_column_major(masks["odd#id é"])]]
    src = _kaggle_src(tmp_path, rows, {k: v.shape for k, v in masks.items()}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0, report
    assert report["totals"]["dropped_instances"] == 0 and report["totals"]["dropped_attributes"] == 1  # only id 0 (not in vocab)
    got = _read_all(tmp_path / "out")
    for iid, m in masks.items():
        seg = got[iid]["instances"][0]["segmentation"]
        assert np.array_equal(mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}), m)
    assert got["img.with.dots"]["instances"][0]["category_id"] == 47
    assert got["img.with.dots"]["instances"][0]["attribute_ids"] == []


def test_non_utf8_csv_and_all_rows_rejected_say_why(tmp_path):
    """Bugs: a Latin-1 CSV was reported at 'line 0'; a CSV whose every row is bad only said
    'no annotated images' without a single reason."""
    src = tmp_path / "s"
    src.mkdir()
    (src / "label_descriptions.json").write_text(json.dumps(_vocab()))
    (src / "train.csv").write_bytes(b"ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds\n\xe9x,1 2,4,4,1,\n")
    with pytest.raises(SourceError, match=r"train\.csv: not UTF-8 text \(byte 0xe9\).*UTF-8") as e:
        kaggle_source.read(src)
    assert "line 0" not in str(e.value)
    (src / "train.csv").write_text("ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds\nx,1 2,zero,4,1,\n")
    with pytest.raises(SourceError, match=r"1 rows rejected, e\.g\. train\.csv line 2: bad Height/Width"):
        build(BuildConfig(str(src), str(tmp_path / "out"), progress=False))


def test_vocab_errors_name_the_file_and_the_id(tmp_path):
    """Bug: 'duplicate ids in attributes' named neither the file nor the id."""
    d = _vocab(3, 4)
    d["attributes"][2]["id"] = d["attributes"][1]["id"]
    p = tmp_path / "label_descriptions.json"
    p.write_text(json.dumps(d))
    with pytest.raises(VocabError, match=rf"{p}: duplicate ids in 'attributes': {d['attributes'][1]['id']}"):
        Vocab.from_file(p)
    d["attributes"][2]["id"] = True
    with pytest.raises(VocabError, match=r"attributes\[2\] needs an integer 'id' \(has True\)"):
        Vocab.from_dict(d)


@pytest.mark.parametrize("encoded", ["1 99999999999999999999", "9223372036854775807 2", "21 1", "5 17"])
def test_rle_values_beyond_int64_or_grid_are_rle_errors(encoded):
    """Bug: huge values raised OverflowError (the image's good instances were lost with it) or
    wrapped around int64 past the grid check."""
    with pytest.raises(rle.RLEError):
        rle.kaggle_to_coco(encoded, 4, 5)
    assert rle.decode_kaggle("20 1", 4, 5)[3, 4] == 1  # the last pixel is still fine


def test_overflowing_rle_drops_one_instance_not_the_image(tmp_path):
    m = np.zeros((8, 6), np.uint8)
    m[2:5, 1:4] = 1
    header = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    rows = [["a", _encode_column_major(m), 8, 6, 1, ""], ["a", "1 99999999999999999999", 8, 6, 2, ""]]
    src = _kaggle_src(tmp_path, rows, {"a": (8, 6)}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, max_bad_fraction=1,
                                     progress=False))
    assert code == 0
    assert [(p["action"], p["where"]) for p in report["problems"]] == [("dropped instance", "train.csv line 3")]
    assert len(_read_all(tmp_path / "out")["a"]["instances"]) == 1


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

    got = _read_all(out)
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


@pytest.mark.parametrize("kw, match", [({"max_size": -5}, "--max-size must be a positive"), ({"max_size": 0}, "--max-size"),
                                        ({"workers": -1}, "--workers must be >= 0")])
def test_bad_build_options_are_refused(synth_src, tmp_path, kw, match):
    """Bug: --max-size -5 silently wrote 1x1 images; --workers -1 was accepted."""
    with pytest.raises(SourceError, match=match):
        build(BuildConfig(str(synth_src), str(tmp_path / "out"), progress=False, **kw))


def test_out_that_is_a_file_is_a_clear_error(synth_src, tmp_path, capsys):
    """Bug: OUT being a file (or not creatable) ended in a FileExistsError traceback."""
    from argparse import Namespace

    f = tmp_path / "afile"
    f.write_text("x")
    args = Namespace(src=str(synth_src), out=str(f), format="auto", val_fraction=0.1, max_size=None, samples_per_shard=4,
                     workers=1, seed=0, images=None, max_bad_fraction=0.05, no_progress=True)
    assert build_mod.run(args) == 2
    assert f"{f}: exists and is not a folder" in capsys.readouterr().err


def test_dead_worker_ends_the_build_instead_of_hanging(synth_src, tmp_path, monkeypatch):
    """Bug: with multiprocessing.Pool a worker killed by the OS (OOM) or crashing in native code
    made the build wait forever. The workers are forked, so they inherit this patched function."""
    real = build_mod.process_image

    def killed(key, img, max_size):
        if key == sorted_keys[3]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(key, img, max_size)

    source = build_mod.read_source(BuildConfig(str(synth_src), "unused"))
    sorted_keys = sorted(build_mod.assign_keys(source.images))
    monkeypatch.setattr(build_mod, "process_image", killed)
    with pytest.raises(WorkerDied, match="fewer --workers"):
        build(BuildConfig(str(synth_src), str(tmp_path / "out"), workers=2, samples_per_shard=4, progress=False))


@pytest.fixture()
def shard_copy(synth_shards, tmp_path):
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["splits"]["val"]["shards"][0]["samples"].__setitem__(0, {}), r"sample #0 needs key, offset"),
    (lambda m: m["splits"]["val"]["shards"][0]["samples"][0].__setitem__("categories", None), r"sample #0 needs"),
    (lambda m: m["splits"]["val"]["shards"][0].__setitem__("name", "../elsewhere/val-000000.tar"), "must be a file name"),
    (lambda m: m["splits"]["val"]["shards"].append(5), r"shard #\d+ is not an object"),
])
def test_corrupt_manifest_is_a_manifest_error(shard_copy, edit, match):
    """Bug: sample entries were not validated (verify crashed with KeyError / AttributeError) and a
    shard name could point outside the shard folder."""
    p = shard_copy / "manifest.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match):
        read_manifest(shard_copy)
    from fashionseg.data.shards.verify import run as verify_run
    from argparse import Namespace

    assert verify_run(Namespace(out=str(shard_copy))) == 2


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path, mode):
    """Bug: a 16-bit PNG behind a .jpg name came out white (PIL's convert clips I;16 to 0..255),
    a float 0..1 image black. The stored JPEG must keep the picture's levels."""
    from fashionseg.data.shards.build import process_image
    from fashionseg.data.sources.records import RawImage, RawInstance

    grey = np.tile(np.linspace(0, 255, 30), (20, 1))
    if mode == "I;16":
        im, fmt = Image.fromarray((grey * 257).astype(np.uint16)).convert("I;16"), "PNG"
    elif mode == "I":
        im, fmt = Image.fromarray((grey * 257).astype(np.int32), "I"), "TIFF"
    else:
        im, fmt = Image.fromarray((grey / 255).astype(np.float32), "F"), "TIFF"
    path = tmp_path / "x.jpg"
    im.save(path, fmt)
    m = np.zeros((20, 30), np.uint8)
    m[2:6, 3:9] = 1
    r = process_image("x", RawImage("x", str(path), 20, 30, [RawInstance("w", 1, [], 20, 30, kaggle_rle=rle.encode_kaggle(m))]), None)
    stored = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("L"), dtype=np.float64)
    assert np.abs(stored - grey).mean() < 3, np.abs(stored - grey).mean()


def test_kaggle_images_found_under_other_names_and_wrong_folder_is_named(tmp_path):
    """Bug: only `<ImageId>.jpg` was tried, so a CSV whose ImageIds carry '.jpg', a .png or a .JPG
    file dropped the image as missing; a wrong --images folder dropped every image one by one and
    ended in 'nothing valid' without naming the folder."""
    masks = {k: np.pad(np.ones((3, 4), np.uint8), ((1, 2), (2, 1))) for k in ("with_ext.jpg", "as_png", "upper")}
    header = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    rows = [[k, _encode_column_major(m), 6, 7, 1, ""] for k, m in masks.items()]
    src = _kaggle_src(tmp_path, rows, {"with_ext": (6, 7), "as_png": (6, 7), "upper": (6, 7)}, header)
    Image.open(src / "train" / "as_png.jpg").save(src / "train" / "as_png.png")
    (src / "train" / "as_png.jpg").unlink()
    (src / "train" / "upper.jpg").rename(src / "train" / "upper.JPG")
    assert not (src / "train" / "with_ext.jpg.jpg").exists()  # ImageId 'with_ext.jpg' is the file's whole name
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0, report
    got = _read_all(tmp_path / "out")
    assert set(got) == set(masks)
    for k, m in masks.items():
        seg = got[k]["instances"][0]["segmentation"]
        assert np.array_equal(mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}), m)
    assert [p["reason"] for p in report["problems"]] == ["PNG image: re-encoded as JPEG"]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SourceError, match=r"elsewhere: none of the 3 images listed in train\.csv is here.*--images DIR"):
        build(BuildConfig(str(src), str(tmp_path / "out2"), images=str(tmp_path / "elsewhere"), progress=False))


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
    assert code == 0 and set(_read_all(tmp_path / "out")) == {"q3", "other/q3"}
    assert not [p for p in report["problems"] if "missing" in p["reason"]]
    with pytest.raises(SourceError, match=r"none of its images \(e\.g\. 'q3\.jpg'\) is under .*--images DIR"):
        build(BuildConfig(str(layout / "annotations"), str(tmp_path / "out2"), images=str(tmp_path), progress=False))


def test_csv_without_attributes_column_builds_category_only(tmp_path):
    """A category-only export (no AttributesIds column) was fatal; it now builds with empty
    attribute lists and one report line saying so."""
    m = np.zeros((5, 4), np.uint8)
    m[1:3, 1:3] = 1
    src = _kaggle_src(tmp_path, [["a", _encode_column_major(m), 5, 4, 2]], {"a": (5, 4)},
                      ["ImageId", "EncodedPixels", "Height", "Width", "ClassId"])
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0
    assert _read_all(tmp_path / "out")["a"]["instances"][0]["attribute_ids"] == []
    assert [p["reason"] for p in report["problems"]] == ["no AttributesIds column: every instance has no attributes"]
