"""predict -> predictions.json / submission.csv / overlays, read back independently; TTA merging;
weights loading errors; eval and tune-thresholds end to end on a small random model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from train_utils import save_random_weights
from hypothesis import strategies as st
from PIL import Image

from fashionseg.cli import main as fashionseg_main
from fashionseg.data.rle import decode_coco
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.vocab import Vocab
from fashionseg.eval import inference as inf
from fashionseg.eval.ensemble import merge_passes, tta_outputs
from fashionseg.eval.submission import SubmissionError, disjoint_masks, read_submission


def kaggle_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """Independent Kaggle RLE decoder: 1-indexed starts, pixels numbered down columns first."""
    flat = np.zeros(height * width, dtype=np.uint8)
    nums = [int(v) for v in encoded.split()]
    for start, length in zip(nums[0::2], nums[1::2]):
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(width, height).T  # column-major: pixel k is (row k % H, column k // H)


def test_kaggle_decode_is_column_major():
    m = kaggle_decode("2 3", 3, 2)  # pixels 2,3,4 -> (1,0), (2,0), (0,1)
    assert m.tolist() == [[0, 1], [1, 0], [1, 0]]


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resized_shards(synth_src, tmp_path_factory):
    """The synthetic dataset built with max_size=64: stored images smaller than the originals."""
    from fashionseg.data.shards.build import BuildConfig, build

    out = tmp_path_factory.mktemp("resized_shards")
    code, report = build(BuildConfig(src=str(synth_src), out=str(out), samples_per_shard=4, val_fraction=0.25,
                                     max_size=64, workers=1, progress=False))
    assert code == 0, report.get("error")
    return out


@pytest.fixture(scope="module")
def weights(resized_shards, tmp_path_factory):
    """A randomly initialised light model saved in the trainer's model_final.pth format."""
    return save_random_weights(resized_shards, tmp_path_factory.mktemp("weights") / "model_final.pth", 4,
                               extra_config={"train": {"lr": 0.01}})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for name, (h, w) in {"odd_a": (45, 61), "odd_b": (70, 38)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"{name}.jpg", quality=95)
    return d


