"""`fashionseg score` equals the official Fashionpedia evaluator (fashionpedia.fp_eval.FPEval) on
every figure, for randomized results files against real-layout annotation files: shifted, grown
and shrunk masks, changed attributes and classes, duplicates, false positives, tied scores,
46 and 48 categories, files with and without boxes, segm and bbox IoU, and the official, data and
custom attribute-category sets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fashionseg.eval import coco as coco_lib
from fashionseg.eval.fashionpedia import FashionpediaEval, resolve_attribute_categories
from fashionseg.eval.score import read_annotations, read_results, score_results

from fashionpedia_files import annotation_file, official_fp_eval, results_file

pytest.importorskip("sklearn")  # the official evaluator's F1

CASES = [  # seed, categories, boxes in the results, IoU type, attribute-category set
    *[(s, 46, s % 3 == 0, "segm", "official") for s in range(22)],
    *[(s, 48, s % 2 == 0, "segm", "official") for s in range(22, 28)],
    (28, 46, False, "bbox", "official"), (29, 46, True, "bbox", "official"),
    (30, 46, False, "segm", "data"), (31, 48, False, "segm", "data"),
    (32, 46, True, "segm", (0, 13, 27, 36)), (33, 46, False, "segm", (6,)),
]


def _same(ours, theirs, where: str) -> None:
    if theirs == -1:
        assert ours is None, f"{where}: ours {ours}, official undefined (-1)"
    else:
        assert ours is not None and abs(ours - theirs) <= 1e-9, f"{where}: ours {ours}, official {theirs}"


def _same_table(ours: dict, theirs: dict, where: str) -> None:
    assert set(ours) == set(theirs), f"{where}: figures {sorted(ours)} vs official {sorted(theirs)}"
    for k, v in theirs.items():
        _same(ours[k], float(v), f"{where} {k}")


@pytest.mark.parametrize("seed,num_categories,boxes,iou_type,attr_set", CASES)
def test_every_figure_equals_the_official_evaluator(tmp_path, seed, num_categories, boxes, iou_type, attr_set):
    gt = annotation_file(seed, num_categories)
    gt_path, res_path = tmp_path / "instances_attributes_val.json", tmp_path / "predictions.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results_file(gt, seed + 1000, with_boxes=boxes or iou_type == "bbox")))
    gt, results = read_annotations(gt_path), read_results(res_path)
    spec = attr_set if isinstance(attr_set, str) else frozenset(attr_set)
    ours = score_results(gt, results, iou_types=(iou_type,), iou_f1=iou_type, attribute_categories=spec)
    cats = resolve_attribute_categories(spec, gt)
    official = official_fp_eval(gt_path, results, iou_type, None if attr_set == "official" else cats.ids)

    assert ours["attribute_categories"] == {"set": "custom" if not isinstance(attr_set, str) else attr_set,
                                            "ids": sorted(official.FPParams.catsWithAttributes)}
    _same_table(ours["iou_f1"], official.results, "IoU+F1")
    _same_table(ours["iou_only"], official.resultDet, "IoU only")
    _same_table(ours["f1_only"], official.resultF1, "F1 only")
    names = {c["name"]: str(c["id"]) for c in gt["categories"]}
    table_names = {"iou": "iou_only", "f1": "f1_only", "iou_f1": "iou_f1", "iou + f1": "iou_f1"}
    for key, tables in official.results_per_class.items():
        if key.startswith("supercls-"):
            mine = ours["supercategories"][key[len("supercls-"):]]
        else:
            mine = ours["fashionpedia_per_category"][names[key]]
        assert set(mine) == {table_names[t] for t in tables}, key
        for t, table in tables.items():
            _same_table(mine[table_names[t]], table, f"{key} {t}")
    # the arrays behind them, bit for bit
    coco_gt = coco_lib.coco_from_dict(gt)
    ev = FashionpediaEval(coco_gt, coco_lib.load_results(coco_gt, results, iou_type), iou_type, cats)
    ev.evaluate()
    ev.accumulate()
    np.testing.assert_array_equal(ev.eval["precision"], official.eval["precision"])
    np.testing.assert_array_equal(ev.eval["recall"], official.eval["recall"])
    # and the COCO table is pycocotools' on the same objects
    from pycocotools.cocoeval import COCOeval

    coco_ev = COCOeval(official.cocoGt, official.cocoDt, iou_type)
    coco_ev.evaluate()
    coco_ev.accumulate()
    coco_ev.summarize()
    for name, v in zip(coco_lib.STAT_NAMES, coco_ev.stats):
        _same(ours[iou_type][name], float(v), f"COCO {iou_type} {name}")
