"""Results files other tools accept: predict's predictions.json loads in the official Fashionpedia
API and in pycocotools against the source's ground truth and scores there as `fashionseg score`
does; eval on shards built with --max-size scores on the original grid; --sample-submission;
empty splits; score's messages for bad files."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import numpy as np
import pytest

from fashionseg.cli import main as fashionseg_main
from fashionseg.data.eval_source import ground_truth
from fashionseg.eval import inference as inf

from fashionpedia_files import official_fp_eval
from test_predict_submission import resized_shards, weights  # noqa: F401 (fixtures: a --max-size shard set, a random model)


@pytest.fixture(scope="module")
def predicted(weights, resized_shards, tmp_path_factory):
    """predict on the val split of the resized shards -> (out folder, predictions)."""
    out = tmp_path_factory.mktemp("pred")
    assert fashionseg_main(["predict", "--weights", str(weights), str(resized_shards), "--split", "val", "--out", str(out),
                            "--device", "cpu", "--no-progress", "--no-overlays", "--batch-size", "1"]) == 0
    return out, json.loads((out / "predictions.json").read_text())


def test_predictions_load_in_the_official_apis_and_score_there(predicted, resized_shards, tmp_path, capsys):
    """The running split index was the image_id: loadRes refused the file ('Results do not
    correspond to current coco set'), or scored it against the wrong images."""
    from pycocotools.coco import COCO

    out, preds = predicted
    gt = ground_truth(resized_shards, "val")  # the source's own ids and original-grid masks
    gt_path = tmp_path / "instances_val.json"
    gt_path.write_text(json.dumps(gt))
    ids = {im["id"] for im in gt["images"]}
    assert {p["image_id"] for p in preds} == ids and ids != set(range(len(ids)))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        assert len(coco.loadRes(str(out / "predictions.json")).getAnnIds()) == len(preds)
    official = official_fp_eval(gt_path, preds)  # Fashionpedia(gt).loadRes(preds), FPEval.run()

    scored = tmp_path / "score.json"
    assert fashionseg_main(["score", str(gt_path), str(out / "predictions.json"), "--out", str(scored)]) == 0
    m = json.loads(scored.read_text())
    printed = " ".join(capsys.readouterr().out.split())
    assert "attribute categories: official, 18 ids" in printed and "APo (outerwear)" in printed
    for key, theirs in official.results.items():
        assert (m["iou_f1"][key] is None) if theirs == -1 else m["iou_f1"][key] == pytest.approx(theirs, abs=1e-9), key
    for key, theirs in official.resultF1.items():
        assert (m["f1_only"][key] is None) if theirs == -1 else m["f1_only"][key] == pytest.approx(theirs, abs=1e-9), key
    assert m["attribute_categories"]["set"] == "official"


def test_eval_on_resized_shards_scores_on_the_original_grid(predicted, weights, resized_shards, synth_shards, tmp_path):
    """With --max-size, eval scored on the shrunken grid (areas, and so APs/APm/APl, changed).
    Now it equals scoring predict's file against the full-size ground truth of the same source
    (the shards built without --max-size)."""
    _, preds = predicted
    full = ground_truth(synth_shards, "val", grid="stored")  # never resized: the source's own masks
    original = ground_truth(resized_shards, "val")
    assert [(im["id"], im["height"], im["width"]) for im in original["images"]] == \
        [(im["id"], im["height"], im["width"]) for im in full["images"]]
    stored = ground_truth(resized_shards, "val", grid="stored")
    assert sum(a["area"] for a in stored["annotations"]) < sum(a["area"] for a in full["annotations"])

    out = tmp_path / "eval.json"
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(resized_shards), "--out", str(out),
                            "--device", "cpu", "--no-progress", "--batch-size", "1"]) == 0
    m = json.loads(out.read_text())
    assert m["grid"] == "original"
    from fashionseg.eval.score import score_results

    at_original = score_results(full, preds, iou_types=("segm",))
    for section in ("segm", "iou_f1", "f1_only"):
        mine = {k: v for k, v in m[section].items() if k != "per_category"}
        theirs = {k: v for k, v in at_original[section].items() if k != "per_category"}
        assert mine == pytest.approx(theirs, abs=1e-12), section
    # --grid stored keeps the shard grid
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(resized_shards), "--out", str(out),
                            "--device", "cpu", "--no-progress", "--grid", "stored"]) == 0
    assert json.loads(out.read_text())["grid"] == "stored"


