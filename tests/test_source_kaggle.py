"""Reading Kaggle CSVs (2020 and 2019 layouts) unlike the synthetic set: column order, CRLF, BOM,
padded headers, float sizes, other image names, bad rows each with its reason."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.sources import kaggle as kaggle_source
from fashionseg.data.sources.records import SourceError
from fashionseg.data.vocab import Vocab, VocabError
from source_helpers import encode_column_major, kaggle_src, read_all, vocab_dict


def test_kaggle_padded_header_float_sizes_and_nan_attributes_are_read(tmp_path):
    """Bugs: ' EncodedPixels' in the header was a fatal 'missing column'; '61.0' sizes (pandas
    writes int columns with gaps as floats) dropped the row; 'nan' attributes were reported as an
    unknown attribute id."""
    rng = np.random.default_rng(3)
    masks = {"img.with.dots": (rng.random((61, 97)) < 0.3).astype(np.uint8),
             "odd#id é": (rng.random((97, 61)) < 0.3).astype(np.uint8)}
    header = ["ClassId", " Extra", " ImageId", " Width ", "Height", "AttributesIds", " EncodedPixels"]
    rows = [["47.0", "x,y", "img.with.dots", "97.0", "61.0", "nan", encode_column_major(masks["img.with.dots"])],
            ["3", "", "odd#id é", "61", "97", " 0 , 399 ".replace("399", str(vocab_dict()["attributes"][-1]["id"])),
             encode_column_major(masks["odd#id é"])]]
    src = kaggle_src(tmp_path, rows, {k: v.shape for k, v in masks.items()}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0, report
    assert report["totals"]["dropped_instances"] == 0 and report["totals"]["dropped_attributes"] == 1  # only id 0 (not in vocab)
    got = read_all(tmp_path / "out")
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
    (src / "label_descriptions.json").write_text(json.dumps(vocab_dict()))
    (src / "train.csv").write_bytes(b"ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds\n\xe9x,1 2,4,4,1,\n")
    with pytest.raises(SourceError, match=r"train\.csv: not UTF-8 text \(byte 0xe9\).*UTF-8") as e:
        kaggle_source.read(src)
    assert "line 0" not in str(e.value)
    (src / "train.csv").write_text("ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds\nx,1 2,zero,4,1,\n")
    with pytest.raises(SourceError, match=r"1 rows rejected, e\.g\. train\.csv line 2: bad Height/Width"):
        build(BuildConfig(str(src), str(tmp_path / "out"), progress=False))


def test_vocab_errors_name_the_file_and_the_id(tmp_path):
    """Bug: 'duplicate ids in attributes' named neither the file nor the id."""
    d = vocab_dict(3, 4)
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
    rows = [["a", encode_column_major(m), 8, 6, 1, ""], ["a", "1 99999999999999999999", 8, 6, 2, ""]]
    src = kaggle_src(tmp_path, rows, {"a": (8, 6)}, header)
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, max_bad_fraction=1,
                                     progress=False))
    assert code == 0
    assert [(p["action"], p["where"]) for p in report["problems"]] == [("dropped instance", "train.csv line 3")]
    assert len(read_all(tmp_path / "out")["a"]["instances"]) == 1


def test_kaggle_images_found_under_other_names_and_wrong_folder_is_named(tmp_path):
    """Bug: only `<ImageId>.jpg` was tried, so a CSV whose ImageIds carry '.jpg', a .png or a .JPG
    file dropped the image as missing; a wrong --images folder dropped every image one by one and
    ended in 'nothing valid' without naming the folder."""
    masks = {k: np.pad(np.ones((3, 4), np.uint8), ((1, 2), (2, 1))) for k in ("with_ext.jpg", "as_png", "upper")}
    header = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    rows = [[k, encode_column_major(m), 6, 7, 1, ""] for k, m in masks.items()]
    src = kaggle_src(tmp_path, rows, {"with_ext": (6, 7), "as_png": (6, 7), "upper": (6, 7)}, header)
    Image.open(src / "train" / "as_png.jpg").save(src / "train" / "as_png.png")
    (src / "train" / "as_png.jpg").unlink()
    (src / "train" / "upper.jpg").rename(src / "train" / "upper.JPG")
    assert not (src / "train" / "with_ext.jpg.jpg").exists()  # ImageId 'with_ext.jpg' is the file's whole name
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0, report
    got = read_all(tmp_path / "out")
    assert set(got) == set(masks)
    for k, m in masks.items():
        seg = got[k]["instances"][0]["segmentation"]
        assert np.array_equal(mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}), m)
    assert [p["reason"] for p in report["problems"]] == ["PNG image: re-encoded as JPEG"]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SourceError, match=r"elsewhere: none of the 3 images listed in train\.csv is here.*--images DIR"):
        build(BuildConfig(str(src), str(tmp_path / "out2"), images=str(tmp_path / "elsewhere"), progress=False))


def test_csv_without_attributes_column_builds_category_only(tmp_path):
    """A category-only export (no AttributesIds column) was fatal; it now builds with empty
    attribute lists and one report line saying so."""
    m = np.zeros((5, 4), np.uint8)
    m[1:3, 1:3] = 1
    src = kaggle_src(tmp_path, [["a", encode_column_major(m), 5, 4, 2]], {"a": (5, 4)},
                      ["ImageId", "EncodedPixels", "Height", "Width", "ClassId"])
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False))
    assert code == 0
    assert read_all(tmp_path / "out")["a"]["instances"][0]["attribute_ids"] == []
    assert [p["reason"] for p in report["problems"]] == ["no AttributesIds column: every instance has no attributes"]


def _masks(n: int, h: int = 6, w: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [(rng.random((h, w)) < 0.5).astype(np.uint8) | np.eye(h, w, dtype=np.uint8) for _ in range(n)]


def test_kaggle_2019_layout_is_detected_and_read_with_its_attributes(tmp_path):
    """Kaggle 2019 (iMaterialist FGVC6): no AttributesIds column, ClassId `6_28_77` = category 6
    with attributes 28 and 77, ImageIds with `.jpg`. Each malformed ClassId has its own reason."""
    a1, a2 = (vocab_dict()["attributes"][i]["id"] for i in (3, 7))
    ms = _masks(6)
    rows = [["p.jpg", encode_column_major(ms[0]), 6, 7, f"6_{a1}_{a2}"],
            ["p.jpg", encode_column_major(ms[1]), 6, 7, "3"],
            ["q.jpg", encode_column_major(ms[2]), 6, 7, f"5_{a2}_401"],  # 401: not in the vocabulary
            ["q.jpg", encode_column_major(ms[3]), 6, 7, f"7__{a1}"],  # empty field
            ["q.jpg", encode_column_major(ms[4]), 6, 7, "x_1"],  # category not a number
            ["q.jpg", encode_column_major(ms[5]), 6, 7, f"1_{a1}"]]  # int() would read "1_<a1>" as one number
    src = kaggle_src(tmp_path, rows, {"p": (6, 7), "q": (6, 7)}, ["ImageId", "EncodedPixels", "Height", "Width", "ClassId"])
    code, report = build(BuildConfig(str(src), str(tmp_path / "out"), val_fraction=0, workers=1, progress=False, max_bad_fraction=1))
    assert code == 0, report
    assert report["format"] == "kaggle2019"
    got = read_all(tmp_path / "out")
    assert set(got) == {"p.jpg", "q.jpg"} and (got["p.jpg"]["image_id"], got["q.jpg"]["image_id"]) == (1, 2)
    labels = {k: [(i["category_id"], i["attribute_ids"]) for i in m["instances"]] for k, m in got.items()}
    assert labels == {"p.jpg": [(6, sorted([a1, a2])), (3, [])], "q.jpg": [(5, [a2]), (7, [a1]), (1, [a1])]}
    for inst, m in zip(got["p.jpg"]["instances"] + got["q.jpg"]["instances"], [ms[0], ms[1], ms[2], ms[3], ms[5]]):
        assert np.array_equal(mask_util.decode({"size": [6, 7], "counts": inst["segmentation"]["counts"].encode()}), m)
    assert [(p["action"], p["reason"], p["where"]) for p in report["problems"]] == [
        ("dropped attribute", "unknown attribute id '401' (instance kept)", "train.csv line 4"),
        ("dropped attribute", f"empty attribute id in ClassId '7__{a1}' (instance kept)", "train.csv line 5"),
        ("dropped instance", "unknown ClassId 'x_1'", "train.csv line 6")]
    assert read_manifest(tmp_path / "out")["settings"]["format"] == "kaggle2019"

    # read as 2020 on purpose: every attribute-carrying ClassId is refused with the way out
    code, report = build(BuildConfig(str(src), str(tmp_path / "out2020"), format="kaggle", val_fraction=0, workers=1,
                                     progress=False, max_bad_fraction=1))
    reasons = {p["where"]: p["reason"] for p in report["problems"] if p["action"] == "dropped instance"}
    assert reasons["train.csv line 2"] == (f"ClassId '6_{a1}_{a2}' carries attribute ids (the Kaggle 2019 layout); "
                                           "build with --format kaggle2019 (or auto)")
    assert len(reasons) == 5 and report["totals"]["instances"] == 1  # only the plain "3"


def test_kaggle2019_format_on_a_2020_csv_is_refused(tmp_path):
    m = _masks(1)[0]
    src = kaggle_src(tmp_path, [["a", encode_column_major(m), 6, 7, 1, ""]], {"a": (6, 7)},
                     ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"])
    with pytest.raises(SourceError, match=r"train\.csv: has an AttributesIds column.*--format kaggle$"):
        build(BuildConfig(str(src), str(tmp_path / "out"), format="kaggle2019", progress=False))


def test_kaggle_image_ids_do_not_depend_on_row_order(tmp_path):
    ms = _masks(3)
    header = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]
    rows = [[k, encode_column_major(m), 6, 7, 1, ""] for k, m in zip(["zeta", "alpha", "mid"], ms)]
    ids = []
    for order, sub in ((rows, "a"), (rows[::-1], "b")):
        src = kaggle_src(tmp_path / sub, order, {"zeta": (6, 7), "alpha": (6, 7), "mid": (6, 7)}, header)
        ids.append({s.source_id: s.image_id for s in kaggle_source.read(src).images})
    assert ids[0] == ids[1] == {"alpha": 1, "mid": 2, "zeta": 3}
