"""COCO bbox/segm metrics on hand-built ground truth: the oracle scores 1, a perturbed copy less,
and a case small enough to compute AP by hand matches pycocotools' number."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util
import pytest

from fashionseg.data.rle import encode_coco
from fashionseg.data.vocab import Vocab
from fashionseg.eval import coco as coco_lib

VOCAB = Vocab(
    categories=[{"id": 0, "name": "shirt"}, {"id": 3, "name": "pants"}, {"id": 23, "name": "shoe"}],
    attributes=[{"id": 2, "name": "a2"}, {"id": 5, "name": "a5"}, {"id": 40, "name": "a40"}, {"id": 99, "name": "a99"}],
)


def rect_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def instance(cat, mask, attrs=()):
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"category_id": cat, "attribute_ids": list(attrs),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
            "area": int(mask.sum()), "segmentation": encode_coco(mask)}


def sample(key, h, w, instances):
    return key, {"height": h, "width": w, "instances": instances}


def coco_gt(samples, vocab: Vocab = VOCAB) -> dict:
    """(key, {"height", "width", "instances"}) pairs -> a COCO ground-truth dict, image ids 0, 1, ..."""
    images, anns = [], []
    for index, (key, meta) in enumerate(samples):
        images.append({"id": index, "file_name": key, "height": meta["height"], "width": meta["width"]})
        for inst in meta["instances"]:
            anns.append({"id": len(anns) + 1, "image_id": index, "category_id": inst["category_id"],
                         "attribute_ids": list(inst["attribute_ids"]), "segmentation": inst["segmentation"],
                         "area": float(inst["area"]), "bbox": [float(v) for v in inst["bbox"]], "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in vocab.categories],
            "attributes": [dict(a) for a in vocab.attributes]}


def oracle_results(gt: dict, score: float = 1.0) -> list[dict]:
    """Ground truth turned into detections (each annotation with `score`): AP = 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": score, "bbox": list(a["bbox"]),
             "segmentation": dict(a["segmentation"]), "attribute_ids": list(a["attribute_ids"])}
            for a in gt["annotations"]]


def make_gt():
    samples = [
        sample("a", 40, 50, [instance(0, rect_mask(40, 50, 2, 2, 20, 30), [2, 5]),
                             instance(3, rect_mask(40, 50, 25, 5, 48, 38), [40]),
                             instance(23, rect_mask(40, 50, 2, 31, 12, 39))]),
        sample("b", 30, 30, [instance(0, rect_mask(30, 30, 0, 0, 15, 15), [5]),
                             instance(0, rect_mask(30, 30, 16, 16, 30, 30), [])]),
        sample("c", 32, 24, []),
    ]
    return coco_gt(samples, VOCAB)


def test_ground_truth_as_predictions_scores_one():
    gt = make_gt()
    coco_gt = coco_lib.coco_from_dict(gt)
    results = oracle_results(gt)
    for iou_type in ("bbox", "segm"):
        m = coco_lib.coco_evaluate(coco_gt, results, iou_type)
        assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
        assert all(v["AP"] == pytest.approx(1.0) for v in m["per_category"].values())
        assert set(m["per_category"]) == {"0", "3", "23"}


def test_perturbed_predictions_score_lower():
    gt = make_gt()
    coco_gt = coco_lib.coco_from_dict(gt)
    results = oracle_results(gt)
    # shift one mask and its box by 6 px: IoU drops below the upper thresholds
    r = results[1]
    h, w = r["segmentation"]["size"]
    shifted = np.roll(mask_util.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()}), 6, axis=1)
    r["segmentation"] = encode_coco(shifted)
    r["bbox"] = [r["bbox"][0] + 6, r["bbox"][1], r["bbox"][2], r["bbox"][3]]
    # a confident false positive in image c
    results.append({"image_id": 2, "category_id": 0, "score": 2.0, "bbox": [1, 1, 5, 5],
                    "segmentation": encode_coco(rect_mask(32, 24, 1, 1, 6, 6)), "attribute_ids": []})
    for iou_type in ("bbox", "segm"):
        m = coco_lib.coco_evaluate(coco_gt, results, iou_type)
        assert m["AP"] < 0.95
        assert m["per_category"]["3"]["AP"] < 1.0 and m["per_category"]["23"]["AP"] == pytest.approx(1.0)


