"""`shard build`: bit-exact masks read back without fashionseg, offsets, split, resize, resume."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.reader import iter_shard, iter_split, read_manifest
from fashionseg.data.shards.verify import verify


def read_back(out: Path) -> dict[str, tuple[bytes, dict]]:
    """Every sample via plain tarfile + json (no fashionseg reader): key -> (jpg, meta)."""
    samples = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            parts = defaultdict(dict)
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                parts[key][ext] = tar.extractfile(m).read()
        for key, p in parts.items():
            samples[key] = (p["jpg"], json.loads(p["json"]))
    return samples


def source_rows(src: Path) -> dict[str, list[dict]]:
    rows = defaultdict(list)
    with open(src / "train.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows[r["ImageId"]].append(r)
    return rows


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_build_verify_read_back_bit_exact(synth_src, synth_shards):
    assert all(not r.errors for r in verify(synth_shards))
    samples = read_back(synth_shards)
    rows = source_rows(synth_src)
    assert set(s[1]["source_id"] for s in samples.values()) == set(rows)
    for key, (jpg, meta) in samples.items():
        src_rows = rows[meta["source_id"]]
        assert jpg == (synth_src / "train" / f"{meta['source_id']}.jpg").read_bytes()  # no resize: original bytes
        assert len(meta["instances"]) == len(src_rows)
        for inst, r in zip(meta["instances"], src_rows):
            h, w = int(r["Height"]), int(r["Width"])
            assert inst["segmentation"]["size"] == [h, w] == [meta["height"], meta["width"]]
            got = mask_util.decode({"size": [h, w], "counts": inst["segmentation"]["counts"].encode()})
            want = rle.decode_kaggle(r["EncodedPixels"], h, w)
            np.testing.assert_array_equal(got, want)
            assert inst["category_id"] == int(r["ClassId"])
            assert inst["attribute_ids"] == sorted(int(a) for a in r["AttributesIds"].split(",") if a)
            assert inst["area"] == int(want.sum())
            ys, xs = np.nonzero(want)
            assert inst["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_manifest_offsets_and_reader(synth_shards):
    m = read_manifest(synth_shards)
    assert m["format"] == "fashionseg-shards" and m["version"] == 2
    assert len(m["categories"]) == 46 and len(m["attributes"]) == 294
    for split, info in m["splits"].items():
        keys = [k for k, _, _ in iter_split(synth_shards, split)]
        assert keys == [s["key"] for sh in info["shards"] for s in sh["samples"]]
        for sh in info["shards"]:
            assert (synth_shards / sh["name"]).stat().st_size == sh["bytes"]
            with open(synth_shards / sh["name"], "rb") as f:
                for s in sh["samples"]:
                    f.seek(s["offset"])
                    assert tarfile.TarInfo.frombuf(f.read(512), "utf-8", "strict").name == f"{s['key']}.jpg"
            last = sh["samples"][-1]
            (k, jpg, meta), = list(iter_shard(synth_shards / sh["name"], offset=last["offset"]))  # resumes mid-shard
            assert k == last["key"] and (meta["width"], meta["height"]) == (last["width"], last["height"])
            assert sorted({i["category_id"] for i in meta["instances"]}) == last["categories"]


def test_split_is_stratified_and_deterministic(synth_src, synth_shards, tmp_path):
    m = read_manifest(synth_shards)
    cats = {s: defaultdict(int) for s in m["splits"]}
    for split, info in m["splits"].items():
        for sh in info["shards"]:
            for s in sh["samples"]:
                for c in s["categories"]:
                    cats[split][c] += 1
    assert m["splits"]["val"]["num_samples"] == 6 and m["splits"]["train"]["num_samples"] == 18
    for c in set(cats["train"]) | set(cats["val"]):
        if cats["train"][c] + cats["val"][c] >= 2:  # every category seen twice is in both splits
            assert cats["train"][c] and cats["val"][c], c
    again = tmp_path / "again"
    code, _ = build(BuildConfig(src=str(synth_src), out=str(again), samples_per_shard=4, val_fraction=0.25, workers=2, progress=False))
    assert code == 0
    assert shard_hashes(again) == shard_hashes(synth_shards)  # 2 worker processes: identical bytes


def test_max_size_resizes_image_and_masks_together(synth_src, tmp_path):
    out = tmp_path / "small"
    code, _ = build(BuildConfig(src=str(synth_src), out=str(out), max_size=50, samples_per_shard=8, workers=1, progress=False))
    assert code == 0 and all(not r.errors for r in verify(out))
    rows = source_rows(synth_src)
    for key, (jpg, meta) in read_back(out).items():
        im = Image.open(io.BytesIO(jpg))
        assert im.format == "JPEG" and max(im.size) == 50 and (im.height, im.width) == (meta["height"], meta["width"])
        assert (meta["orig_height"], meta["orig_width"]) == (int(rows[meta["source_id"]][0]["Height"]), int(rows[meta["source_id"]][0]["Width"]))
        src = [r for r in rows[meta["source_id"]]]
        for inst in meta["instances"]:
            r = src.pop(0)
            while True:  # instances that vanished when shrunk are dropped (and reported)
                full = rle.decode_kaggle(r["EncodedPixels"], int(r["Height"]), int(r["Width"]))
                want = np.asarray(Image.fromarray(full * 255).resize(im.size, Image.Resampling.NEAREST)) > 127
                if want.any():
                    break
                r = src.pop(0)
            np.testing.assert_array_equal(rle.decode_coco(inst["segmentation"]), want)


_KILLER = """
import os, signal, sys
from fashionseg.data.shards import build as b
n = {"added": 0}
orig = b.ShardWriter.add
def add(self, *a):
    orig(self, *a)
    n["added"] += 1
    if n["added"] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, midway through a shard
