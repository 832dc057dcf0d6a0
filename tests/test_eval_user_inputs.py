"""`fashionseg eval` / `predict` on what users bring, through the real CLI: images (16-bit PNG,
CMYK, greyscale, EXIF-rotated, odd sizes, empty or truncated files), ImageId clashes, tuned
thresholds, and evaluation under `accelerate launch` on a machine without a GPU."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionseg.cli import main as fashionseg_main
from fashionseg.data.rle import decode_coco
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.vocab import Vocab
from fashionseg.eval import inference as inf
from train_utils import free_port, save_random_weights

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def kaggle_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """Independent Kaggle RLE decoder (1-indexed starts, down the columns first), strict."""
    flat = np.zeros(height * width, dtype=np.uint8)
    nums = [int(v) for v in encoded.split()]
    assert nums and len(nums) % 2 == 0
    end = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        assert start - 1 >= end and length > 0 and start - 1 + length <= height * width, "runs sorted, inside the grid"
        flat[start - 1 : start - 1 + length] = 1
        end = start - 1 + length
    return flat.reshape(width, height).T



@pytest.fixture(scope="module")
def weights(synth_shards, tmp_path_factory):
    """A random light model in the trainer's model_final.pth format (score_thresh 0: 3 dets/image)."""
    return save_random_weights(synth_shards, tmp_path_factory.mktemp("qa_weights") / "model_final.pth", 3)


# -- decoding ---------------------------------------------------------------------------------------
def test_test_decode_scales_16_bit_png_and_names_empty_files(tmp_path):
    """A 16-bit PNG decoded to uint16 was divided by 255 (values up to 257); an empty file raised
    torch's 'buffer length (0)' without the file's name. Predict decodes through the data layer."""
    from fashionseg.data.eval_source import decode_for_test

    rng = np.random.default_rng(0)
    grey8 = (rng.random((9, 7)) * 255).astype(np.uint8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 257 * v: exactly v
    img, size = decode_for_test(tmp_path / "g16.png", 7, 9)  # the test scale of its own size: no resize
    assert img.dtype == torch.uint8 and img.shape == (3, 9, 7) and size == (9, 7)
    np.testing.assert_array_equal(img.numpy(), np.broadcast_to(grey8, (3, 9, 7)))

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        decode_for_test(tmp_path / "empty.jpg", 7, 9)
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ValueError, match="text.jpg"):
        decode_for_test(tmp_path / "text.jpg", 7, 9)