def hand_case():
    """One image, one category, two GTs; three detections: exact hit, miss, exact hit.

    Precision/recall down the ranking: (1, .5), (.5, .5), (2/3, 1). pycocotools' interpolated
    precision is 1 at the 51 recall thresholds 0..0.50 and 2/3 at the 50 above, at every IoU
    threshold (IoUs are exactly 1 or 0): AP = (51 + 50 * 2/3) / 101."""
    h, w = 40, 40
    g1, g2 = rect_mask(h, w, 0, 0, 10, 10), rect_mask(h, w, 20, 20, 30, 30)
    gt = coco_gt([sample("x", h, w, [instance(0, g1, [2]), instance(0, g2, [2, 5])])], VOCAB)
    far = rect_mask(h, w, 12, 0, 18, 6)
    dets = [(0.9, g1, [2]), (0.8, far, [2]), (0.7, g2, [2, 5])]
    results = [{"image_id": 0, "category_id": 0, "score": s, "segmentation": encode_coco(m),
                "bbox": instance(0, m)["bbox"], "attribute_ids": a} for s, m, a in dets]
    return gt, results


HAND_AP = (51 + 50 * 2 / 3) / 101


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_hand_computed_ap(iou_type):
    gt, results = hand_case()
    m = coco_lib.coco_evaluate(coco_lib.coco_from_dict(gt), results, iou_type)
    assert m["AP"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["AP50"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["AR100"] == pytest.approx(1.0)
    assert m["per_category"]["0"]["AP"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["per_category"]["3"]["AP"] is None  # no ground truth: undefined, not 0


def test_no_detections_and_bad_ids():
    gt = make_gt()
    coco_gt = coco_lib.coco_from_dict(gt)
    m = coco_lib.coco_evaluate(coco_gt, [], "segm")
    assert m["AP"] == 0.0
    with pytest.raises(coco_lib.EvalDataError, match="image_id 17"):
        coco_lib.coco_evaluate(coco_gt, [{"image_id": 17, "category_id": 0, "score": 1, "bbox": [0, 0, 1, 1]}], "bbox")


def test_results_are_read_as_the_official_load_res_reads_them():
    """A segm file with boxes takes its areas from the boxes (pycocotools' and Fashionpedia's
    loadRes do): a detection whose box is large moves out of the small range; without boxes
    (eval's and predict's segm results) the mask decides, as for ground truth."""
    gt, results = hand_case()
    coco_gt_ = coco_lib.coco_from_dict(gt)
    masks_only = coco_lib.segm_results(results)
    assert coco_lib.load_results(coco_gt_, masks_only, "segm").loadAnns(1)[0]["area"] == 100
    boxed = [{**r, "bbox": [0, 0, 40, 40]} for r in results]
    assert coco_lib.load_results(coco_gt_, boxed, "segm").loadAnns(1)[0]["area"] == 1600


def test_bad_results_are_named():
    gt, results = hand_case()
    coco_gt_ = coco_lib.coco_from_dict(gt)
    cases = [({**results[1], "category_id": 12}, "detection #1: category_id 12"),
             ({**results[1], "score": "high"}, "detection #1: 'score' must be a number"),
             ({**results[1], "segmentation": {"size": [10, 10], "counts": "0"}}, r"detection #1: mask size \[10, 10\]"),
             ({k: v for k, v in results[1].items() if k != "bbox"}, "detection #1: no 'bbox' where detection #0 has one")]
    for bad, message in cases:
        with pytest.raises(coco_lib.EvalDataError, match=message):
            coco_lib.load_results(coco_gt_, [results[0], bad, results[2]], "segm")


def test_segm_ignores_boxes_of_results():
    """A result with a wrong box but a right mask is perfect in segm (IoU of masks; the box only
    gives the area, as the official loadRes does) and wrong in bbox."""
    gt, results = hand_case()
    results = [r for r in results if r["score"] != 0.8]
    for r in results:
        r["bbox"] = [35, 35, 2, 2]
    coco_gt = coco_lib.coco_from_dict(gt)
    assert coco_lib.coco_evaluate(coco_gt, results, "segm")["AP"] == pytest.approx(1.0)
    assert coco_lib.coco_evaluate(coco_gt, results, "bbox")["AP"] == pytest.approx(0.0)


def test_threshold_search_finds_the_right_postprocessing():
    """Cached loose detections where the right answer is known: a duplicate of the first object
    (box IoU 2/3, ranked above the second object) that only NMS at IoU <= 0.5 removes, and mask
    probabilities 0.7 on each object plus a 0.45 ring that only mask_thresh 0.5 leaves out;
    score_thresh 0.75 would drop the second object."""
    import torch

    from fashionseg.eval.tune import CachedImage, search

    h, w = 40, 40
    g1, g2 = rect_mask(h, w, 5, 5, 15, 15), rect_mask(h, w, 22, 20, 32, 30)
    gt = coco_gt([sample("x", h, w, [instance(0, g1, [2]), instance(3, g2, [40])])], VOCAB)

    def probs(x0, y0, x1, y1):
        p = torch.zeros(h, w)
        p[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = 0.45
        p[y0:y1, x0:x1] = 0.7
        return p

    dets = [((5, 5, 15, 15), 0, 0.9), ((7, 5, 17, 15), 0, 0.8), ((22, 20, 32, 30), 3, 0.7)]
    out = {"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32),
           "labels": torch.tensor([VOCAB.category_index(d[1]) for d in dets]),
           "scores": torch.tensor([d[2] for d in dets]),
           "masks": torch.stack([probs(*d[0]) for d in dets])[:, None],
           "attribute_scores": torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.8, 0.0]])}
    cache = [CachedImage(0, out, (h, w))]
    trials = search(gt, cache, VOCAB, metric="segm", scores=(0.05, 0.75), nms_values=(0.5, 0.7),
                    mask_values=(0.4, 0.5), max_dets=100, progress=False)
    best = trials[0]
    assert (best["score_thresh"], best["nms_thresh"], best["mask_thresh"], best["value"]) == (0.05, 0.5, 0.5, pytest.approx(1.0))
    assert all(t["value"] < 1.0 for t in trials[1:])
    # the cached crops cut at 0.5 give back exactly the object masks
    assert np.array_equal(mask_util.decode({"size": [h, w], "counts": cache[0].rle(2, 0.5)["counts"].encode()}), g2)
    # and AP^{IoU+F1} is searchable the same way (attributes: a2 for the shirt, a40 for the pants)
    fp = search(gt, cache, VOCAB, metric="iou_f1", scores=(0.05,), nms_values=(0.5,), mask_values=(0.5,), max_dets=100,
                progress=False)
    assert fp[0]["value"] == pytest.approx(1.0)


def test_shard_ground_truth_fed_back_scores_one(synth_shards):
    """GT read from real shards (eval_source.ground_truth) as predictions: 1.0 for bbox, segm and
    AP^{IoU+F1}; dropping every attribute keeps COCO AP at 1.0 but not AP^{IoU+F1}."""
    from fashionseg.data.eval_source import ground_truth
    from fashionseg.eval.score import score_results

    gt = ground_truth(synth_shards, "val")
    assert len(gt["images"]) == 6 and gt["annotations"]
    m = score_results(gt, oracle_results(gt))
    assert (m["bbox"]["AP"], m["segm"]["AP"], m["iou_f1"]["AP"]) == (pytest.approx(1.0),) * 3
    stripped = [{**r, "attribute_ids": []} for r in oracle_results(gt)]
    m = score_results(gt, stripped)
    assert m["segm"]["AP"] == pytest.approx(1.0)
    assert m["iou_f1"]["AP"] < 1.0
