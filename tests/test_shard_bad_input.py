"""Every bad-input case of a Kaggle source (docs/formats.md, "Kaggle"): reported with a reason, never a crash, never silent."""
from __future__ import annotations

import csv
import io
import shutil
from argparse import Namespace
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionseg.data import rle
from fashionseg.data.shards import build as build_mod
from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.verify import verify

from test_shard_build import read_back

FIELDS = ["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"]


def _rows(src: Path) -> list[dict]:
    with open(src / "train.csv", newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(src: Path, rows: list[dict], fields=FIELDS) -> None:
    with open(src / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def corrupted(synth_src, tmp_path_factory):
    """A copy of synth_src with one image or row per bad-input case, and its build."""
    src = tmp_path_factory.mktemp("bad") / "src"
    shutil.copytree(synth_src, src)
    rows = _rows(src)
    by_image = defaultdict(list)
    for r in rows:
        by_image[r["ImageId"]].append(r)
    portrait = [i for i, rs in by_image.items() if rs[0]["Height"] != rs[0]["Width"]]
    others = [i for i in by_image if i not in portrait]
    case = {}
    for name in ("exif", "transposed"):
        case[name] = portrait.pop(0)
    for name in ("missing", "scaled", "grey", "cmyk", "png", "truncated", "leaves", "overlap", "class", "attr"):
        case[name] = (others or portrait).pop(0)
    img = lambda k: src / "train" / f"{case[k]}.jpg"  # noqa: E731
    pix = {k: Image.open(img(k)).convert("RGB") for k in case}

    img("missing").unlink()
    pix["scaled"].resize((pix["scaled"].width * 2, pix["scaled"].height * 2)).save(img("scaled"), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored pixels are the upright image turned CCW
    pix["exif"].transpose(Image.Transpose.ROTATE_90).save(img("exif"), "JPEG", quality=95, exif=exif)
    pix["transposed"].transpose(Image.Transpose.ROTATE_90).save(img("transposed"), "JPEG")
    pix["grey"].convert("L").save(img("grey"), "JPEG")
    pix["cmyk"].convert("CMYK").save(img("cmyk"), "JPEG")
    pix["png"].save(img("png"), "PNG")
    data = img("truncated").read_bytes()
    img("truncated").write_bytes(data[: len(data) // 2])

    for r in rows:
        if r["ImageId"] == case["leaves"] and r is by_image[case["leaves"]][0]:
            r["EncodedPixels"] = f"{int(r['Height']) * int(r['Width']) - 2} 10"
        if r["ImageId"] == case["overlap"] and r is by_image[case["overlap"]][0]:
            first = " ".join(r["EncodedPixels"].split()[:2])
            # a run repeated 20000 times: overlapping runs, in a field longer than csv's 128 KiB default
            r["EncodedPixels"] = r["EncodedPixels"] + (" " + first) * 20000
        if r["ImageId"] == case["class"] and r is by_image[case["class"]][0]:
            r["ClassId"] = "99"
        if r["ImageId"] == case["attr"] and r is by_image[case["attr"]][0]:
            r["AttributesIds"] = ",".join(filter(None, [r["AttributesIds"], "999"]))
    _write_rows(src, rows)
    out = src.parent / "shards"
    code, report = build(BuildConfig(src=str(src), out=str(out), samples_per_shard=4, val_fraction=0.25, workers=1,
                                     max_bad_fraction=0.9, progress=False))
    return src, out, code, report, case, pix, by_image


def _problems(report, image_id):
    return [(p["action"], p["reason"]) for p in report["problems"] if p.get("image_id") == image_id]


def test_build_survives_and_reports_every_case(corrupted):
    src, out, code, report, case, _, by_image = corrupted
    assert code == 0
    assert all(not r.errors for r in verify(out))
    kept = {meta["source_id"]: meta for _, meta in read_back(out).values()}

    def reasons(k):
        return _problems(report, case[k])

    assert ("dropped image", "missing or unreadable image file (No such file or directory)") in reasons("missing")
    assert any(a == "dropped image" and "cannot decode image" in r for a, r in reasons("truncated"))
    for k in ("scaled", "transposed"):
        drops = [r for a, r in reasons(k) if a == "dropped instance"]
        assert len(drops) == len(by_image[case[k]]) and all("!= decoded image" in r for r in drops)
        assert case[k] not in kept
    for k in ("missing", "truncated"):
        assert case[k] not in kept
    assert any(a == "repaired" and "EXIF orientation 6" in r for a, r in reasons("exif"))
    assert ("repaired", "L image converted to RGB") in reasons("grey")
    assert ("repaired", "CMYK image converted to RGB") in reasons("cmyk")
    assert any(a == "repaired" and r.startswith("PNG bytes behind") for a, r in reasons("png"))
    assert any(a == "dropped instance" and "leaves the" in r for a, r in reasons("leaves"))
    assert ("repaired", "overlapping or unsorted runs merged (union)") in reasons("overlap")
    assert ("dropped instance", "unknown ClassId '99'") in reasons("class")
    assert ("dropped attribute", "unknown attribute id '999' (instance kept)") in reasons("attr")
    # the good instances of partly bad images are kept
    for k in ("leaves", "class"):
        assert len(kept[case[k]]["instances"]) == len(by_image[case[k]]) - 1
    t = report["totals"]
    lost = sum(len(by_image[case[k]]) for k in ("missing", "truncated", "scaled", "transposed")) + 2
    assert t["bad_instances"] == lost and t["bad_fraction"] == pytest.approx(lost / t["source_instances"])
    assert t["samples"] == 24 - 4 and t["instances"] == t["source_instances"] - lost


def test_repaired_images_are_rgb_jpegs_with_exact_masks(corrupted):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    src, out, code, report, case, pix, by_image = corrupted
    kept = {meta["source_id"]: (jpg, meta) for jpg, meta in read_back(out).values()}
    for jpg, meta in kept.values():
        t = decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        assert tuple(t.shape) == (3, meta["height"], meta["width"])
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and im.mode == "RGB"
    for k in ("exif", "grey", "cmyk", "png", "overlap", "attr"):
        jpg, meta = kept[case[k]]
        rows = by_image[case[k]]
        assert len(meta["instances"]) == len(rows)
        for inst, r in zip(meta["instances"], rows):
            h, w = int(r["Height"]), int(r["Width"])
            np.testing.assert_array_equal(rle.decode_coco(inst["segmentation"]), rle.decode_kaggle(r["EncodedPixels"], h, w))
        assert inst["attribute_ids"] == sorted(int(a) for a in rows[-1]["AttributesIds"].split(",") if a and a != "999")
    # the EXIF-rotated image is stored upright, matching its masks
    jpg, meta = kept[case["exif"]]
    upright = np.asarray(Image.open(io.BytesIO(jpg)), np.float32)
    assert upright.shape[:2] == (pix["exif"].height, pix["exif"].width)
    assert np.abs(upright - np.asarray(pix["exif"], np.float32)).mean() < 6


def _run(capsys, **kw) -> tuple[int, str]:
    args = Namespace(**{"format": "auto", "val_fraction": 0.25, "max_size": None, "samples_per_shard": 4, "workers": 1, "seed": 0,
                        "images": None, "max_bad_fraction": 0.05, "no_progress": True, **kw})
    code = build_mod.run(args)
    return code, capsys.readouterr().err


def test_fatal_inputs_exit_nonzero_naming_path(synth_src, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(synth_src, src)
    rows = _rows(src)
    _write_rows(src, rows, [f for f in FIELDS if f != "ClassId"])
    code, err = _run(capsys, src=str(src), out=str(tmp_path / "o1"))
    assert code == 2 and "column 'ClassId' is missing" in err and str(src / "train.csv") in err
    _write_rows(src, rows)

    code, err = _run(capsys, src=str(tmp_path / "empty"), out=str(tmp_path / "o2"))
    assert code == 2 and str(tmp_path / "empty") in err

    (src / "label_descriptions.json").rename(src / "labels.bak")
    code, err = _run(capsys, src=str(src), out=str(tmp_path / "o3"))
    assert code == 2 and str(src / "label_descriptions.json") in err and "vocabulary" in err
    (src / "labels.bak").rename(src / "label_descriptions.json")

    code, err = _run(capsys, src=str(src), out=str(tmp_path / "o4"), images=str(tmp_path / "no_images"))
    assert code == 2 and "nothing valid" in err


def test_bad_fraction_threshold(synth_src, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(synth_src, src)
    for p in sorted((src / "train").glob("*.jpg"))[:3]:
        p.unlink()
    out = tmp_path / "out"
    code, err = _run(capsys, src=str(src), out=str(out))
    assert code == 1 and "--max-bad-fraction" in err and str(out / "report.json") in err
    assert not (out / "manifest.json").exists() and (out / "report.json").exists()
    code, err = _run(capsys, src=str(src), out=str(out), max_bad_fraction=0.5)
    assert code == 0 and (out / "manifest.json").exists()
