"""eval_source: each rank reads only its share, test images = the training transform's, ground
truth with the source's image ids on the original or the stored grid."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from fashionseg.data import eval_source, rle
from fashionseg.data.shards import reader
from fashionseg.data.shards.build import BuildConfig, build
from fashionseg.data.shards.manifest import ManifestError
from fashionseg.data.shards.reader import iter_split, read_manifest
from fashionseg.data.shards.verify import verify
from fashionseg.data.transforms import SampleError, SampleTransform
from fashionseg.data.vocab import Vocab

from test_shard_coco import coco_src  # noqa: F401  (fixture)

TEST_SIZE, MAX_SIZE = 40, 60


def kaggle_rows(src):
    rows = defaultdict(list)
    with open(src / "train.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows[r["ImageId"]].append(r)
    return rows


@pytest.fixture(scope="module")
def small_shards(synth_src, tmp_path_factory):
    """synth_src built with --max-size 24 (96 px -> 24 px: some thin masks vanish)."""
    out = tmp_path_factory.mktemp("small_shards")
    code, report = build(BuildConfig(src=str(synth_src), out=str(out), samples_per_shard=4, val_fraction=0.25, max_size=24,
                                     workers=1, progress=False, max_bad_fraction=1.0))
    assert code == 0, report.get("error")
    assert all(not r.errors for r in verify(out))  # original-grid masks included
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_read_only_their_share_and_see_training_pixels(synth_shards, monkeypatch, world_size):
    manifest = read_manifest(synth_shards)
    listed = [s for sh in manifest["splits"]["train"]["shards"] for s in sh["samples"]]
    transform = SampleTransform(Vocab.from_dict(manifest), [TEST_SIZE], MAX_SIZE, train=False, test_size=TEST_SIZE)
    raw = {key: (jpg, meta) for key, jpg, meta in iter_split(synth_shards, "train")}
    reads = []
    real = reader.iter_shard
    monkeypatch.setattr(reader, "iter_shard", lambda path, offset=0, count=None: (reads.append((path.name, offset, count)),
                                                                                  real(path, offset, count))[1])
    seen = []
    for rank in range(world_size):
        reads.clear()
        got = list(eval_source.iter_eval_samples(synth_shards, "train", rank=rank, world_size=world_size,
                                                 test_size=TEST_SIZE, max_size=MAX_SIZE))
        mine = list(range(rank, len(listed), world_size))
        assert [s.index for s in got] == mine
        if world_size > 1:  # one seek per own sample, nothing else read
            assert sorted((off, n) for _, off, n in reads) == sorted((listed[i]["offset"], 1) for i in mine)
        for s in got:
            jpg, meta = raw[s.key]
            assert s.key == listed[s.index]["key"] and s.meta == meta
            assert s.image_id == meta["image_id"] == listed[s.index]["image_id"]
            assert s.stored_size == s.original_size == (meta["height"], meta["width"])
            want, _ = transform.decode(s.key, jpg, meta, epoch=0, image_id=s.image_id)
            assert s.image.dtype == torch.uint8 and torch.equal(s.image, torch.from_numpy(want))
            img, size = eval_source.decode_for_test(jpg, TEST_SIZE, MAX_SIZE)
            assert size == s.stored_size and torch.equal(img, s.image)
        seen += [s.index for s in got]
    assert sorted(seen) == list(range(len(listed)))


def test_kaggle_image_ids_are_sorted_imageid_positions(synth_src, synth_shards):
    names = sorted(kaggle_rows(synth_src))
    manifest = read_manifest(synth_shards)
    for split in ("train", "val"):
        for sh in manifest["splits"][split]["shards"]:
            for s in sh["samples"]:
                assert s["image_id"] == names.index(s["source_id"]) + 1
    for _, _, meta in iter_split(synth_shards, "val"):
        assert meta["image_id"] == names.index(meta["source_id"]) + 1


def test_ground_truth_original_grid_is_the_source_bit_exact(synth_src, small_shards):
    rows = kaggle_rows(synth_src)
    gt = eval_source.ground_truth(small_shards, "train", grid="original")
    stored = eval_source.ground_truth(small_shards, "train", grid="stored")
    by_image = defaultdict(list)
    for a in gt["annotations"]:
        by_image[a["image_id"]].append(a)
    assert [i["id"] for i in gt["images"]] == [i["id"] for i in stored["images"]]
    vanished = 0
    for im, sim in zip(gt["images"], stored["images"]):
        src = rows[im["source_id"]]
        h, w = int(src[0]["Height"]), int(src[0]["Width"])
        assert (im["height"], im["width"]) == (h, w) and max(sim["height"], sim["width"]) == 24
        want = sorted(rle.decode_kaggle(r["EncodedPixels"], h, w).tobytes() for r in src)
        got = [mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
               for a in by_image[im["id"]]]
        assert sorted(m.tobytes() for m in got) == want  # every source instance, vanished ones included
        for a, m in zip(by_image[im["id"]], got):
            assert a["area"] == m.sum() and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        n_stored = sum(1 for a in stored["annotations"] if a["image_id"] == im["id"])
        vanished += len(src) - n_stored
        assert all(a["segmentation"]["size"] == [sim["height"], sim["width"]]
                   for a in stored["annotations"] if a["image_id"] == im["id"])
    assert vanished > 0, "the fixture should make some masks vanish at 24 px"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes([{**a, "score": 1.0} for a in gt["annotations"][:5]])
    assert len(res.anns) == 5
    assert len(eval_source.ground_truth(small_shards, "train", max_images=3)["images"]) == 3


def test_eval_samples_on_resized_shards_report_both_grids(synth_src, small_shards):
    rows = kaggle_rows(synth_src)
    for s in eval_source.iter_eval_samples(small_shards, "val", test_size=TEST_SIZE, max_size=MAX_SIZE):
        src = rows[s.meta["source_id"]][0]
        assert s.original_size == (int(src["Height"]), int(src["Width"])) and max(s.stored_size) == 24
        assert min(s.image.shape[1:]) == TEST_SIZE or max(s.image.shape[1:]) == MAX_SIZE


def test_coco_source_keeps_its_own_ids(coco_src, tmp_path):  # noqa: F811
    path, expect = coco_src
    out = tmp_path / "shards"
    code, report = build(BuildConfig(src=str(path), out=str(out), val_fraction=0.0, workers=1, progress=False,
                                     max_bad_fraction=1.0))
    assert code == 0, report.get("error")
    src_ids = {im["file_name"].rsplit(".", 1)[0]: im["id"] for im in json.loads(path.read_text())["images"]}
    gt = eval_source.ground_truth(out, "train")
    assert {im["source_id"]: im["id"] for im in gt["images"]} == {k: v for k, v in src_ids.items() if expect[k]}
    assert {c["id"] for c in gt["categories"]} == {3, 7, 50}
    for s in eval_source.iter_eval_samples(out, "train", test_size=TEST_SIZE, max_size=MAX_SIZE, max_images=2):
        assert s.image_id == src_ids[s.meta["source_id"]]


def test_decode_for_test_files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    img, size = eval_source.decode_for_test(tmp_path / "a.png", 25, 1000)
    assert size == (50, 80) and img.dtype == torch.uint8 and tuple(img.shape) == (3, 25, 40)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.bmp")  # PIL-only format, greyscale
    img, size = eval_source.decode_for_test(str(tmp_path / "g.bmp"), 50, 1000)
    assert size == (50, 80) and torch.equal(img[0], img[2]) and torch.equal(img[0], torch.from_numpy(rgb[..., 0]))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SampleError, match="empty.jpg: empty file"):
        eval_source.decode_for_test(tmp_path / "empty.jpg", 25, 1000)
    with pytest.raises(SampleError, match="missing.jpg: cannot read"):
        eval_source.decode_for_test(tmp_path / "missing.jpg", 25, 1000)


def test_version_1_sets_are_refused_with_a_rebuild_hint(synth_shards, tmp_path):
    m = read_manifest(synth_shards)
    m["version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="older fashionseg.*shard build"):
        eval_source.ground_truth(tmp_path, "train")
    with pytest.raises(ManifestError, match="no split 'test'"):
        next(eval_source.iter_eval_samples(synth_shards, "test", test_size=TEST_SIZE, max_size=MAX_SIZE))
