"""AP^{IoU+F1}: the oracle scores 1, attribute or mask errors score lower, hand-computed cases
match, the vectorised matcher equals fp_eval's literal loops, F1 equals sklearn's definition."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fashionseg.data.rle import encode_coco
from fashionseg.eval import coco as coco_lib
from fashionseg.eval.fashionpedia import FashionpediaEval, FashionpediaParams, f1_matrix, fashionpedia_evaluate

from test_eval_metrics import HAND_AP, VOCAB, hand_case, instance, make_gt, rect_mask, sample


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
    assert f1_matrix([[0]], [[0, 1]], 4, "binary")[0, 0] == pytest.approx(2 / 3)


def test_ground_truth_as_predictions_scores_one():
    gt = make_gt()
    m = fashionpedia_evaluate(coco_lib.coco_from_dict(gt), coco_lib.results_from_gt(gt))
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP_IOU75_F175"] == pytest.approx(1.0)
    assert m["cats_with_attributes"] == [0, 3]
    assert all(v["AP"] == pytest.approx(1.0) for v in m["per_category"].values() if v["AP"] is not None)


def test_wrong_attributes_score_lower_but_masks_do_not_care():
    gt = make_gt()
    coco_gt = coco_lib.coco_from_dict(gt)
    results = coco_lib.results_from_gt(gt)
    results[0]["attribute_ids"] = [99]  # shirt in image a: F1 against {2, 5} is far below 0.5
    m = fashionpedia_evaluate(coco_gt, results)
    assert m["AP"] < 1.0
    assert m["per_category"]["0"]["AP"] < 1.0 and m["per_category"]["3"]["AP"] == pytest.approx(1.0)
    assert coco_lib.coco_evaluate(coco_gt, results, "segm")["AP"] == pytest.approx(1.0)
    # attributes on a category without attributes are not scored
    results = coco_lib.results_from_gt(gt)
    results[2]["attribute_ids"] = [99, 40]
    assert fashionpedia_evaluate(coco_gt, results)["AP"] == pytest.approx(1.0)


def test_hand_computed_iou_f1():
    """hand_case with the third detection predicting {a2} against truth {a2, a5} (4 attributes):
    F1 = 22/30 ~ 0.733, so it is a hit for F1 thresholds 0.50..0.70 (5 of 10), a false positive
    above: there the ranking is hit, miss, miss: precision 1 up to recall 0.5, 0 after: 51/101."""
    gt, results = hand_case()
    results[2]["attribute_ids"] = [2]
    coco_gt = coco_lib.coco_from_dict(gt)
    m = fashionpedia_evaluate(coco_gt, results)
    assert m["AP"] == pytest.approx((HAND_AP + 51 / 101) / 2, abs=1e-12)
    assert m["AP_F150"] == pytest.approx(HAND_AP, abs=1e-12)
    assert m["AP_F175"] == pytest.approx(51 / 101, abs=1e-12)
    assert m["AP_IOU75_F150"] == pytest.approx(HAND_AP, abs=1e-12)
    # with the attributes right it is plain COCO AP, equal to pycocotools' own
    gt, results = hand_case()
    assert fashionpedia_evaluate(coco_gt, results)["AP"] == pytest.approx(
        coco_lib.coco_evaluate(coco_gt, results, "segm")["AP"], abs=1e-12)


def test_plain_category_weighs_one_f1_slice():
    """fp_eval's mean: an attribute category contributes its 10 F1 slices, a plain one a single
    IoU-only slice, so AP = (10 * AP_attr + AP_plain) / 11."""
    gt, results = hand_case()
    results[2]["attribute_ids"] = [2]
    h, w = 40, 40
    extra = rect_mask(h, w, 32, 0, 40, 8)
    samples = [sample("x", h, w, [instance(0, rect_mask(h, w, 0, 0, 10, 10), [2]),
                                  instance(0, rect_mask(h, w, 20, 20, 30, 30), [2, 5]),
                                  instance(7, extra)])]
    gt = coco_lib.gt_from_samples(samples, VOCAB)
    results.append({"image_id": 0, "category_id": 7, "score": 0.5, "segmentation": encode_coco(extra), "attribute_ids": []})
    m = fashionpedia_evaluate(coco_lib.coco_from_dict(gt), results)
    attr_ap = (HAND_AP + 51 / 101) / 2
    assert m["AP"] == pytest.approx((10 * attr_ap + 1.0) / 11, abs=1e-12)
    assert m["per_category"]["7"] == {"AP": pytest.approx(1.0), "AP_IOU50_F150": pytest.approx(1.0), "has_attributes": False}


class LoopEval(FashionpediaEval):
    """fp_eval.py's evaluateImg for attribute categories, as literal nested loops (the reference)."""

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802,N803
        if catId not in self.cats_with_attributes:
            return super().evaluateImg(imgId, catId, aRng, maxDet)
        p = self.params
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gt and not dt:
            return None
        for g in gt:
            g["_ignore"] = int(g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1])
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][:maxDet]
        f1s = f1_matrix([[self.attr_index[a] for a in d["attribute_ids"]] for d in dt],
                        [[self.attr_index[a] for a in g["attribute_ids"]] for g in gt], len(self.attr_index))
        gt = [gt[i] for i in gtind]
        ious = self.ious[imgId, catId]
        ious = ious[:, gtind] if len(ious) else ious
        f1s = f1s[:, gtind] if f1s.size else f1s
        T, F, G, D = len(p.iouThrs), len(self.fp.f1_thrs), len(gt), len(dt)
        gtm, dtm, dt_ig = np.zeros((T, F, G)), np.zeros((T, F, D)), np.zeros((T, F, D))
        gt_ig = np.array([g["_ignore"] for g in gt])
        for ti, t in enumerate(p.iouThrs):
            if len(ious) == 0:
                break
            for fi, f in enumerate(self.fp.f1_thrs):
                for di, d in enumerate(dt):
                    iou, f1, m = min(t, 1 - 1e-10), min(f, 1 - 1e-10), -1
                    for gi in range(G):
                        if gtm[ti, fi, gi] > 0:
                            continue
                        if m > -1 and gt_ig[m] == 0 and gt_ig[gi] == 1:
                            break
                        if ious[di, gi] < iou or f1s[di, gi] < f1:
                            continue
                        iou, f1, m = ious[di, gi], f1s[di, gi], gi
                    if m == -1:
                        continue
                    dt_ig[ti, fi, di] = gt_ig[m]
                    dtm[ti, fi, di] = gt[m]["id"]
                    gtm[ti, fi, m] = d["id"]
        a = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape(1, 1, D)
        dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, a))
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt],
                "dtMatches": dtm.reshape(T * F, D), "gtMatches": gtm.reshape(T * F, G),
                "dtScores": [d["score"] for d in dt], "gtIgnore": gt_ig, "dtIgnore": dt_ig.reshape(T * F, D)}


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_vectorised_matching_equals_reference_loops(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    h = w = 24
    attrs = [a["id"] for a in VOCAB.attributes]

    def rand_inst(cat):
        x0, y0 = rng.integers(0, 16, 2)
        m = rect_mask(h, w, x0, y0, x0 + rng.integers(1, 9), y0 + rng.integers(1, 9))
        return instance(cat, m, sorted(rng.choice(attrs, rng.integers(0, 4), replace=False).tolist()))

    samples = [sample(f"s{i}", h, w, [rand_inst(int(rng.choice([0, 3]))) for _ in range(rng.integers(0, 4))])
               for i in range(3)]
    gt = coco_lib.gt_from_samples(samples, VOCAB)
    if not gt["annotations"]:
        return
    results = []
    for i in range(3):
        for _ in range(rng.integers(0, 6)):
            inst = rand_inst(int(rng.choice([0, 3])))
            results.append({"image_id": i, "category_id": inst["category_id"], "score": float(rng.choice([0.3, 0.5, 0.9])),
                            "segmentation": inst["segmentation"], "attribute_ids": inst["attribute_ids"]})
    if not results:
        return
    coco_gt = coco_lib.coco_from_dict(gt)
    precisions = []
    for cls in (FashionpediaEval, LoopEval):
        ev = cls(coco_gt, coco_lib.load_results(coco_gt, results, "segm"), "segm",
                 FashionpediaParams(cats_with_attributes=frozenset({0, 3})))
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
        precisions.append(ev.eval["precision"])
    np.testing.assert_array_equal(precisions[0], precisions[1])


def test_missing_attribute_ids_is_a_clear_error():
    gt, results = hand_case()
    del results[0]["attribute_ids"]
    with pytest.raises(coco_lib.EvalDataError, match="detection #0 has no 'attribute_ids'"):
        fashionpedia_evaluate(coco_lib.coco_from_dict(gt), results)
