"""`fashionseg score ANNOTATIONS RESULTS`: any COCO results file against a COCO/Fashionpedia
annotation file, with the code and tables `eval` uses, so models compare without our checkpoints.

Metrics dict (`eval` and `score` alike; also the JSON written by `--out`):
  {"num_images", "num_detections",
   "bbox" / "segm": pycocotools' {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10",
                                  "AR100", "ARs", "ARm", "ARl", "per_category": {id: {"AP", "AP50", "AP75"}}},
   "iou_f1", "iou_only", "f1_only": the official evaluator's three tables (fashionpedia.py),
   "supercategories": {"outerwear" | "accessory" | "part": {table: {...}}},
   "fashionpedia_per_category": {id: {table: {...}}}, "attribute_categories": {"set", "ids"},
   "iou_f1_type": "segm" | "bbox", "gt_counts": {id: n}}
Values are fractions in 0..1, None where undefined (no ground truth of that kind); category ids
are strings so the dict survives a JSON round trip.

Results are read as the official `loadRes` reads them (coco.load_results): with boxes, the
detection area is the box's. An annotation file without `attributes` is scored with COCO AP only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fashionseg.eval import coco as coco_lib
from fashionseg.eval.fashionpedia import fashionpedia_evaluate, parse_attribute_categories


def score_results(gt: dict, results: list[dict], *, iou_types=coco_lib.IOU_TYPES, iou_f1: str | None = "segm",
                  attribute_categories="official", per_category: bool = True,
                  segm_area_from_masks: bool = False) -> dict:
    """Ground-truth dict + COCO results -> metrics (module docstring); the model-free core of eval.

    `iou_f1`: the IoU type of AP^{IoU+F1} (None: skip it). `segm_area_from_masks`: score segm
    without the results' boxes (eval's own results, whose boxes are the model's, not the masks')."""
    coco_gt = coco_lib.coco_from_dict(gt)
    out: dict[str, Any] = {"num_images": len(gt["images"]), "num_detections": len(results)}
    segm = coco_lib.segm_results(results) if segm_area_from_masks else results
    for iou_type in iou_types:
        out[iou_type] = coco_lib.coco_evaluate(coco_gt, segm if iou_type == "segm" else results, iou_type)
    if iou_f1:
        fp = fashionpedia_evaluate(coco_gt, segm if iou_f1 == "segm" else results, iou_f1, attribute_categories,
                                   per_category=per_category)
        out.update(iou_f1=fp["iou_f1"], iou_only=fp["iou_only"], f1_only=fp["f1_only"],
                   supercategories=fp["supercategories"], attribute_categories=fp["attribute_categories"],
                   iou_f1_type=iou_f1)
        if per_category:
            out["fashionpedia_per_category"] = fp["per_category"]
    out["gt_counts"] = coco_lib.gt_counts(gt)
    return out


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise coco_lib.EvalDataError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise coco_lib.EvalDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def read_annotations(path) -> dict:
    """A COCO / Fashionpedia annotation file -> its dict, checked (messages name the key or entry).

    Annotations without `iscrowd` get 0; every other field pycocotools needs must be there."""
    path = Path(path)
    data = _load_json(path, "annotation file")
    if not isinstance(data, dict):
        raise coco_lib.EvalDataError(f"{path}: expected a COCO object with images/annotations/categories, "
                                     f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise coco_lib.EvalDataError(f"{path}: '{key}' is missing or not a list (a COCO annotation file has "
                                         "images, annotations and categories)")
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or isinstance(im.get("id"), bool):
            raise coco_lib.EvalDataError(f"{path}: images[{i}] has no integer 'id'")
        for k in ("height", "width"):
            if not isinstance(im.get(k), int) or im[k] <= 0:
                raise coco_lib.EvalDataError(f"{path}: images[{i}] (id {im['id']}) has no positive integer '{k}'")
        if im["id"] in images:
            raise coco_lib.EvalDataError(f"{path}: images[{i}]: image id {im['id']} appears twice")
        images[im["id"]] = im
    cats = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise coco_lib.EvalDataError(f"{path}: categories[{i}] has no integer 'id'")
        cats.add(c["id"])
    attrs = {a.get("id") for a in data.get("attributes") or [] if isinstance(a, dict)}
    has_attrs = "attributes" in data
    ann_ids = set()
    for i, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
        if not isinstance(a, dict):
            raise coco_lib.EvalDataError(f"{path}: annotations[{i}] is not an object")
        if a.get("id") in ann_ids or not isinstance(a.get("id"), int):
            raise coco_lib.EvalDataError(f"{where}: 'id' must be a unique integer")
        ann_ids.add(a["id"])
        if a.get("image_id") not in images:
            raise coco_lib.EvalDataError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        if a.get("category_id") not in cats:
            raise coco_lib.EvalDataError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
        for k in ("segmentation", "area", "bbox"):
            if k not in a:
                raise coco_lib.EvalDataError(f"{where}: no '{k}'")
        a.setdefault("iscrowd", 0)
        if has_attrs:
            if not isinstance(a.get("attribute_ids"), list):
                raise coco_lib.EvalDataError(f"{where}: no 'attribute_ids' list (the file has 'attributes', "
                                             "so every annotation needs one, [] for none)")
            unknown = [x for x in a["attribute_ids"] if x not in attrs]
            if unknown:
                raise coco_lib.EvalDataError(f"{where}: attribute id(s) {unknown} are not in 'attributes'")
    return data


def read_results(path) -> list[dict]:
    """A COCO results file (a JSON list of detections) -> the list (entries are checked when scored)."""
    path = Path(path)
    data = _load_json(path, "results file")
    if not isinstance(data, list):
        raise coco_lib.EvalDataError(f"{path}: a results file is a JSON list of detections, got a {type(data).__name__}"
                                     + (" (a COCO annotation file? pass it as ANNOTATIONS)" if isinstance(data, dict) else ""))
    return data


# -- command ------------------------------------------------------------------------------------
def add_attribute_categories_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attribute-categories", default="official", metavar="official|data|ID,ID,...",
                   help="categories scored with attributes in AP^{IoU+F1}: the official evaluator's fixed 18 "
                        "(default, whatever the vocabulary), those with attribute-labelled ground truth, or a list")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("annotations", metavar="ANNOTATIONS", help="COCO / Fashionpedia annotation JSON")
    p.add_argument("results", metavar="RESULTS", help="COCO results JSON (a list; e.g. predict's predictions.json)")
    p.add_argument("--iou-type", choices=coco_lib.IOU_TYPES, default="segm",
                   help="IoU of masks or of boxes, for COCO AP and AP^{IoU+F1} (default: segm)")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    add_attribute_categories_argument(p)
    p.add_argument("--no-iou-f1", action="store_true", help="COCO AP only")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fashionseg.eval.tables import print_metrics
    from fashionseg.io import atomic_write_json

    console = Console(stderr=True)
    try:
        spec = parse_attribute_categories(args.attribute_categories)
        gt = read_annotations(args.annotations)
        results = read_results(args.results)
        iou_f1 = None if args.no_iou_f1 else args.iou_type
        if iou_f1 and "attributes" not in gt:
            console.print(f"{escape(args.annotations)} has no 'attributes': AP^{{IoU+F1}} skipped, COCO AP only")
            iou_f1 = None
        metrics = score_results(gt, results, iou_types=(args.iou_type,), iou_f1=iou_f1, attribute_categories=spec)
    except (coco_lib.EvalDataError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    metrics.update(annotations=str(args.annotations), results=str(args.results))
    if args.out:
        atomic_write_json(Path(args.out), metrics)
    print_metrics(metrics, gt["categories"], Console())
    if args.out:
        console.print(f"metrics written to {escape(str(args.out))}")
    return 0
