"""COCO-format ground truth and detections, scored with pycocotools' COCOeval (bbox and segm).

Ground truth is a COCO dataset dict: `fashionseg.data.eval_source.ground_truth` for a shard split
(the source's image ids, original or stored grid), or any COCO/Fashionpedia annotation file
(score.read_annotations). Detections ("results") are COCO result dicts with this project's
extra attribute fields: `{"image_id", "category_id" (source id), "score", "segmentation" (RLE),
"bbox" [x, y, w, h] (optional for segm), "attribute_ids" [source ids], "attribute_scores"}`.
"""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The order of COCOeval.stats for bbox/segm.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


class EvalDataError(ValueError):
    """Ground truth or detections that cannot be scored (the message names the sample or field)."""


def _undefined_to_none(x: float) -> float | None:
    """pycocotools reports -1 where a metric is undefined (no ground truth in that range)."""
    x = float(x)
    return None if x < 0 else x


def coco_from_dict(dataset: dict) -> COCO:
    """pycocotools COCO object from an in-memory dict, without its chatter on stdout."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_results(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """COCO results -> a detections COCO object, as the official `loadRes` reads them.

    pycocotools' and Fashionpedia's `loadRes` read a file with boxes (decided by its first
    result) in their box branch: the detection `area` is then the box area, also in a segm
    evaluation, where it only decides the APs/APm/APl ranges. That is kept here, so `score`
    gives the official tools' figures for any file; eval and predict write segm results without
    boxes (`segm_results`), so areas come from masks as for ground truth (Detectron2 does the
    same). Every result is checked first, so a bad one is named instead of failing inside
    pycocotools; an empty list (which `loadRes` cannot take) gives an empty detection set.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    sizes = {im["id"]: (im.get("height"), im.get("width")) for im in coco_gt.dataset["images"]}
    cats = set(coco_gt.getCatIds())
    with_box = bool(results) and isinstance(results[0], dict) and bool(results[0].get("bbox"))
    anns = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvalDataError(f"detection #{i}: not a JSON object but {type(r).__name__}")
        if r.get("image_id") not in sizes:
            raise EvalDataError(f"detection #{i}: image_id {r.get('image_id')!r} is not in the ground truth's images "
                                "(results must use the annotation file's own image ids)")
        if r.get("category_id") not in cats:
            raise EvalDataError(f"detection #{i}: category_id {r.get('category_id')!r} is not in the ground truth's categories")
        if not isinstance(r.get("score"), (int, float)) or isinstance(r.get("score"), bool):
            raise EvalDataError(f"detection #{i}: 'score' must be a number, got {r.get('score')!r}")
        if with_box != bool(r.get("bbox")):
            raise EvalDataError(f"detection #{i}: {'no' if with_box else 'a'} 'bbox' where detection #0 has "
                                f"{'one' if with_box else 'none'}; give every result a bbox or none")
        if with_box and (not isinstance(r["bbox"], (list, tuple)) or len(r["bbox"]) != 4):
            raise EvalDataError(f"detection #{i}: 'bbox' must be [x, y, width, height], got {r['bbox']!r}")
        seg = r.get("segmentation")
        if iou_type == "segm" or not with_box:
            if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
                raise EvalDataError(f"detection #{i}: 'segmentation' must be a COCO RLE dict {{'size', 'counts'}} "
                                    f"(a {iou_type} evaluation{'' if with_box else ' of results without bbox'}), "
                                    f"got {type(seg).__name__}")
            if None not in sizes[r["image_id"]] and list(seg["size"]) != list(sizes[r["image_id"]]):
                raise EvalDataError(f"detection #{i}: mask size {list(seg['size'])} differs from image {r['image_id']}'s "
                                    f"height x width {list(sizes[r['image_id']])}")
        anns.append(copy.deepcopy(r))  # loadRes writes id/area/iscrowd into them
    if not anns:
        dt = COCO()
        dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                      "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            dt.createIndex()
        return dt
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(anns)


def segm_results(results: list[dict]) -> list[dict]:
    """Results for a segm evaluation or file: without `bbox`, so areas come from the masks."""
    return [{k: v for k, v in r.items() if k != "bbox"} for r in results]


def per_category_ap(precision: np.ndarray, cat_ids: list[int], area: int = 0, max_det: int = -1) -> dict[str, dict]:
    """COCOeval precision [T, R, K, A, M] -> {str(category id): {"AP", "AP50", "AP75"}} (None: no GT).

    Keys are strings so the dict survives a JSON round trip unchanged."""
    out = {}
    for k, cat in enumerate(cat_ids):
        row = {}
        for name, t in (("AP", slice(None)), ("AP50", 0), ("AP75", 5)):
            p = precision[t, :, k, area, max_det]
            p = p[p > -1]
            row[name] = float(p.mean()) if p.size else None
        out[str(cat)] = row
    return out


def coco_evaluate(coco_gt: COCO, results: list[dict], iou_type: str) -> dict:
    """Score `results` with COCOeval -> {"AP", "AP50", ..., "ARl", "per_category": {cat_id: {...}}}.

    Undefined values (no ground truth of that kind) are None rather than pycocotools' -1.
    """
    coco_dt = load_results(coco_gt, results, iou_type)
    ev = COCOeval(coco_gt, coco_dt, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict = {name: _undefined_to_none(v) for name, v in zip(STAT_NAMES, ev.stats)}
    out["per_category"] = per_category_ap(ev.eval["precision"], list(ev.params.catIds))
    return out


def gt_counts(gt: dict) -> dict[str, int]:
    """Number of ground-truth instances per str(category id)."""
    counts: dict[str, int] = {}
    for a in gt["annotations"]:
        key = str(a["category_id"])
        counts[key] = counts.get(key, 0) + 1
    return counts