def test_sample_submission_gives_every_image_in_its_order(weights, tmp_path):
    from PIL import Image

    folder = tmp_path / "test"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b", "a", "extra"):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{name}.jpg")
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("ImageId,EncodedPixels,ClassId,AttributesIds\n"
                      "a.jpg,1 1,23,\nmissing,1 1,23,\nb,1 1,23,\n")
    out = tmp_path / "out"
    assert fashionseg_main(["predict", "--weights", str(weights), str(folder), "--out", str(out), "--device", "cpu",
                            "--no-progress", "--no-overlays", "--sample-submission", str(sample)]) == 0
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    order = [r[0] for r in rows]
    assert order == sorted(order, key=["a.jpg", "missing", "b"].index)  # the sample's order and spelling
    assert ["missing", "1 1", "23", ""] in rows and "extra" not in order
    assert sum(r[0] == "a.jpg" for r in rows) == 4 and all(r[1] != "1 1" for r in rows if r[0] != "missing")
    # nothing detected (score threshold 1): every image keeps the sample's own row
    assert fashionseg_main(["predict", "--weights", str(weights), str(folder), "--out", str(out), "--device", "cpu",
                            "--no-progress", "--no-overlays", "--score-thresh", "1.0", "--sample-submission", str(sample)]) == 0
    assert (out / "submission.csv").read_text() == sample.read_text()
    # a file that is not a sample submission is named before the model runs
    (tmp_path / "bad.csv").write_text("id,rle\nx,1 1\n")
    assert fashionseg_main(["predict", "--weights", str(weights), str(folder), "--out", str(tmp_path / "o2"),
                            "--device", "cpu", "--no-progress", "--sample-submission", str(tmp_path / "bad.csv")]) == 1
    assert not (tmp_path / "o2").exists()


def test_an_empty_split_says_so(weights, resized_shards, tmp_path, capsys):
    from fashionseg.eval.evaluate import evaluate_model, headline

    model, vocab, _ = inf.load_weights(weights, "cpu")
    m = evaluate_model(model, resized_shards, "val", vocab, mask_thresh=0.5, batch_size=1, device="cpu",
                       max_images=0, progress=False)
    assert m == {"split": "val", "num_images": 0, "num_detections": 0, "empty": True} and headline(m) == {}
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(resized_shards), "--max-images", "0",
                            "--out", str(tmp_path / "e.json"), "--device", "cpu", "--no-progress"]) == 1
    assert "has no images" in " ".join(capsys.readouterr().err.split())


def test_score_names_what_is_wrong(resized_shards, tmp_path, capsys):
    gt = ground_truth(resized_shards, "val")
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    res = tmp_path / "res.json"

    def score(*args) -> str:
        assert fashionseg_main(["score", *map(str, args)]) == 1
        return " ".join(capsys.readouterr().err.split())

    res.write_text(json.dumps(gt))
    assert "a results file is a JSON list" in score(gt_path, res) and "pass it as ANNOTATIONS" in score(gt_path, res)
    running = [{"image_id": i, "category_id": gt["annotations"][0]["category_id"], "score": 0.5,
                "segmentation": gt["annotations"][0]["segmentation"], "attribute_ids": []} for i in range(2)]
    res.write_text(json.dumps(running))
    assert "detection #0: image_id 0 is not in the ground truth's images" in score(gt_path, res)
    # rich wraps stderr at 80 columns, inside a long temp path too: compare without whitespace
    assert "nope.json:cannotreadtheresultsfile" in score(gt_path, tmp_path / "nope.json").replace(" ", "")
    bad = dict(gt, annotations=[dict(gt["annotations"][0], category_id=999)])
    gt_path.write_text(json.dumps(bad))
    assert "annotations[0] (id 1): category_id 999 is not in 'categories'" in score(gt_path, res)
    assert "--attribute-categories" in score(gt_path, res, "--attribute-categories", "shoes")


def test_the_test_scale_comes_from_the_run_config():
    """The data layer owns every resize: eval/predict take the run's data.test_size (None: the
    largest data.min_size) and data.max_size; flags win; older files carried model.min_size."""
    run = {"data": {"min_size": [600, 800], "max_size": 1333, "test_size": None}, "model": {}}
    assert inf.inference_scale(run) == (800, 1333)
    assert inf.inference_scale({**run, "data": {**run["data"], "test_size": 700}}) == (700, 1333)
    assert inf.inference_scale(run, 512, 900) == (512, 900)
    assert inf.inference_scale({"model": {"min_size": [64], "max_size": 96}}) == (64, 96)
    with pytest.raises(ValueError, match="must be >= 1"):
        inf.inference_scale(run, 0)
