"""AP^{IoU+F1}: the oracle scores 1, attribute or mask errors score lower, hand-computed cases
match, F1 equals sklearn's definition, the category set is the official one whatever the
vocabulary. (Figure-for-figure equality with the official evaluator: test_score_official.py.)"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fashionseg.data.rle import encode_coco
from fashionseg.eval import coco as coco_lib
from fashionseg.eval.fashionpedia import (OFFICIAL_CATS_WITH_ATTRIBUTES, f1_matrix, fashionpedia_evaluate,
                                          parse_attribute_categories)

from test_eval_metrics import HAND_AP, coco_gt, hand_case, instance, make_gt, oracle_results, rect_mask, sample


def sklearn_macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    """sklearn f1_score(true, pred, average='macro') for 1-D 0/1 vectors, written out."""
    labels = sorted(set(true.tolist()) | set(pred.tolist()))
    f1s = []
    for lab in labels:
        tp = int(((pred == lab) & (true == lab)).sum())
        fp = int(((pred == lab) & (true != lab)).sum())
        fn = int(((pred != lab) & (true == lab)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12).flatmap(lambda a: st.tuples(
    st.just(a),
    st.lists(st.sets(st.integers(0, a - 1)), min_size=1, max_size=4),
    st.lists(st.sets(st.integers(0, a - 1)), min_size=1, max_size=4))))
def test_f1_matrix_is_sklearn_binary_macro(case):
    a, dts, gts = case
    got = f1_matrix([sorted(d) for d in dts], [sorted(g) for g in gts], a)
    for i, d in enumerate(dts):
        for j, g in enumerate(gts):
            dv, gv = np.zeros(a, int), np.zeros(a, int)
            dv[list(d)], gv[list(g)] = 1, 1
            assert got[i, j] == pytest.approx(sklearn_macro_f1(gv, dv), abs=1e-12)


def test_f1_by_hand():
    # 4 attributes, truth {0, 1}, prediction {0}: F1(present) = 2/3, F1(absent) = 4/5 -> 22/30
    assert f1_matrix([[0]], [[0, 1]], 4)[0, 0] == pytest.approx(22 / 30)
    assert f1_matrix([[]], [[]], 4)[0, 0] == 1.0
    assert f1_matrix([[]], [[3]], 294)[0, 0] < 0.5  # predicting nothing never passes


def test_ground_truth_as_predictions_scores_one():
    gt = make_gt()
    m = fashionpedia_evaluate(coco_lib.coco_from_dict(gt), oracle_results(gt))
    for table in ("iou_f1", "iou_only", "f1_only"):
        assert m[table]["AP"] == pytest.approx(1.0) and m[table]["AR@100"] == pytest.approx(1.0)
    assert m["iou_f1"]["AP_IOU75_F175"] == pytest.approx(1.0)
    assert m["attribute_categories"] == {"set": "official", "ids": sorted(OFFICIAL_CATS_WITH_ATTRIBUTES)}
    assert m["supercategories"]["outerwear"]["iou_f1"]["AP"] == pytest.approx(1.0)  # ids 0, 3
    assert m["iou_f1"]["APo"] == pytest.approx(1.0) and m["iou_only"]["APa"] == pytest.approx(1.0)  # id 23: shoe
    assert "APa" not in m["iou_f1"] and m["supercategories"]["part"]["iou_only"] is None  # no part in VOCAB
    per = m["per_category"]
    assert set(per["0"]) == {"iou_f1", "f1_only", "iou_only"} and set(per["23"]) == {"iou_only"}
    assert all(t["AP"] == pytest.approx(1.0) for v in per.values() for t in v.values() if t["AP"] is not None)


def test_the_category_set_is_the_official_one_whatever_the_vocabulary():
    """The set was derived from the evaluated ground truth unless the vocabulary was exactly
    46/294, so it changed with the vocabulary and with --max-images; now it is fp_eval's list
    unless asked otherwise, and the output names the set used."""
    gt = make_gt()
    coco = coco_lib.coco_from_dict(gt)
    results = oracle_results(gt)
    results[2]["attribute_ids"] = [99]  # id 23 (not an official attribute category) with a wrong attribute
    assert fashionpedia_evaluate(coco, results)["iou_f1"]["AP"] == pytest.approx(1.0)
    m = fashionpedia_evaluate(coco, results, attribute_categories=frozenset({0, 3, 23}))
    assert m["iou_f1"]["AP"] < 1.0 and m["attribute_categories"] == {"set": "custom", "ids": [0, 3, 23]}
    data = fashionpedia_evaluate(coco, results, attribute_categories="data")  # categories with labelled GT
    assert data["attribute_categories"] == {"set": "data", "ids": [0, 3]}
    assert parse_attribute_categories("official") == "official" and parse_attribute_categories(" 3,7 ") == {3, 7}
    with pytest.raises(ValueError, match="--attribute-categories"):
        parse_attribute_categories("shirts")
    with pytest.raises(coco_lib.EvalDataError, match=r"category id\(s\) \[12\]"):
        fashionpedia_evaluate(coco, results, attribute_categories=frozenset({0, 12}))


def test_wrong_attributes_score_lower_but_masks_do_not_care():
    gt = make_gt()
    coco = coco_lib.coco_from_dict(gt)
    results = oracle_results(gt)
    results[0]["attribute_ids"] = [99]  # shirt in image a: F1 against {2, 5} is far below 0.5
    m = fashionpedia_evaluate(coco, results)
    assert m["iou_f1"]["AP"] < 1.0 and m["f1_only"]["AP"] < 1.0
    assert m["iou_only"]["AP"] == pytest.approx(1.0)
    assert m["per_category"]["0"]["iou_f1"]["AP"] < 1.0 and m["per_category"]["3"]["iou_f1"]["AP"] == pytest.approx(1.0)
    assert coco_lib.coco_evaluate(coco, results, "segm")["AP"] == pytest.approx(1.0)
    # attributes on a category without attributes are not scored
    results = oracle_results(gt)
    results[2]["attribute_ids"] = [99, 40]
    assert fashionpedia_evaluate(coco, results)["iou_f1"]["AP"] == pytest.approx(1.0)


def test_hand_computed_iou_f1():
    """hand_case with the third detection predicting {a2} against truth {a2, a5} (4 attributes):
    F1 = 22/30 ~ 0.733, so it is a hit for F1 thresholds 0.50..0.70 (5 of 10), a false positive
    above: there the ranking is hit, miss, miss: precision 1 up to recall 0.5, 0 after: 51/101."""
    gt, results = hand_case()
    results[2]["attribute_ids"] = [2]
    coco = coco_lib.coco_from_dict(gt)
    m = fashionpedia_evaluate(coco, results)["iou_f1"]
    assert m["AP"] == pytest.approx((HAND_AP + 51 / 101) / 2, abs=1e-12)
    assert m["AP_F150"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["AP_F175"] == pytest.approx(51 / 101, abs=1e-12)
    assert m["AP_IOU75_F150"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["AR@100"] == pytest.approx((1.0 + 0.5) / 2, abs=1e-12)  # recall 1 for 5 F1 thresholds, 1/2 for 5
    # with the attributes right it is plain COCO AP, equal to pycocotools' own
    gt, results = hand_case()
    assert fashionpedia_evaluate(coco, results)["iou_f1"]["AP"] == pytest.approx(
        coco_lib.coco_evaluate(coco, results, "segm")["AP"], abs=1e-12)


def test_plain_category_weighs_one_f1_slice():
    """fp_eval's mean: an attribute category contributes its 10 F1 slices, a plain one a single
    IoU-only slice, so AP = (10 * AP_attr + AP_plain) / 11."""
    gt, results = hand_case()
    results[2]["attribute_ids"] = [2]
    h, w = 40, 40
    extra = rect_mask(h, w, 32, 0, 40, 8)
    samples = [sample("x", h, w, [instance(0, rect_mask(h, w, 0, 0, 10, 10), [2]),
                                  instance(0, rect_mask(h, w, 20, 20, 30, 30), [2, 5]),
                                  instance(23, extra)])]
    gt = coco_gt(samples)
    results.append({"image_id": 0, "category_id": 23, "score": 0.5, "segmentation": encode_coco(extra),
                    "bbox": instance(23, extra)["bbox"], "attribute_ids": []})
    m = fashionpedia_evaluate(coco_lib.coco_from_dict(gt), results)
    attr_ap = (HAND_AP + 51 / 101) / 2
    assert m["iou_f1"]["AP"] == pytest.approx((10 * attr_ap + 1.0) / 11, abs=1e-12)
    assert m["per_category"]["23"]["iou_only"]["AP"] == pytest.approx(1.0) and "iou_f1" not in m["per_category"]["23"]


def test_missing_attribute_ids_is_a_clear_error():
    gt, results = hand_case()
    del results[0]["attribute_ids"]
    with pytest.raises(coco_lib.EvalDataError, match="detection #0 has no 'attribute_ids'"):
        fashionpedia_evaluate(coco_lib.coco_from_dict(gt), results)
