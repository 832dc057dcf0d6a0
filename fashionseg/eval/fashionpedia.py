"""Fashionpedia's attribute-aware AP^{IoU+F1} (the fashionpedia-api `fp_eval.py` FPEval metric).

What is implemented, exactly (reference: KMnP/cvdfoundation fashionpedia-api, fashionpedia/fp_eval.py):

* IoU is pycocotools' (mask IoU for "segm", box IoU for "bbox"), computed by COCOeval itself.
* Attribute F1 between a detection and a ground truth: both attribute sets become multi-hot
  vectors over the WHOLE attribute vocabulary (A entries). The default `f1_type="binary_macro"`
  is fp_eval's default, sklearn's `f1_score(gt, dt, average="macro")` on those 1-D vectors: the
  mean, over the labels present in either vector ({0}, {1} or {0, 1}), of the per-label F1
  2tp / (2tp + fp + fn). So two empty sets score 1.0, and an empty prediction against a non-empty
  truth scores about 0.5 (only the "absent" label is right), which fails every F1 threshold.
  `f1_type="binary"` is the plain F1 of the positive label (two empty sets: 1.0, our choice).
  sklearn is not needed: the counts come from one matrix product.
* Predicted attribute set = the detection's `attribute_ids`; the producers in this package
  (inference.py) put there the attributes whose sigmoid score is >= `attr_thresh` (default 0.5).
* Matching, for categories that carry attributes: per image and category, detections in
  descending score order (mergesort, at most maxDets[-1]) are greedily matched to a not yet
  matched ground truth with IoU >= t AND F1 >= f, for every (t, f) on the grid
  IoU 0.50:0.05:0.95 x F1 0.50:0.05:0.95. As in fp_eval, a later candidate replaces the current
  best only when both its IoU and its F1 are >= the best so far; ignored (out-of-area-range)
  ground truths are matched last, exactly as COCOeval does. Crowd ground truths keep COCOeval's
  rule (may match several detections); fashionseg shards never contain any.
* Categories without attributes are matched on IoU alone (COCOeval's own evaluateImg).
  "Categories that carry attributes" is fp_eval's hard-coded list of 18 ids for the 46-category
  Fashionpedia vocabulary (`FASHIONPEDIA_CATS_WITH_ATTRIBUTES`, used when the evaluated
  vocabulary is that one); for any other vocabulary it is the set of categories that have at
  least one ground-truth instance with a non-empty attribute list; `cats_with_attributes=` overrides.
* Precision/recall accumulation is pycocotools' COCOeval.accumulate run on the flattened
  (IoU, F1) grid, so the 101-point interpolation is bit-for-bit pycocotools'.
* Summary, as fp_eval's `_summarize`: AP = mean of every defined (> -1) precision value over
  recall thresholds and IoU thresholds, and over the 10 F1 thresholds for categories with
  attributes but a single (IoU-only) slice for categories without them; so an attribute
  category weighs 10x a plain one in the mean, as in the reference. AP_IOU50 fixes IoU = 0.5 (F1
  still swept), AP_F150 fixes F1 = 0.5 (IoU swept), AP_IOU50_F150 fixes both, etc.; APs/m/l
  restrict the area range; AR100 is the same mean over recall.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fashionseg.eval import coco as coco_lib

# fp_eval.py FPParams.catsWithAttributes (ids of the 46-category Fashionpedia / Kaggle 2020 vocabulary).
FASHIONPEDIA_CATS_WITH_ATTRIBUTES = frozenset({10, 7, 0, 6, 5, 4, 9, 31, 33, 3, 12, 11, 1, 2, 8, 32, 29, 28})
F1_TYPES = ("binary_macro", "binary")


def _thresholds() -> np.ndarray:
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


@dataclass
class FashionpediaParams:
    f1_thrs: np.ndarray = field(default_factory=_thresholds)
    f1_type: str = "binary_macro"
    cats_with_attributes: frozenset | None = None  # None: derived (see the module docstring)


def f1_matrix(dt_attrs: list[list[int]], gt_attrs: list[list[int]], num_attributes: int,
              f1_type: str = "binary_macro") -> np.ndarray:
    """Attribute F1 of every (detection, ground truth) pair -> float array [D, G].

    `*_attrs` are lists of contiguous attribute indices (0..num_attributes-1)."""
    if f1_type not in F1_TYPES:
        raise ValueError(f"f1_type must be one of {F1_TYPES}, got {f1_type!r}")
    D, G, A = len(dt_attrs), len(gt_attrs), num_attributes
    if D == 0 or G == 0:
        return np.zeros((D, G))
    d = np.zeros((D, A), dtype=np.int64)
    g = np.zeros((G, A), dtype=np.int64)
    for i, ids in enumerate(dt_attrs):
        d[i, list(ids)] = 1
    for j, ids in enumerate(gt_attrs):
        g[j, list(ids)] = 1
    tp = d @ g.T
    nd, ng = d.sum(1)[:, None], g.sum(1)[None, :]
    fp, fn = nd - tp, ng - tp
    tn = A - tp - fp - fn
    pos_den = 2 * tp + fp + fn
    f1_pos = np.where(pos_den > 0, 2 * tp / np.maximum(pos_den, 1), 1.0)
    if f1_type == "binary":
        return f1_pos.astype(float)
    neg_den = 2 * tn + fp + fn
    f1_neg = 2 * tn / np.maximum(neg_den, 1)
    has_pos = (nd > 0) | (ng > 0)          # label 1 occurs in either vector
    has_neg = (nd < A) | (ng < A)          # label 0 occurs in either vector
    total = np.where(has_pos, f1_pos, 0.0) + np.where(has_neg, f1_neg, 0.0)
    return total / np.maximum(has_pos.astype(int) + has_neg.astype(int), 1)


class FashionpediaEval(COCOeval):
    """COCOeval with an F1 axis: `precision` becomes [T, F, R, K, A, M] after `accumulate()`."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, iou_type: str = "segm", params: FashionpediaParams | None = None):
        super().__init__(coco_gt, coco_dt, iou_type)
        self.fp = params or FashionpediaParams()
        attrs = coco_gt.dataset.get("attributes") or []
        self.attr_index = {a["id"]: i for i, a in enumerate(attrs)}
        self.cats_with_attributes = self._cats_with_attributes(coco_gt)
        self._f1_cache: dict = {}

    def _cats_with_attributes(self, coco_gt: COCO) -> frozenset:
        if self.fp.cats_with_attributes is not None:
            return frozenset(self.fp.cats_with_attributes)
        cats = coco_gt.dataset.get("categories") or []
        if len(cats) == 46 and sorted(c["id"] for c in cats) == list(range(46)) \
                and len(coco_gt.dataset.get("attributes") or []) >= 294:
            return FASHIONPEDIA_CATS_WITH_ATTRIBUTES
        return frozenset(a["category_id"] for a in coco_gt.dataset["annotations"] if a.get("attribute_ids"))

    def _attr_indices(self, ann: dict) -> list[int]:
        out = []
        for a in ann.get("attribute_ids") or []:
            if a not in self.attr_index:
                raise coco_lib.EvalDataError(f"annotation/detection {ann.get('id')}: attribute id {a} is not in the vocabulary")
            out.append(self.attr_index[a])
        return out

    def _f1(self, img_id, cat_id, dt: list[dict], gt: list[dict]) -> np.ndarray:
        key = (img_id, cat_id)
        if key not in self._f1_cache:
            self._f1_cache[key] = f1_matrix([self._attr_indices(d) for d in dt], [self._attr_indices(g) for g in gt],
                                            len(self.attr_index), self.fp.f1_type)
        return self._f1_cache[key]

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802,N803 (pycocotools' names)
        p = self.params
        F = len(self.fp.f1_thrs)
        if catId not in self.cats_with_attributes:
            e = super().evaluateImg(imgId, catId, aRng, maxDet)
            if e is None:
                return None
            for k in ("dtMatches", "gtMatches", "dtIgnore"):
                e[k] = np.repeat(e[k], F, axis=0)  # [T, N] -> [T*F, N], t-major like the grid below
            return e
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return None
        for g in gt:
            g["_ignore"] = 1 if (g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]) else 0
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        dt_sorted = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")]
        f1_all = self._f1(imgId, catId, dt_sorted[: p.maxDets[-1]], gt)  # rows as in computeIoU
        gt = [gt[i] for i in gtind]
        dt = dt_sorted[:maxDet]
        ious = self.ious[imgId, catId]
        ious = ious[:, gtind] if len(ious) > 0 else ious
        f1s = f1_all[:, gtind] if f1_all.size else f1_all
        iscrowd = np.array([bool(g["iscrowd"]) for g in gt], dtype=bool)
        T, G, D = len(p.iouThrs), len(gt), len(dt)
        # the (IoU, F1) grid flattened t-major: point i is (iouThrs[i // F], f1_thrs[i % F])
        iou_grid = np.minimum(np.repeat(np.asarray(p.iouThrs, float), F), 1 - 1e-10)
        f1_grid = np.minimum(np.tile(np.asarray(self.fp.f1_thrs, float), T), 1 - 1e-10)
        gtm = np.zeros((T * F, G))
        dtm = np.zeros((T * F, D))
        gt_ig = np.array([g["_ignore"] for g in gt], dtype=int)
        dt_ig = np.zeros((T * F, D))
        if len(ious):
            for di, d in enumerate(dt):
                # COCOeval's greedy match for every grid point at once (vectorised over the grid)
                best_iou, best_f1 = iou_grid.copy(), f1_grid.copy()
                m = np.full(T * F, -1)
                stopped = np.zeros(T * F, dtype=bool)
                for gi in range(G):
                    if gt_ig[gi] == 1:  # matched to a regular gt already: ignored ones come after, stop
                        stopped |= (m > -1) & (gt_ig[np.maximum(m, 0)] == 0)
                    free = ~stopped & ((gtm[:, gi] == 0) | iscrowd[gi])
                    ok = free & (ious[di, gi] >= best_iou) & (f1s[di, gi] >= best_f1)
                    best_iou = np.where(ok, ious[di, gi], best_iou)
                    best_f1 = np.where(ok, f1s[di, gi], best_f1)
                    m = np.where(ok, gi, m)
                hit = np.flatnonzero(m > -1)
                if hit.size:
                    dt_ig[hit, di] = gt_ig[m[hit]]
                    dtm[hit, di] = [gt[j]["id"] for j in m[hit]]
                    gtm[hit, m[hit]] = d["id"]
        out_of_range = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape(1, D)
        dt_ig = np.logical_or(dt_ig, np.logical_and(dtm == 0, out_of_range))
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt],
                "dtMatches": dtm, "gtMatches": gtm,
                "dtScores": [d["score"] for d in dt], "gtIgnore": gt_ig, "dtIgnore": dt_ig}

    def accumulate(self, p=None):
        """pycocotools' accumulate over the flattened (IoU, F1) grid, reshaped to [T, F, ...]."""
        iou_thrs = self.params.iouThrs
        T, F = len(iou_thrs), len(self.fp.f1_thrs)
        self.params.iouThrs = np.arange(T * F, dtype=float)  # accumulate only reads its length
        try:
            super().accumulate(p)
        finally:
            self.params.iouThrs = iou_thrs
        for k in ("precision", "scores"):
            self.eval[k] = self.eval[k].reshape(T, F, *self.eval[k].shape[1:])
        self.eval["recall"] = self.eval["recall"].reshape(T, F, *self.eval["recall"].shape[1:])

    # -- summary ------------------------------------------------------------------------------
    def _mean(self, kind: str, iou_thr=None, f1_thr=None, area="all", max_det=100, cat_ids=None) -> float | None:
        p = self.params
        arr = self.eval["precision" if kind == "ap" else "recall"]  # [T, F, (R,) K, A, M]
        a = p.areaRngLbl.index(area)
        m = p.maxDets.index(max_det)
        t = slice(None) if iou_thr is None else [int(np.argmin(np.abs(p.iouThrs - iou_thr)))]
        f = slice(None) if f1_thr is None else [int(np.argmin(np.abs(self.fp.f1_thrs - f1_thr)))]
        parts = []
        for k, cat in enumerate(p.catIds):
            if cat_ids is not None and cat not in cat_ids:
                continue
            fk = f if cat in self.cats_with_attributes else [0]  # plain categories: one IoU-only slice
            s = arr[t][:, fk][..., k, a, m]
            parts.append(s[s > -1].ravel())
        vals = np.concatenate(parts) if parts else np.zeros(0)
        return float(vals.mean()) if vals.size else None

    def summary(self) -> dict:
        out = {"AP": self._mean("ap")}
        out["AP_IOU50"] = self._mean("ap", iou_thr=0.5)
        out["AP_IOU75"] = self._mean("ap", iou_thr=0.75)
        out["AP_F150"] = self._mean("ap", f1_thr=0.5)
        out["AP_F175"] = self._mean("ap", f1_thr=0.75)
        for t in (0.5, 0.75):
            for f in (0.5, 0.75):
                out[f"AP_IOU{int(t * 100)}_F1{int(f * 100)}"] = self._mean("ap", iou_thr=t, f1_thr=f)
        for area in ("small", "medium", "large"):
            out[f"AP{area[0]}"] = self._mean("ap", area=area)
        out["AR100"] = self._mean("ar")
        out["per_category"] = {str(c): {"AP": self._mean("ap", cat_ids={c}),
                                        "AP_IOU50_F150": self._mean("ap", iou_thr=0.5, f1_thr=0.5, cat_ids={c}),
                                        "has_attributes": c in self.cats_with_attributes}
                               for c in self.params.catIds}
        out["cats_with_attributes"] = sorted(self.cats_with_attributes)
        out["f1_type"] = self.fp.f1_type
        return out


def fashionpedia_evaluate(coco_gt: COCO, results: list[dict], iou_type: str = "segm",
                          params: FashionpediaParams | None = None) -> dict:
    """Score `results` (with `attribute_ids`) -> AP^{IoU+F1} summary dict (see the module docstring)."""
    for i, r in enumerate(results):
        if "attribute_ids" not in r:
            raise coco_lib.EvalDataError(f"detection #{i} has no 'attribute_ids': AP^{{IoU+F1}} needs predicted attributes")
    coco_dt = coco_lib.load_results(coco_gt, results, iou_type)
    ev = FashionpediaEval(coco_gt, coco_dt, iou_type, params)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev.summary()
