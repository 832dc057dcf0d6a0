"""Real-layout Fashionpedia annotation files and randomized results files for the metric tests.

The layout is the official release's (instances_attributes_*.json): `info`, `images` with
large sparse integer ids, `categories` with supercategory/level, `attributes` with sparse ids,
`annotations` with RLE `segmentation`, `area`, `bbox`, `iscrowd` and `attribute_ids`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

LABELS = json.loads((Path(__file__).resolve().parents[1] / "fashionseg/data/label_descriptions.json").read_text())
ATTR_CATS = (0, 1, 6, 10, 31, 32)      # in the official list
PLAIN_CATS = (13, 23, 27, 36)           # not in it


def rle(mask: np.ndarray) -> dict:
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def random_mask(rng, h: int, w: int, big: bool = False) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    lo = max(h, w) // 2 if big else 3
    bh, bw = (int(rng.integers(lo, max(lo + 1, h))), int(rng.integers(lo, max(lo + 1, w))))
    y0, x0 = int(rng.integers(0, max(1, h - bh))), int(rng.integers(0, max(1, w - bw)))
    if rng.random() < 0.5:
        m[y0:y0 + bh, x0:x0 + bw] = 1
    else:  # an ellipse: masks that are not their boxes
        yy, xx = np.mgrid[:h, :w]
        m[((yy - y0 - bh / 2) / (bh / 2)) ** 2 + ((xx - x0 - bw / 2) / (bw / 2)) ** 2 <= 1] = 1
    if not m.any():
        m[y0, x0] = 1
    return m


def annotation_file(seed: int, num_categories: int = 46, num_attributes: int = 40, num_images: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    cats = [dict(c) for c in LABELS["categories"]][:num_categories]
    for i in range(len(cats), num_categories):
        cats.append({"id": i, "name": f"extra {i}", "supercategory": "others", "level": 2})
    attr_ids = sorted(rng.choice(341, num_attributes, replace=False).tolist())
    attrs = [{"id": a, "name": f"attribute {a}", "supercategory": "nickname", "level": 1} for a in attr_ids]
    pool = list(ATTR_CATS + PLAIN_CATS) + [c for c in range(46, num_categories)]
    used_attrs = attr_ids[:8]  # a few, so that attribute sets overlap often
    images, anns = [], []
    for i in range(num_images):
        h, w = (128, 112) if i == 0 else (int(rng.integers(40, 72)), int(rng.integers(40, 72)))
        image_id = int(rng.integers(10_000, 99_999)) * 10 + i
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:x}.jpg", "license": 1,
                       "time_captured": "March-August, 2018", "original_url": "", "isstatic": 1, "kaggle_id": f"{image_id:x}"})
        for _ in range(int(rng.integers(1, 6))):
            m = random_mask(rng, h, w, big=i == 0 and rng.random() < 0.5)
            cat = int(rng.choice(pool))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": rle(m),
                         "area": int(m.sum()), "bbox": [float(v) for v in mask_util.toBbox(rle(m)).tolist()],
                         "iscrowd": 0,
                         "attribute_ids": sorted(rng.choice(used_attrs, int(rng.integers(0, 4)), replace=False).tolist())})
    return {"info": {"year": 2019, "version": "1.0", "description": "Fashionpedia-style test file"},
            "licenses": [{"id": 1, "name": "test", "url": ""}], "images": images, "categories": cats,
            "attributes": attrs, "annotations": anns}


def _shift(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(m)
    h, w = m.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    return out


def _grow(m: np.ndarray, k: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= _shift(m, dy, dx)
    return out


def _shrink(m: np.ndarray, k: int) -> np.ndarray:
    return 1 - _grow(1 - m, k)


def results_file(gt: dict, seed: int, with_boxes: bool = False) -> list[dict]:
    """Detections made from the ground truth: kept, shifted, grown, shrunk, attributes changed,
    class changed or dropped, duplicated, plus false positives; scores from a few values (ties)."""
    rng = np.random.default_rng(seed)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    attr_ids = [a["id"] for a in gt["attributes"]][:10]
    cats = sorted({a["category_id"] for a in gt["annotations"]} | set(ATTR_CATS[:2]) | set(PLAIN_CATS[:1]))
    scores = (0.3, 0.5, 0.7, 0.9) if rng.random() < 0.6 else None
    out = []

    def score():
        return float(rng.choice(scores)) if scores else float(np.round(rng.random(), 3))

    for a in gt["annotations"]:
        m = mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        attrs = list(a["attribute_ids"])
        cat = a["category_id"]
        op = rng.choice(["keep", "shift", "grow", "shrink", "attrs", "class", "drop", "dup"])
        if op == "drop":
            continue
        if op == "shift":
            m = _shift(m, int(rng.integers(-4, 5)), int(rng.integers(-4, 5)))
        elif op == "grow":
            m = _grow(m, int(rng.integers(1, 3)))
        elif op == "shrink":
            m = _shrink(m, 1)
        elif op == "attrs":
            attrs = sorted(set(attrs) ^ set(rng.choice(attr_ids, int(rng.integers(1, 3)), replace=False).tolist()))
        elif op == "class":
            cat = int(rng.choice(cats))
        if not m.any():
            continue
        copies = 2 if op == "dup" else 1
        for _ in range(copies):
            out.append({"image_id": a["image_id"], "category_id": cat, "score": score(), "segmentation": rle(m),
                        "attribute_ids": attrs})
    for _ in range(int(rng.integers(1, 6))):  # false positives
        image_id = int(rng.choice(list(sizes)))
        m = random_mask(rng, *sizes[image_id])
        out.append({"image_id": image_id, "category_id": int(rng.choice(cats)), "score": score(), "segmentation": rle(m),
                    "attribute_ids": sorted(rng.choice(attr_ids, int(rng.integers(0, 3)), replace=False).tolist())})
    rng.shuffle(out)
    if with_boxes:  # the model's boxes: near the mask's, not equal to it
        for r in out:
            x, y, w, h = mask_util.toBbox(r["segmentation"]).tolist()
            r["bbox"] = [x + float(rng.integers(-2, 3)), y, w + float(rng.integers(0, 6)), h]
    return out


def official_fp_eval(gt_path, results: list[dict], iou_type: str = "segm", cats_with_attributes=None):
    """The official evaluator, run as its README shows -> (FPEval after run() and summarize_class())."""
    if not hasattr(np, "float"):
        np.float = float  # fashionpedia's accumulate still uses the alias numpy removed in 1.24
    from fashionpedia.fp import Fashionpedia
    from fashionpedia.fp_eval import FPEval

    with contextlib.redirect_stdout(io.StringIO()):
        fp_gt = Fashionpedia(str(gt_path))
        fp_dt = fp_gt.loadRes(copy.deepcopy(results))
        ev = FPEval(fp_gt, fp_dt, iou_type)
        if cats_with_attributes is not None:
            ev.FPParams.catsWithAttributes = sorted(cats_with_attributes)
        ev.run()
        ev.summarize_class()
    return ev