def by_image(preds: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in preds:
        out.setdefault(p["image_key"], []).append(p)
    return out


# -- predict ------------------------------------------------------------------------------------
def _model_on(model, img: torch.Tensor, size: tuple[int, int]) -> dict:
    """The model's own output for a test image, masks on the original grid `size` (the reference
    for predict): pasted there by the model (output_sizes), or, for an older model that resizes
    itself, on the test grid with that resize made the identity and the probabilities resized."""
    if inf.takes_output_sizes(model):
        return model([img], output_sizes=[tuple(size)])[0]
    t = model.transform
    saved = (t.min_size, t.max_size)
    t.min_size, t.max_size = (min(img.shape[-2:]),), max(img.shape[-2:])
    try:
        o = model([img.float() / 255])[0]
    finally:
        t.min_size, t.max_size = saved
    if tuple(o["masks"].shape[-2:]) != tuple(size):
        o["masks"] = F.interpolate(o["masks"], size=tuple(size), mode="bilinear", align_corners=False)
    return o


def test_predict_submission_is_bit_exact_on_the_original_grid(weights, resized_shards, image_folder, tmp_path):
    from fashionseg.data.eval_source import decode_for_test, iter_eval_samples

    out = tmp_path / "pred"
    assert fashionseg_main(["predict", "--weights", str(weights), str(image_folder), str(resized_shards), "--split", "val",
                            "--out", str(out), "--device", "cpu", "--no-progress", "--batch-size", "1"]) == 0  # batches pad: compare unbatched
    preds = json.loads((out / "predictions.json").read_text())
    assert all("bbox" not in p for p in preds)  # segm results: areas from masks (module docstring)
    grouped = by_image(preds)
    model, vocab, cfg = inf.load_weights(weights, "cpu")

    # the original grids and the test images the data layer gives (test size 64, max 96 from the weights)
    grids, test_images, ids = {}, {}, {}
    for s in iter_eval_samples(resized_shards, "val", test_size=64, max_size=96):
        key = s.meta["source_id"]
        grids[key], test_images[key], ids[key] = s.original_size, s.image, s.image_id
        assert s.stored_size != s.original_size  # the fixture resizes every image
    first = max(int(x["image_id"]) for sh in read_manifest(resized_shards)["splits"]["val"]["shards"]
                for x in sh["samples"]) + 1
    for i, f in enumerate(sorted(image_folder.iterdir())):
        test_images[f.stem], grids[f.stem] = decode_for_test(f, 64, 96)
        ids[f.stem] = first + i  # loose files are numbered in input order, after the shards' ids
    assert set(grouped) == set(grids)  # score_thresh 0: every image has detections
    assert all(len(v) == cfg.detections_per_img for v in grouped.values())
    assert all(p["image_id"] == ids[p["image_key"]] for p in preds)
    images = json.loads((out / "images.json").read_text())["images"]
    assert {im["file_name"]: (im["id"], (im["height"], im["width"])) for im in images} == \
        {k: (ids[k], tuple(grids[k])) for k in grids}

    with torch.no_grad():
        for key, dets in grouped.items():
            masks = np.stack([decode_coco(d["segmentation"]) for d in dets])
            assert masks.shape[1:] == tuple(grids[key])
            # the masks are the model's own on the original grid, cut at mask_thresh
            o = _model_on(model, test_images[key], grids[key])
            np.testing.assert_array_equal(masks, (o["masks"][:, 0] > cfg.mask_thresh).numpy().astype(np.uint8))
            assert [d["score"] for d in dets] == pytest.approx(o["scores"].tolist())
            assert [d["category_id"] for d in dets] == [vocab.category_id(int(l)) for l in o["labels"]]

    # submission.csv, decoded independently, holds the same masks with overlaps given to the higher score
    rows = read_submission(out / "submission.csv", sizes={k: tuple(v) for k, v in grids.items()})
    sub: dict[str, list[dict]] = {}
    for r in rows:
        sub.setdefault(r["ImageId"], []).append(r)
    for key, dets in grouped.items():
        dets = sorted(dets, key=lambda d: -d["score"])
        taken = np.zeros(grids[key], bool)
        expected = []
        for d in dets:
            m = decode_coco(d["segmentation"]).astype(bool) & ~taken
            taken |= m
            if m.any():
                expected.append((m, d["category_id"], sorted(d["attribute_ids"])))
        got = sub.get(key, [])
        assert len(got) == len(expected)
        union = np.zeros(grids[key], np.uint8)
        for r, (m, cat, attrs) in zip(got, expected):
            decoded = kaggle_decode(r["EncodedPixels"], *grids[key])
            np.testing.assert_array_equal(decoded, m.astype(np.uint8))
            assert r["ClassId"] == cat and r["AttributesIds"] == attrs
            union += decoded
        assert union.max() <= 1  # Kaggle's rule: no pixel in two masks

    for key in grids:
        png = Image.open(out / "overlays" / f"{key}.png")
        assert png.size == (grids[key][1], grids[key][0])


def test_predict_tta_end_to_end(weights, image_folder, tmp_path):
    out = tmp_path / "tta"
    assert fashionseg_main(["predict", "--weights", str(weights), str(image_folder / "odd_a.jpg"), "--out", str(out),
                            "--device", "cpu", "--no-progress", "--no-overlays", "--tta", "--tta-scales", "0.75", "1.25"]) == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert 0 < len(preds) <= 4 and all(p["image_key"] == "odd_a" for p in preds)
    assert all(decode_coco(p["segmentation"]).shape == (45, 61) for p in preds)
    assert not (out / "overlays").exists()


def test_tta_single_pass_equals_plain_inference(weights, image_folder):
    from fashionseg.data.eval_source import decode_for_test

    model, _, _ = inf.load_weights(weights, "cpu")
    img, _ = decode_for_test(image_folder / "odd_b.jpg", 64, 96)
    resize_target = (model.transform.min_size, model.transform.max_size)
    with torch.no_grad():
        plain = inf.forward_by_shape(model, [img], [tuple(img.shape[-2:])])[0]
        one = tta_outputs(model, [img], scales=(1.0,), hflip=False)[0]
        flipped = tta_outputs(model, [img.flip(-1)], scales=(1.0,), hflip=False)[0]
    # one pass at the model's own scale: the model's NMS already left no same-class pair at
    # IoU >= nms_thresh, so every cluster is a single detection and nothing changes
    assert len(one["scores"]) == len(plain["scores"]) > 0
    for k in ("boxes", "labels", "scores", "masks", "attribute_scores"):
        torch.testing.assert_close(one[k], plain[k], rtol=0, atol=0)
    assert (model.transform.min_size, model.transform.max_size) == resize_target  # restored (older models)
    assert len(flipped["scores"]) > 0


def _det(box, label, score, mask_value, attr, size=(20, 20)):
    m = torch.zeros(1, *size)
    x0, y0, x1, y1 = box
    m[0, y0:y1, x0:x1] = mask_value
    return box, label, score, m, attr


def _out(dets):
    return {"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([d[1] for d in dets], dtype=torch.int64),
            "scores": torch.tensor([d[2] for d in dets], dtype=torch.float32),
            "masks": torch.stack([d[3] for d in dets]) if dets else torch.zeros(0, 1, 20, 20),
            "attribute_scores": torch.tensor([d[4] for d in dets], dtype=torch.float32).reshape(-1, 2)}


def test_merge_passes_votes_and_averages():
    a = _out([_det((0, 0, 10, 10), 1, 0.8, 0.9, [1.0, 0.0]), _det((12, 12, 18, 18), 2, 0.6, 0.7, [0.0, 0.5])])
    b = _out([_det((1, 0, 11, 10), 1, 0.4, 0.5, [0.0, 0.0])])  # the same object, seen again, shifted 1 px
    m = merge_passes([a, b], iou_thresh=0.5, max_dets=10)
    assert m["labels"].tolist() == [1, 2]
    assert m["scores"].tolist() == pytest.approx([(0.8 + 0.4) / 2, 0.6 / 2])  # found by 2 of 2 / 1 of 2 passes
    assert m["boxes"][0].tolist() == pytest.approx([(0 * 0.8 + 1 * 0.4) / 1.2, 0, (10 * 0.8 + 11 * 0.4) / 1.2, 10])
    assert m["masks"][0, 0, 5, 5].item() == pytest.approx(0.7) and m["masks"][0, 0, 5, 10].item() == pytest.approx(0.25)
    assert m["attribute_scores"][0].tolist() == pytest.approx([0.5, 0.0])
    # another class at the same place is never merged
    c = _out([_det((0, 0, 10, 10), 3, 0.9, 0.9, [0.0, 0.0])])
    assert merge_passes([a, c], 0.5, 10)["labels"].tolist() == [3, 1, 2]  # 0.9/2, 0.8/2, 0.6/2
    assert merge_passes([a, c], 0.5, 1)["labels"].tolist() == [3]
    empty = merge_passes([_out([]), _out([])], 0.5, 10)
    assert empty["scores"].shape == (0,)


# -- submission ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(1, 8), st.integers(1, 8),
                          st.sampled_from([0.1, 0.5, 0.9])), min_size=1, max_size=5))