# -- predict on what users bring --------------------------------------------------------------------
@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """Readable images of every kind next to unreadable ones; returns (folder, stored grids)."""
    d = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(3)
    rgb = lambda h, w: Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))  # noqa: E731
    rgb(61, 97).save(d / "odd.jpg", quality=95)
    rgb(40, 52).save(d / "plain.JPG")
    rgb(44, 36).save(d / "lossless.png")
    rgb(50, 50).convert("L").save(d / "grey.jpg")
    rgb(48, 40).convert("CMYK").save(d / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 on display": the stored grid is 30 x 56 all the same
    rgb(30, 56).save(d / "exif.jpg", exif=exif.tobytes())
    good = (d / "odd.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    grids = {"odd": (61, 97), "plain": (40, 52), "lossless": (44, 36), "grey": (50, 50), "cmyk": (48, 40), "exif": (30, 56)}
    return d, grids


def test_predict_skips_unreadable_files_and_keeps_the_stored_grid(weights, messy_folder, tmp_path):
    """A truncated or empty file in a folder aborted the whole run with nothing written; now it is
    reported (skipped.json), the others are predicted, and every row decodes on the stored grid."""
    folder, grids = messy_folder
    out = tmp_path / "pred"
    assert fashionseg_main(["predict", "--weights", str(weights), str(folder), "--out", str(out),
                            "--device", "cpu", "--no-progress"]) == 0
    skipped = json.loads((out / "skipped.json").read_text())
    assert sorted(s["image_id"] for s in skipped) == ["empty", "truncated"]
    assert all(s["source"] in s["reason"] for s in skipped)  # the message names the file

    preds = json.loads((out / "predictions.json").read_text())
    assert {p["image_key"] for p in preds} == set(grids)
    for p in preds:
        assert tuple(decode_coco(p["segmentation"]).shape) == grids[p["image_key"]]
    with open(out / "submission.csv", newline="") as f:
        assert f.readline() == "ImageId,EncodedPixels,ClassId,AttributesIds\n"
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert rows and {r["ImageId"] for r in rows} <= set(grids)
    for key, (h, w) in grids.items():
        dets = sorted((p for p in preds if p["image_key"] == key), key=lambda p: -p["score"])
        taken, expected = np.zeros((h, w), bool), []
        for p in dets:
            m = decode_coco(p["segmentation"]).astype(bool) & ~taken
            taken |= m
            if m.any():
                expected.append((m, p["category_id"]))
        got = [r for r in rows if r["ImageId"] == key]
        assert len(got) == len(expected)
        for r, (m, cat) in zip(got, expected):
            np.testing.assert_array_equal(kaggle_decode(r["EncodedPixels"], h, w), m.astype(np.uint8))
            assert int(r["ClassId"]) == cat
        assert Image.open(out / "overlays" / f"{key}.png").size == (w, h)
    assert not (out / "overlays" / "truncated.png").exists()

    # only unreadable input: exit 1, still no traceback
    assert fashionseg_main(["predict", "--weights", str(weights), str(folder / "truncated.jpg"), "--out",
                            str(tmp_path / "none"), "--device", "cpu", "--no-progress"]) == 1


def test_clashing_image_ids_fail_before_anything_is_written(weights, tmp_path):
    """c.jpg and c.png both give ImageId 'c': found mid-run before, after a.png and b.png overlays."""
    d = tmp_path / "clash"
    d.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "c.png"):
        Image.new("RGB", (20, 16), (9, 99, 199)).save(d / name)
    out = tmp_path / "out"
    assert fashionseg_main(["predict", "--weights", str(weights), str(d), "--out", str(out), "--device", "cpu",
                            "--no-progress", "--batch-size", "1"]) == 1
    assert not out.exists()


def test_weights_messages_say_what_to_pass(weights, tmp_path):
    (tmp_path / "model_final.pth").write_bytes(weights.read_bytes())
    with pytest.raises(inf.WeightsError, match="is a folder.*model_final.pth"):
        inf.load_weights(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {}\n")
    with pytest.raises(inf.WeightsError, match="config.yaml: cannot read as a torch weights file.*model_final.pth"):
        inf.load_weights(tmp_path / "config.yaml")


# -- distributed evaluation ---------------------------------------------------------------------------
def test_accelerate_launch_eval_gathers_on_rank_zero(weights, synth_shards, tmp_path):
    """Under `accelerate launch --multi_gpu` without a GPU the Accelerator reported ONE process
    (no cpu=True), so both ranks scored the whole split and both wrote eval.json."""
    single = tmp_path / "single.json"
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(synth_shards), "--out", str(single),
                            "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "dist.json"
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "fashionseg.cli", "eval",
           "--weights", str(weights), "--shards", str(synth_shards), "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("metrics written to") == 1, "only rank 0 writes and reports"
    a, b = json.loads(single.read_text()), json.loads(out.read_text())
    for m in (a, b):
        for k in ("infer_seconds", "weights", "shards"):
            m.pop(k)
    assert a == b and a["num_images"] == 6


def _bad_rank_worker(rank: int, world: int, port: int, weights: str, shards: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fashionseg.eval.evaluate import evaluate_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        model, vocab, _ = inf.load_weights(weights, "cpu")
        try:
            evaluate_model(model, shards, "val", vocab, mask_thresh=0.5, batch_size=1, device="cpu", test_size=64,
                           max_size=96, progress=False)
            msg = "no error"
        except ValueError as e:
            msg = str(e)
        (Path(out_dir) / f"rank{rank}.txt").write_text(msg)
    finally:
        dist.destroy_process_group()


def test_a_failing_rank_fails_every_rank_instead_of_hanging(weights, synth_shards, tmp_path):
    """A sample rank 1 cannot decode made rank 1 leave while rank 0 waited in gather_object
    (until the process group's timeout, 30 min by default). Now every rank raises its message."""
    import shutil

    import torch.multiprocessing as mp

    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    first = read_manifest(shards)["splits"]["val"]["shards"][0]["name"]
    with tarfile.open(shards / first) as t:
        jpgs = [m for m in t.getmembers() if m.name.endswith(".jpg")]
    with open(shards / first, "r+b") as f:  # sample 1 of the split belongs to rank 1 (i % 2)
        f.seek(jpgs[1].offset_data)
        f.write(b"XX")
    mp.spawn(_bad_rank_worker, args=(2, free_port(), str(weights), str(shards), str(tmp_path)), nprocs=2, join=True)
    msgs = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1] and msgs[0].startswith("rank 1: ") and jpgs[1].name[:-4] in msgs[0]


# -- tuned thresholds reach eval / predict ----------------------------------------------------------
def test_tuned_config_is_what_eval_then_scores(weights, synth_shards, tmp_path):
    """tune-thresholds wrote a YAML nothing could apply to a weights file (eval had no score/NMS
    option at all): `eval --config` now runs with it and reproduces the tuned figure exactly."""
    import yaml

    tuned = tmp_path / "tuned.yaml"
    assert fashionseg_main(["tune-thresholds", "--weights", str(weights), "--shards", str(synth_shards), "--out", str(tuned),
                            "--scores", "0.0,0.3", "--nms", "0.3,0.6", "--masks", "0.4", "--device", "cpu",
                            "--no-progress"]) == 0
    best = json.loads(tuned.with_suffix(".trials.json").read_text())[0]
    model = yaml.safe_load(tuned.read_text())["model"]
    assert (model["score_thresh"], model["nms_thresh"], model["mask_thresh"]) == (best["score_thresh"], best["nms_thresh"], 0.4)
    out = tmp_path / "eval.json"
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(synth_shards), "--config", str(tuned),
                            "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    m = json.loads(out.read_text())
    assert (m["score_thresh"], m["nms_thresh"], m["mask_thresh"]) == (best["score_thresh"], best["nms_thresh"], 0.4)
    assert m["num_detections"] == best["detections"] and m["segm"]["AP"] == pytest.approx(best["value"], abs=1e-12)
    # a flag beats the file; a value outside [0, 1] is refused with a message, not a traceback
    assert fashionseg_main(["eval", "--weights", str(weights), "--shards", str(synth_shards), "--config", str(tuned),
                            "--nms-thresh", "1.5", "--out", str(out), "--device", "cpu", "--no-progress"]) == 1


def test_category_table_fits_80_columns():
    from rich.console import Console

    from fashionseg.eval.tables import category_table

    vocab = Vocab.default()
    metrics = {"gt_counts": {"1": 3, "5": 2}, "bbox": {"per_category": {"1": {"AP": 0.5, "AP50": 0.75}}},
               "segm": {"per_category": {"1": {"AP": 0.25, "AP50": 1.0}}},
               "fashionpedia_per_category": {"1": {"iou_f1": {"AP": 0.125}}, "5": {"iou_only": {"AP": 0.5}}}}
    console = Console(width=80, record=True)
    console.print(category_table(metrics, vocab.categories))
    lines = console.export_text().splitlines()
    body = [l for l in lines if l.startswith("│")]
    assert len(body) == 2, "one line per category with ground truth"
    assert body[0].rstrip().endswith("12.5 │") and all(len(l) <= 80 for l in lines)
    assert body[1].rstrip().endswith("50.0* │")  # no attributes: the IoU-only AP, marked


def test_shard_set_given_twice_is_refused_up_front_and_brackets_survive(weights, synth_shards, tmp_path, capsys):
    """The same shard set twice clashed only mid-run; and rich ate '[train]' from the message (markup)."""
    out = tmp_path / "out"
    assert fashionseg_main(["predict", "--weights", str(weights), str(synth_shards), str(synth_shards), "--out", str(out),
                            "--device", "cpu", "--no-progress"]) == 1
    assert not out.exists()
    err = " ".join(capsys.readouterr().err.split())
    assert "appears twice" in err and "[train]" in err


def test_detections_do_not_depend_on_batch_partners(weights, synth_shards):
    """torchvision pads a batch to its largest image: the same image got other detections with
    --batch-size 1 and 3 (and so with 1 or 2 eval processes, which decide who shares a batch)."""
    from fashionseg.eval.evaluate import run_split

    sizes = {(s["height"], s["width"]) for sh in read_manifest(synth_shards)["splits"]["val"]["shards"] for s in sh["samples"]}
    assert len(sizes) > 1, "the split must mix image sizes"
    model, vocab, _ = inf.load_weights(weights, "cpu")
    runs = [run_split(model, synth_shards, "val", vocab, mask_thresh=0.5, batch_size=b, device="cpu", test_size=64,
                      max_size=96, progress=False)[0] for b in (1, 3)]
    assert len(runs[0]) == 6 * 3
    assert runs[0] == runs[1]  # scores, boxes, RLE masks, attributes: identical
