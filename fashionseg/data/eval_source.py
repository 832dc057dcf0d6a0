"""What eval and predict read: test-time images and COCO ground truth, from the data layer.

- `iter_eval_samples`: one rank's share of a split (sample index % world_size == rank), each
  sample read by seeking to its manifest offset, so a rank reads nothing of another's share.
  Images go through `transforms.decode_resized`, the very decode-and-resize of training (uint8,
  reduced-scale JPEG decode, antialiased bilinear), at the test scale.
- `ground_truth`: the split as a COCO dataset dict with the source's own image ids, on the
  original image grid (what Kaggle and the official Fashionpedia evaluator score) or on the
  stored one. Shards built with `--max-size` keep each mask's original-grid RLE for this
  (docs/formats.md, "Original-grid masks").
- `decode_for_test`: the same preprocessing for a loose image file (predict).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data.plan import build_pool
from fashionseg.data.shards import manifest as manifest_lib
from fashionseg.data.shards.reader import iter_samples, iter_split, read_manifest
from fashionseg.data.transforms import SHARD_HINT, SampleError, decode_resized, decode_rgb, output_size
from fashionseg.data.vocab import Vocab

Grid = Literal["original", "stored"]


@dataclass
class EvalSample:
    index: int  # position in the split (manifest order)
    key: str  # tar key
    image_id: int  # the source's own integer id (docs/formats.md "Image ids")
    image: torch.Tensor  # uint8 [3, h, w] at the test scale
    stored_size: tuple[int, int]  # (H, W) of the image in the shard
    original_size: tuple[int, int]  # (H, W) of the source image: the grid of the original-grid ground truth
    meta: dict  # the sample JSON


def _split(shard_dir: Path, split: str) -> dict:
    manifest = read_manifest(shard_dir)
    path = shard_dir / manifest_lib.MANIFEST_NAME
    if split not in manifest["splits"]:
        raise manifest_lib.ManifestError(f"{path}: no split '{split}' (has {', '.join(manifest['splits'])})")
    manifest_lib.require_ids(manifest, path)
    return manifest


def iter_eval_samples(shard_dir: str | Path, split: str, *, rank: int = 0, world_size: int = 1, test_size: int,
                      max_size: int, max_images: int | None = None) -> Iterator[EvalSample]:
    """This rank's samples of the first `max_images` (None: all) of `split`, in split order,
    resized so the shorter side is `test_size` and the longer at most `max_size` (the caller
    resolves `data.test_size=None` to `max(data.min_size)`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    shard_dir = Path(shard_dir)
    table = build_pool(_split(shard_dir, split)["splits"][split], max_images)
    for index, (key, jpg, meta) in iter_samples(shard_dir, table, range(rank, len(table), world_size), gap=0):
        h, w = int(meta["height"]), int(meta["width"])
        image = decode_resized(f"sample '{key}'", jpg, (h, w), output_size(h, w, test_size, max_size), SHARD_HINT)
        yield EvalSample(index, key, int(meta["image_id"]), image, (h, w),
                         (int(meta.get("orig_height", h)), int(meta.get("orig_width", w))), meta)


def ground_truth(shard_dir: str | Path, split: str, *, grid: Grid = "original", max_images: int | None = None) -> dict:
    """The first `max_images` (None: all) samples of `split` as a COCO ground-truth dict:
    images `{id, file_name, height, width, source_id, key}` (id: the source's integer id),
    annotations `{id, image_id, category_id, attribute_ids, segmentation (compressed RLE), area,
    bbox, iscrowd: 0}` with source category/attribute ids, and the manifest's vocabulary.
    `grid="original"`: masks and sizes of the source images (instances that vanished when the
    build shrank an image are included); `"stored"`: those of the shard images."""
    if grid not in ("original", "stored"):
        raise ValueError(f"grid must be 'original' or 'stored', not {grid!r}")
    shard_dir = Path(shard_dir)
    manifest = _split(shard_dir, split)
    images, annotations = [], []
    for index, (key, _, meta) in enumerate(iter_split(shard_dir, split)):
        if max_images is not None and index >= max_images:
            break
        h, w = int(meta["height"]), int(meta["width"])
        if grid == "original":
            h, w = int(meta.get("orig_height", h)), int(meta.get("orig_width", w))
            insts = [(i, i.get("orig_segmentation", i["segmentation"])) for i in meta["instances"]]
            insts += [(i, i["orig_segmentation"]) for i in meta.get("orig_only", ())]
        else:
            insts = [(i, i["segmentation"]) for i in meta["instances"]]
        images.append({"id": int(meta["image_id"]), "file_name": str(meta["source_id"]), "height": h, "width": w,
                       "source_id": str(meta["source_id"]), "key": key})
        rles = [{"size": list(seg["size"]), "counts": seg["counts"].encode("ascii")} for _, seg in insts]
        if list(rles[0]["size"] if rles else [h, w]) != [h, w] or any(r["size"] != rles[0]["size"] for r in rles):
            raise SampleError(f"sample '{key}': a mask is not on the {h}x{w} {grid} grid{SHARD_HINT}")
        areas = mask_util.area(rles) if rles else np.zeros(0)
        boxes = mask_util.toBbox(rles) if rles else np.zeros((0, 4))
        for (inst, seg), area, box in zip(insts, areas, boxes):
            annotations.append({"id": len(annotations) + 1, "image_id": int(meta["image_id"]),
                                "category_id": int(inst["category_id"]),
                                "attribute_ids": [int(a) for a in inst.get("attribute_ids", ())],
                                "segmentation": {"size": [h, w], "counts": seg["counts"]},
                                "area": float(area), "bbox": [float(v) for v in box], "iscrowd": 0})
    vocab = Vocab.from_dict(manifest, str(shard_dir / manifest_lib.MANIFEST_NAME))
    return {"info": {"description": f"fashionseg ground truth: {shard_dir} split {split}, {grid} grid"},
            "images": images, "annotations": annotations,
            "categories": [dict(c) for c in vocab.categories], "attributes": [dict(a) for a in vocab.attributes]}


def decode_for_test(data: bytes | str | os.PathLike, test_size: int, max_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A loose image (bytes or a path) -> (uint8 [3, h, w] at the test scale, its own (H, W)).
    SampleError (a ValueError) naming the file when it cannot be read or decoded."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw, where = bytes(data), "image"
    else:
        where = str(data)
        try:
            raw = Path(data).read_bytes()
        except OSError as e:
            raise SampleError(f"{where}: cannot read the image ({e.strerror or e})") from e
    try:
        w, h = Image.open(io.BytesIO(raw)).size  # the header only
    except Exception:  # not a format PIL knows: decode it whole to learn its size
        h, w = decode_rgb(where, raw).shape[1:]
    return decode_resized(where, raw, (h, w), output_size(h, w, test_size, max_size), stated="its header says"), (h, w)