b.ShardWriter.add = add
sys.exit(b.run(b.__dict__["argparse"].Namespace(src=sys.argv[1], out=sys.argv[2], format="auto", val_fraction=0.25,
    max_size=None, samples_per_shard=4, workers=1, seed=0, images=None, max_bad_fraction=0.05, no_progress=True)))
"""


def test_killed_build_resumes_to_identical_shards(synth_src, synth_shards, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(synth_src), str(out), "10"], capture_output=True)
    assert proc.returncode == -9
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and any(n.endswith(".tmp") for n in left)  # half-built: a temp shard, no manifest
    finished = shard_hashes(out)
    assert len(finished) == 2
    mtimes = {n: (out / n).stat().st_mtime_ns for n in finished}
    code, report = build(BuildConfig(src=str(synth_src), out=str(out), samples_per_shard=4, val_fraction=0.25, workers=1, progress=False))
    assert code == 0
    assert shard_hashes(out) == shard_hashes(synth_shards)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == mtimes  # finished shards were kept, not rewritten
    assert report["totals"]["shards_reused"] == 2
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    assert json.loads((out / "manifest.json").read_text())["splits"] == read_manifest(synth_shards)["splits"]


def test_damaged_shard_is_rebuilt_on_rerun(synth_src, synth_shards, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(synth_shards, out)
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "val-000000.tar").unlink()
    bad = {r.name: r.errors for r in verify(out) if r.errors}
    assert set(bad) == {"train-000001.tar", "val-000000.tar"}
    code, report = build(BuildConfig(src=str(synth_src), out=str(out), samples_per_shard=4, val_fraction=0.25, workers=1, progress=False))
    assert code == 0 and report["totals"]["shards_reused"] == len(shard_hashes(synth_shards)) - 2
    assert shard_hashes(out) == shard_hashes(synth_shards)


def test_cli_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shard = [sys.executable, "-c", "import sys; from fashionseg.cli import shard_main; sys.exit(shard_main())"]
    src, out = tmp_path / "src", tmp_path / "shards"
    run = lambda *a: subprocess.run([*shard, *map(str, a)], capture_output=True, text=True, env=env)  # noqa: E731
    r = run("synth", src, "--images", 12, "--size", 64)
    assert r.returncode == 0, r.stderr
    r = run("build", src, out, "--samples-per-shard", 5, "--workers", 2)
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stderr and "samples written" in r.stderr
    r = run("verify", out)
    assert r.returncode == 0 and "intact" in r.stdout, r.stderr
    r = run("inspect", out, "--out", tmp_path / "sheet.png")
    assert r.returncode == 0, r.stderr
    assert "instances per category" in r.stdout and "attribute frequencies" in r.stdout
    assert Image.open(tmp_path / "sheet.png").size[0] >= 256
    r = run("verify", tmp_path / "nothing")
    assert r.returncode == 2 and str(tmp_path / "nothing" / "manifest.json") in r.stderr


def test_mask_resize_equals_pil_nearest_on_odd_sizes():
    from fashionseg.data.shards.process import _resize_mask

    rng = np.random.default_rng(0)
    for (h, w), (nw, nh) in [((97, 61), (40, 25)), ((61, 97), (25, 40)), ((33, 33), (7, 7)), ((250, 131), (123, 64))]:
        m = (rng.random((h, w)) < 0.3).astype(np.uint8)
        want = np.asarray(Image.fromarray(m * 255).resize((nw, nh), Image.Resampling.NEAREST)) > 127
        np.testing.assert_array_equal(rle.decode_coco(_resize_mask(rle.encode_coco(m), (nw, nh))), want)