def test_disjoint_masks_keep_the_union_and_the_best(boxes):
    masks, scores = [], []
    for x, y, w, h, s in boxes:
        m = np.zeros((10, 10), np.uint8)
        m[y : y + h, x : x + w] = 1
        masks.append(m)
        scores.append(s)
    out = disjoint_masks(masks, scores)
    assert np.array_equal(np.sum(out, axis=0) > 0, np.sum(masks, axis=0) > 0)
    assert np.sum(out, axis=0).max() <= 1
    best = max(range(len(masks)), key=lambda i: (scores[i], -i))
    assert np.array_equal(out[best], masks[best])
    assert all(((o == 1) <= (m == 1)).all() for o, m in zip(out, masks))


def test_read_submission_names_bad_rows(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("ImageId,EncodedPixels,ClassId\nx,1 2,3\n")
    with pytest.raises(SubmissionError, match="header"):
        read_submission(p)
    p.write_text("ImageId,EncodedPixels,ClassId,AttributesIds\nx,1 2,3,\ny,5 100,1,\"4,5\"\n")
    with pytest.raises(SubmissionError, match="line 3 \\(y\\): bad EncodedPixels"):
        read_submission(p, sizes={"x": (4, 4), "y": (4, 4)})
    rows = read_submission(p)
    assert rows[1]["AttributesIds"] == [4, 5] and rows[0]["AttributesIds"] == []


# -- weights ------------------------------------------------------------------------------------
def test_load_weights_errors(weights, tmp_path):
    with pytest.raises(inf.WeightsError, match="no such weights file"):
        inf.load_weights(tmp_path / "nope.pth")
    ckpt = torch.load(weights, weights_only=True)
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in ckpt.items() if k != "attributes"}, bad)
    with pytest.raises(inf.WeightsError, match="missing key 'attributes'"):
        inf.load_weights(bad)
    torch.save({**ckpt, "config": {"train": {}}}, bad)
    with pytest.raises(inf.WeightsError, match="config.model"):
        inf.load_weights(bad)
    torch.save(ckpt["model"], bad)  # a bare state dict
    with pytest.raises(inf.WeightsError, match=r"missing key 'model' \(a bare state dict\?\)"):
        inf.load_weights(bad)
    bad.write_text("not torch")
    with pytest.raises(inf.WeightsError, match="cannot read as a torch weights file"):
        inf.load_weights(bad)
    # trained from pretrained weights (FrozenBatchNorm2d: no num_batches_tracked) still loads
    frozen_bn = {k: v for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")}
    torch.save({**ckpt, "model": frozen_bn}, bad)
    model, _, _ = inf.load_weights(bad)
    assert torch.equal(model.state_dict()["roi_heads.box_predictor.cls_score.weight"], ckpt["model"]["roi_heads.box_predictor.cls_score.weight"])
    torch.save({**ckpt, "categories": ckpt["categories"][:-1]}, bad)
    with pytest.raises(inf.WeightsError, match="do not fit"):
        inf.load_weights(bad)


# -- eval and tune end to end ---------------------------------------------------------------------
def test_eval_command_writes_metrics(weights, resized_shards, tmp_path):
    out = tmp_path / "eval.json"
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(resized_shards), "--out", str(out),
                            "--device", "cpu", "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert m["num_images"] == 6 and m["split"] == "val"
    for section in ("bbox", "segm", "iou_f1"):
        assert 0.0 <= m[section]["AP"] <= 1.0
    assert sum(m["gt_counts"].values()) > 0
    # a missing split is a clear error, not a traceback
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(resized_shards), "--split", "test",
                            "--out", str(tmp_path / "x.json"), "--device", "cpu", "--no-progress"]) == 1


