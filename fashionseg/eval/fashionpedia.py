"""Fashionpedia's AP^{IoU+F1}, figure for figure the official `fashionpedia.fp_eval.FPEval`.

The official evaluator (fashionpedia-api, `fp_eval.py`) is the reference; tests/test_score_official.py
scores randomized results files with both and every figure agrees. What it computes:

* Two threshold axes: IoU 0.50:0.05:0.95 plus -1 ("IoU not required", the F1-only table) and
  attribute F1 0.50:0.05:0.95 plus -1 ("F1 not required", the IoU-only table).
* Attribute F1 of a detection and a ground truth: sklearn's `f1_score(gt, dt, average="macro")`
  on their multi-hot vectors over every attribute of the annotation file: the mean over the
  labels present ({0}, {1} or both) of 2tp / (2tp + fp + fn), computed here with the same float
  operations from one matrix product (no sklearn). Two empty sets score 1.0; an empty prediction
  against a non-empty truth scores about 0.5 and so fails every F1 threshold above 0.5.
* Categories "with attributes" (by default the official fixed list of 18 ids, whatever the
  vocabulary) match greedily, per image and category, detections by descending score (mergesort,
  at most maxDets[-1]) to a still unmatched ground truth with IoU >= t AND F1 >= f; a later
  candidate replaces the best so far only when its IoU and its F1 are both >= the best's;
  crowd ground truths get no exception (fp_eval's rule). Other categories use COCOeval's own
  evaluateImg (F1 ignored) and only fill the F1 = -1 slice.
* Accumulation is pycocotools' (101-point interpolated precision, recall = last), vectorized
  over the threshold grid (the suffix maximum replaces the Python loop; the same values).
* Summaries as fp_eval's `_summarize`: a category with attributes contributes its 10 F1 slices
  to a mean, one without a single (F1-ignored) slice; the IoU-only table uses the F1 = -1 slice
  for every category, the F1-only table the IoU = -1 slice. Supercategories are the official
  outerwear (ids 0-12), accessory (13-26, no F1 figures) and part (27-45) groups.

fp_eval uses the fixed lists as category ids when matching and as positions in the sorted id
list when accumulating and summarizing; this module uses ids throughout, which is the same for
every Fashionpedia / Kaggle release (ids 0..N-1). `--attribute-categories data` takes the
categories with at least one attribute-labelled ground truth instead, `ID,ID,...` a given list.

Output keys are the official ones (`AP`, `AP_IOU50`, `AP_F175`, `AP_IOU75_F150`, `APs`, `AR@1`,
`ARl@100`, `APo`/`APa`/`APp` for the supercategories); undefined figures are None (fp_eval: -1).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fashionseg.eval import coco as coco_lib

# fp_eval.py FPParams.catsWithAttributes (ids of the 46-category Fashionpedia / Kaggle 2020 vocabulary).
OFFICIAL_CATS_WITH_ATTRIBUTES = (10, 7, 0, 6, 5, 4, 9, 31, 33, 3, 12, 11, 1, 2, 8, 32, 29, 28)
# fp_eval.py FPParams.catSuperClsName / catSuperCls / catSuperClsIds.
SUPERCATEGORIES = (("outerwear", "o", range(0, 13)), ("accessory", "a", range(13, 27)), ("part", "p", range(27, 46)))


def _thresholds() -> np.ndarray:
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


@dataclass(frozen=True)
class AttributeCategories:
    """Which categories are scored with attributes: `name` ("official", "data" or "custom") and ids."""

    name: str
    ids: frozenset

    def describe(self) -> str:
        return f"{self.name} ({len(self.ids)} categories: {', '.join(map(str, sorted(self.ids)))})"


def parse_attribute_categories(spec: str) -> str | frozenset:
    """`official` | `data` | `ID,ID,...` (the --attribute-categories value) -> a spec for resolve()."""
    spec = spec.strip()
    if spec in ("official", "data"):
        return spec
    try:
        ids = frozenset(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--attribute-categories must be 'official', 'data' or category ids like 0,1,2; got {spec!r}") from None
    if not ids:
        raise ValueError("--attribute-categories: empty id list")
    return ids


def resolve_attribute_categories(spec, gt: dict) -> AttributeCategories:
    """Spec ("official", "data", ids) + ground-truth dict -> AttributeCategories (ids checked)."""
    if spec is None or spec == "official":
        return AttributeCategories("official", frozenset(OFFICIAL_CATS_WITH_ATTRIBUTES))
    if spec == "data":
        return AttributeCategories("data", frozenset(a["category_id"] for a in gt["annotations"] if a.get("attribute_ids")))
    ids = frozenset(int(i) for i in spec)
    known = {c["id"] for c in gt.get("categories") or []}
    unknown = sorted(ids - known)
    if unknown:
        raise coco_lib.EvalDataError(f"--attribute-categories: category id(s) {unknown} are not in the annotations' "
                                     f"categories ({len(known)} ids)")
    return AttributeCategories("custom", ids)


def f1_matrix(dt_attrs: list[list[int]], gt_attrs: list[list[int]], num_attributes: int) -> np.ndarray:
    """sklearn's binary macro F1 of every (detection, ground truth) attribute pair -> float [D, G].

    `*_attrs` are lists of contiguous attribute indices (0..num_attributes-1). Per label F1 is
    2tp / (tp + fp + tp + fn) as sklearn divides it (exact integers, one float division); the
    mean of two labels is their sum / 2, as np.mean gives."""
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
    f1_pos = 2.0 * tp / np.maximum(ng + nd, 1)
    f1_neg = 2.0 * tn / np.maximum((A - ng) + (A - nd), 1)
    has_pos = (nd > 0) | (ng > 0)          # label 1 occurs in either vector
    has_neg = (nd < A) | (ng < A)          # label 0 occurs in either vector
    total = np.where(has_neg, f1_neg, 0.0) + np.where(has_pos, f1_pos, 0.0)
    return total / (has_pos.astype(int) + has_neg.astype(int))


class FashionpediaEval(COCOeval):
    """COCOeval with fp_eval's F1 axis: `eval["precision"]` is [T+1, F+1, R, K, A, M] as fp_eval's."""

    def __init__(self, coco_gt: COCO, coco_dt: COCO, iou_type: str = "segm",
                 attribute_categories: AttributeCategories | None = None):
        super().__init__(coco_gt, coco_dt, iou_type)
        self.params.iouThrs = np.append(self.params.iouThrs, -1.0)
        self.f1_thrs = np.append(_thresholds(), -1.0)
        self.attr_cats = attribute_categories or resolve_attribute_categories("official", coco_gt.dataset)
        self.attr_index = {a["id"]: i for i, a in enumerate(coco_gt.dataset.get("attributes") or [])}

    def _attr_indices(self, ann: dict, what: str) -> list[int]:
        out = []
        for a in ann.get("attribute_ids") or []:
            if a not in self.attr_index:
                raise coco_lib.EvalDataError(f"{what} {ann.get('id')} (image {ann.get('image_id')}): attribute id {a!r} "
                                             "is not in the annotation file's 'attributes'")
            out.append(self.attr_index[a])
        return out

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802,N803 (pycocotools' names)
        if catId not in self.attr_cats.ids:
            return super().evaluateImg(imgId, catId, aRng, maxDet)  # [T, D]: fills the F1 = -1 slice only
        p = self.params
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return None
        for g in gt:
            g["_ignore"] = 1 if (g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]) else 0
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        dt_sorted = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][: p.maxDets[-1]]
        key = (imgId, catId)
        if key not in self._f1_cache:  # rows as in computeIoU: sorted, cut at maxDets[-1]
            self._f1_cache[key] = f1_matrix([self._attr_indices(d, "detection") for d in dt_sorted],
                                            [self._attr_indices(g, "annotation") for g in gt], len(self.attr_index))
        gt = [gt[i] for i in gtind]
        dt = dt_sorted[:maxDet]
        ious = self.ious[imgId, catId]
        ious = ious[:, gtind] if len(ious) > 0 else ious
        f1s = self._f1_cache[key][:, gtind]
        T, F, G, D = len(p.iouThrs), len(self.f1_thrs), len(gt), len(dt)
        # the (IoU, F1) grid flattened t-major: point i is (iouThrs[i // F], f1_thrs[i % F])
        iou_grid = np.minimum(np.repeat(np.asarray(p.iouThrs, float), F), 1 - 1e-10)
        f1_grid = np.minimum(np.tile(self.f1_thrs, T), 1 - 1e-10)
        gtm = np.zeros((T * F, G))
        dtm = np.zeros((T * F, D))
        gt_ig = np.array([g["_ignore"] for g in gt], dtype=int)
        dt_ig = np.zeros((T * F, D))
        if len(ious):
            for di, d in enumerate(dt):
                # fp_eval's greedy match for every grid point at once
                best_iou, best_f1 = iou_grid.copy(), f1_grid.copy()
                m = np.full(T * F, -1)
                stopped = np.zeros(T * F, dtype=bool)
                for gi in range(G):
                    if gt_ig[gi] == 1:  # matched to a regular gt already: ignored ones come after, stop
                        stopped |= (m > -1) & (gt_ig[np.maximum(m, 0)] == 0)
                    ok = ~stopped & (gtm[:, gi] == 0) & (ious[di, gi] >= best_iou) & (f1s[di, gi] >= best_f1)
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

    def evaluate(self):
        self._f1_cache: dict = {}
        super().evaluate()

    def accumulate(self, p=None):
        """fp_eval's accumulate: precision [T, F, R, K, A, M] and recall [T, F, K, A, M] (its `scores`
        array feeds no figure and is left out); a category without attributes fills F1 = -1 only."""
        p = self.params
        T, F, R = len(p.iouThrs), len(self.f1_thrs), len(p.recThrs)
        K, A, M, I = len(p.catIds), len(p.areaRng), len(p.maxDets), len(p.imgIds)
        precision = np.full((T, F, R, K, A, M), -1.0)
        recall = np.full((T, F, K, A, M), -1.0)
        for k, cat in enumerate(p.catIds):
            f_slots = slice(None) if cat in self.attr_cats.ids else slice(F - 1, F)
            n_f = F if cat in self.attr_cats.ids else 1
            for a in range(A):
                E = [e for e in self.evalImgs[(k * A + a) * I:(k * A + a + 1) * I] if e is not None]
                if not E:
                    continue
                for m, max_det in enumerate(p.maxDets):
                    order = np.argsort(-np.concatenate([e["dtScores"][:max_det] for e in E]), kind="mergesort")
                    dtm = np.concatenate([e["dtMatches"][:, :max_det] for e in E], axis=1)[:, order]
                    dt_ig = np.concatenate([e["dtIgnore"][:, :max_det] for e in E], axis=1)[:, order]
                    gt_ig = np.concatenate([e["gtIgnore"] for e in E])
                    npig = np.count_nonzero(gt_ig == 0)
                    if npig == 0:
                        continue
                    tps = np.logical_and(dtm, np.logical_not(dt_ig))
                    fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
                    tp = np.cumsum(tps, axis=1).astype(float)
                    fp = np.cumsum(fps, axis=1).astype(float)
                    nd = tp.shape[1]
                    rc = tp / npig
                    pr = tp / (fp + tp + np.spacing(1))
                    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # fp_eval's right-to-left max loop
                    q = np.zeros((len(tp), R))
                    for row in range(len(tp)):
                        inds = np.searchsorted(rc[row], p.recThrs, side="left")
                        ok = inds < nd
                        q[row, ok] = pr[row, inds[ok]]
                    recall[:, f_slots, k, a, m] = (rc[:, -1] if nd else np.zeros(len(tp))).reshape(T, n_f)
                    precision[:, f_slots, :, k, a, m] = q.reshape(T, n_f, R)
        self.eval = {"params": p, "counts": [T, F, R, K, A, M], "precision": precision, "recall": recall}
        self._slices: dict = {}

    # -- summary ------------------------------------------------------------------------------
    def _summarize(self, kind: str, iou_thr=None, f1_thr=None, f1=True, iou=True, area="all", max_dets=100,
                   cats: list[int] | None = None) -> float | None:
        """fp_eval's `_summarize`, element order included; `cats` are positions in params.catIds."""
        p = self.params
        key = (kind, area, max_dets)
        if key not in self._slices:  # the area range and maxDets first (element order kept): [T, F, (R,) K]
            a = [i for i, lbl in enumerate(p.areaRngLbl) if lbl == area]
            m = [i for i, d in enumerate(p.maxDets) if d == max_dets]
            self._slices[key] = self.eval["precision" if kind == "ap" else "recall"][..., a, m][..., 0]
        s = self._slices[key]
        if iou and iou_thr is not None:
            s = s[np.where(iou_thr == p.iouThrs)[0]]
        elif iou:
            s = s[:-1]
        else:
            s = s[[-1]]
        ks = range(len(p.catIds)) if cats is None else cats
        if not f1:
            s = s[:, [-1]][..., list(ks)]
        else:
            f_idx = list(np.where(f1_thr == self.f1_thrs)[0]) if f1_thr is not None else None
            parts = []
            for k in ks:
                if p.catIds[k] not in self.attr_cats.ids:
                    parts.append(s[:, [-1]][..., [k]])
                elif f_idx is not None:
                    parts.append(s[:, f_idx][..., [k]])
                else:
                    parts += [s[:, [f]][..., [k]] for f in range(len(self.f1_thrs) - 1)]
            if not parts:
                return None
            s = np.concatenate(parts, axis=-1)
        vals = s[s > -1]
        return float(np.mean(vals)) if vals.size else None

    def _table(self, f1: bool, iou: bool, cats: list[int] | None = None, supercategories: bool = False) -> dict:
        """fp_eval's `_summarize_with_cat` -> {figure name: value or None}."""
        out: dict = {}
        kw = {"f1": f1, "iou": iou}
        if supercategories:
            for _, letter, members in SUPERCATEGORIES:
                if letter == "a" and f1:
                    continue
                out["AP" + letter] = self._summarize("ap", cats=self._group(members), **kw)
        kw["cats"] = cats
        out["AP"] = self._summarize("ap", **kw)
        if iou:
            out["AP_IOU50"] = self._summarize("ap", iou_thr=0.5, **kw)
            out["AP_IOU75"] = self._summarize("ap", iou_thr=0.75, **kw)
        if f1:
            for f in (0.5, 0.75):
                out[f"AP_F1{int(f * 100)}"] = self._summarize("ap", f1_thr=f, **kw)
        if f1 and iou:
            for t in (0.5, 0.75):
                for f in (0.5, 0.75):
                    out[f"AP_IOU{int(t * 100)}_F1{int(f * 100)}"] = self._summarize("ap", iou_thr=t, f1_thr=f, **kw)
        for area in ("small", "medium", "large"):
            out[f"AP{area[0]}"] = self._summarize("ap", area=area, **kw)
        for max_det in self.params.maxDets:
            out[f"AR@{max_det}"] = self._summarize("ar", max_dets=max_det, **kw)
        for area in ("small", "medium", "large"):
            out[f"AR{area[0]}@100"] = self._summarize("ar", area=area, **kw)
        return out

    def _group(self, members) -> list[int]:
        return [k for k, c in enumerate(self.params.catIds) if c in members]

    def summary(self, per_category: bool = True) -> dict:
        """{"iou_f1", "iou_only", "f1_only": tables, "supercategories": {name: {table: ...}},
        "per_category": {str(id): {table: ...}}, "attribute_categories": {"set", "ids"}}."""
        out: dict = {"iou_f1": self._table(True, True, supercategories=True),
                     "iou_only": self._table(False, True, supercategories=True),
                     "f1_only": self._table(True, False, supercategories=True)}
        out["supercategories"] = {}
        for name, letter, members in SUPERCATEGORIES:
            group = self._group(members)
            entry = {"iou_only": self._table(False, True, cats=group) if group else None}
            if letter != "a":
                entry["f1_only"] = self._table(True, False, cats=group) if group else None
                entry["iou_f1"] = self._table(True, True, cats=group) if group else None
            out["supercategories"][name] = entry
        if per_category:
            out["per_category"] = {}
            for k, cat in enumerate(self.params.catIds):
                entry = {"iou_only": self._table(False, True, cats=[k])}
                if cat in self.attr_cats.ids:
                    entry["f1_only"] = self._table(True, False, cats=[k])
                    entry["iou_f1"] = self._table(True, True, cats=[k])
                out["per_category"][str(cat)] = entry
        out["attribute_categories"] = {"set": self.attr_cats.name, "ids": sorted(self.attr_cats.ids)}
        return out


def fashionpedia_evaluate(coco_gt: COCO, results: list[dict], iou_type: str = "segm",
                          attribute_categories="official", per_category: bool = True) -> dict:
    """Score `results` (with `attribute_ids`) -> FashionpediaEval.summary() (see the module docstring).

    `attribute_categories`: "official", "data", an id collection or an AttributeCategories."""
    for i, r in enumerate(results):
        if "attribute_ids" not in r:
            raise coco_lib.EvalDataError(f"detection #{i} has no 'attribute_ids': AP^{{IoU+F1}} needs predicted attributes")
    if not isinstance(attribute_categories, AttributeCategories):
        attribute_categories = resolve_attribute_categories(attribute_categories, coco_gt.dataset)
    coco_dt = coco_lib.load_results(coco_gt, results, iou_type)
    ev = FashionpediaEval(coco_gt, coco_dt, iou_type, attribute_categories)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev.summary(per_category)