def test_tune_thresholds_updates_the_config(weights, resized_shards, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  backbone: mobilenet_v3_large_fpn\n  score_thresh: 0.9\ntrain:\n  lr: 0.02\n")
    assert fashionseg_main(["tune-thresholds", "--weights", str(weights), "--shards", str(resized_shards),
                            "--config", str(cfg), "--scores", "0.0,0.01", "--nms", "0.5", "--masks", "0.4,0.6",
                            "--cache-dets", "8", "--max-images", "3", "--device", "cpu", "--no-progress"]) == 0
    new = yaml.safe_load(cfg.read_text())
    assert new["train"] == {"lr": 0.02} and new["model"]["backbone"] == "mobilenet_v3_large_fpn"
    trials = json.loads(cfg.with_suffix(".trials.json").read_text())
    assert len(trials) == 4
    best = trials[0]
    assert best["value"] == max(t["value"] for t in trials)
    assert {k: new["model"][k] for k in ("score_thresh", "nms_thresh", "mask_thresh")} == \
        {k: best[k] for k in ("score_thresh", "nms_thresh", "mask_thresh")}


# -- distributed evaluation ---------------------------------------------------------------------
def _eval_worker(rank: int, world: int, port: int, weights: str, shards: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fashionseg.eval.evaluate import evaluate_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, vocab, _ = inf.load_weights(weights, "cpu")
        m = evaluate_model(model, shards, "val", vocab, mask_thresh=0.5, batch_size=1, device="cpu", test_size=64,
                           max_size=96, progress=False)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(m))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_eval_equals_single_process(weights, resized_shards, tmp_path):
    """Two gloo ranks each infer half the split; rank 0 scores the gathered results and every
    rank returns the same metrics, equal to one process doing it all."""
    import torch.multiprocessing as mp

    from fashionseg.eval.evaluate import evaluate_model

    mp.spawn(_eval_worker, args=(2, _free_port(), str(weights), str(resized_shards), str(tmp_path)), nprocs=2, join=True)
    model, vocab, _ = inf.load_weights(weights, "cpu")
    trainable = not getattr(model, "folded", False)  # a BatchNorm-folded model (eval/predict's) cannot train
    model.train(trainable)
    single = evaluate_model(model, resized_shards, "val", vocab, mask_thresh=0.5, batch_size=1, device="cpu",
                            test_size=64, max_size=96, progress=False)
    assert model.training == trainable  # mode restored
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = json.loads(json.dumps(single))
    for m in ranks + [single]:
        m.pop("infer_seconds")
    assert ranks[0] == ranks[1] == single
    assert single["num_images"] == 6 and single["num_detections"] == 6 * 4


# -- ensembles (--weights A B C) --------------------------------------------------------------------
def test_two_identical_weights_files_equal_one(weights, resized_shards, image_folder, tmp_path):
    """Merging a pass with an identical copy of itself gives back exactly that pass (every cluster is a
    detection and its copy: score (s + s) / 2 = s, box with weights 1/2 each, mask and attribute means
    of equal values), so predict and eval of [W, copy of W] equal those of W, to the bit."""
    twin = tmp_path / "twin.pth"
    shutil.copy(weights, twin)
    outs = {}
    for name, ws in {"one": [str(weights)], "two": [str(weights), str(twin)]}.items():
        outs[name] = tmp_path / name
        assert fashionseg_main(["predict", "--weights", *ws, str(image_folder), str(resized_shards), "--split", "val",
                                "--out", str(outs[name]), "--device", "cpu", "--no-progress", "--no-overlays"]) == 0
        assert fashionseg_main(["eval", "--weights", *ws, "--shards", str(resized_shards), "--out",
                                str(outs[name] / "eval.json"), "--device", "cpu", "--no-progress"]) == 0
    one, two = (json.loads((outs[n] / "predictions.json").read_text()) for n in ("one", "two"))
    assert len(one) > 0 and one == two
    assert (outs["one"] / "submission.csv").read_text() == (outs["two"] / "submission.csv").read_text()
    m1, m2 = (json.loads((outs[n] / "eval.json").read_text()) for n in ("one", "two"))
    assert m1.pop("weights") == str(weights) and m2.pop("weights") == [str(weights), str(twin)]
    m1.pop("infer_seconds"), m2.pop("infer_seconds")
    assert m1 == m2


def test_ensemble_combines_with_tta(weights, image_folder):
    """Every model x every TTA variant: two copies of a model under TTA merge to that model's TTA
    result (the same clusters, each twice; equal up to float summation order)."""
    from fashionseg.data.eval_source import decode_for_test
    from fashionseg.eval.ensemble import TTA, ensemble_outputs

    a, _, _ = inf.load_weights(weights, "cpu")
    b, _, _ = inf.load_weights(weights, "cpu")
    img, _ = decode_for_test(image_folder / "odd_a.jpg", 64, 96)
    tta = TTA((0.75, 1.0))
    with torch.no_grad():
        single = ensemble_outputs([a], [img], [tuple(img.shape[-2:])], tta)[0]
        pair = ensemble_outputs([a, b], [img], [tuple(img.shape[-2:])], tta)[0]
        assert single["scores"].tolist() == pytest.approx(tta_outputs(a, [img], scales=(0.75, 1.0))[0]["scores"].tolist())
    assert pair["labels"].tolist() == single["labels"].tolist() and len(single["scores"]) > 0
    for k in ("boxes", "scores", "masks", "attribute_scores"):
        torch.testing.assert_close(pair[k], single[k], rtol=1e-5, atol=1e-6)


def test_ensemble_refuses_other_vocabularies(weights, resized_shards, tmp_path, capsys):
    from fashionseg.eval.ensemble import load_ensemble

    ckpt = torch.load(weights, weights_only=True)
    other = tmp_path / "other.pth"
    renamed = [dict(c) for c in ckpt["categories"]]
    renamed[0]["name"] = renamed[0]["name"] + "_x"
    torch.save({**ckpt, "categories": renamed}, other)
    with pytest.raises(inf.WeightsError, match=rf"{weights} and {other} have different categories"):
        load_ensemble([str(weights), str(other)], "cpu")
    assert fashionseg_main(["eval", "--weights", str(weights), str(other), "--shards", str(resized_shards),
                            "--out", str(tmp_path / "e.json"), "--device", "cpu", "--no-progress"]) == 1
    assert fashionseg_main(["predict", "--weights", str(weights), str(other), str(resized_shards),
                            "--out", str(tmp_path / "p"), "--device", "cpu", "--no-progress"]) == 1
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert err.count("have different categories") == 2 and not (tmp_path / "e.json").exists()
