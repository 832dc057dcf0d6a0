"""`fashionseg predict`: images, folders or shard sets -> predictions.json, submission.csv, overlays.

Outputs in `--out DIR`:
- `predictions.json`: COCO results (a list), one dict per detection: `image_id` (running index),
  `image_key` (the ImageId), `category_id` and `attribute_ids` as SOURCE ids, `score`, `bbox`
  [x, y, w, h], `segmentation` (COCO RLE), `attribute_scores` (parallel to `attribute_ids`:
  the attributes scoring >= --attr-thresh, best first). Masks and boxes are on the ORIGINAL
  image grid: for shard input the sample's `orig_height`/`orig_width` (mask probabilities are
  resized back before thresholding), for files the decoded image. Masks may overlap here.
- `submission.csv`: Kaggle's format (submission.py: overlaps resolved by score).
- `overlays/<ImageId>.png`: masks, names, top attributes (overlay.py), unless --no-overlays.

The ImageId is the file name without its extension for files, the sample's `image_id` for shards.

The grid of a file is its pixels as stored: an EXIF orientation tag is NOT applied, because
Kaggle's Height/Width (and the masks of train.csv) describe the stored pixel grid, and the model
was trained on stored grids too (shard build applies an orientation only when it is what makes
an image fit its annotated grid). A file that cannot be read or decoded (empty, truncated, not
an image) is reported on the console and in `skipped.json` (`[{"image_id", "source", "reason"}]`),
gets no row, prediction or overlay, and the run goes on; the exit code is 0 when at least one
image was predicted.

--tta: every image is run at each of --tta-scales (the model's resize target min_size/max_size
scaled) and, per scale, also horizontally flipped (flipped back after). All passes' detections
are pooled and merged per class: the highest-scoring remaining detection opens a cluster that
takes every remaining detection of its class with box IoU >= the model's nms_thresh. A cluster
becomes one detection: score = (sum over passes of the cluster's best score in that pass) /
number of passes (a detection found by one pass of six keeps a sixth of its score), box =
score-weighted mean of the members' boxes, mask probabilities and attribute scores = mean over
members. At most detections_per_img merged detections are kept.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torchvision.ops import box_iou

from fashionseg.eval import inference as inf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_TTA_SCALES = (0.8, 1.0, 1.2)


class InputError(ValueError):
    """An INPUT that is neither an image, a folder of images nor a shard set."""


@dataclass
class Item:
    image_key: str                      # submission ImageId
    source: str                         # for messages
    load: Callable[[], torch.Tensor]    # float [3, H, W] on the stored grid
    orig_size: tuple[int, int] | None   # (h, w) of the original grid; None: the decoded grid


def collect_inputs(inputs: list[str], split: str | None = None) -> tuple[list[Item] | Iterator[Item], int]:
    """INPUT paths -> (items in order, count). Shards stream lazily; files are listed up front."""
    from fashionseg.data.shards.manifest import MANIFEST_NAME
    from fashionseg.data.shards.reader import iter_split, read_manifest

    plans: list = []
    total = 0
    ids: dict[str, str] = {}  # ImageId (shards: the sample key, its tar-safe form) -> where

    def claim(image_id: str, where: str) -> None:
        if image_id in ids:  # found before anything is written
            raise InputError(f"ImageId '{image_id}' appears twice: {ids[image_id]} and {where}; "
                             "an ImageId (a file's name without its extension) must be unique")
        ids[image_id] = where

    def add_file(f: Path) -> None:
        claim(f.stem, str(f))
        plans.append(("file", f, None))

    for raw in inputs:
        p = Path(raw)
        if p.is_dir() and (p / MANIFEST_NAME).is_file():
            manifest = read_manifest(p)
            splits = [split] if split else list(manifest["splits"])
            for s in splits:
                if s not in manifest["splits"]:
                    raise InputError(f"{p}: no split '{s}' (has {', '.join(manifest['splits'])})")
                total += manifest["splits"][s]["num_samples"]
                for shard in manifest["splits"][s].get("shards", []):
                    for sample in shard.get("samples", []):
                        claim(str(sample["key"]), f"{p} [{s}]")
                plans.append(("shards", p, s))
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise InputError(f"{p}: folder has no images ({', '.join(IMAGE_EXTENSIONS)}) and no manifest.json")
            total += len(files)
            for f in files:
                add_file(f)
        elif p.is_file():
            total += 1
            add_file(p)
        else:
            raise InputError(f"{p}: no such file or folder")

    def items() -> Iterator[Item]:
        seen: dict[str, str] = {}
        for kind, p, s in plans:
            if kind == "file":
                stream = [Item(p.stem, str(p), lambda p=p: inf.decode_image(p), None)]
            else:
                stream = (Item(str(meta.get("image_id", key)), f"{p} [{s}] sample {key}",
                               lambda jpg=jpg, key=key: inf.decode_image(jpg, key),
                               (int(meta.get("orig_height", meta["height"])), int(meta.get("orig_width", meta["width"]))))
                          for key, jpg, meta in iter_split(p, s))
            for item in stream:
                if item.image_key in seen:
                    raise InputError(f"ImageId '{item.image_key}' appears twice: {seen[item.image_key]} and {item.source}")
                seen[item.image_key] = item.source
                yield item

    return items(), total


# -- test-time augmentation ---------------------------------------------------------------------
def _unflip(out: dict, width: int) -> dict:
    b = out["boxes"].clone()
    b[:, 0], b[:, 2] = width - out["boxes"][:, 2], width - out["boxes"][:, 0]
    return {**out, "boxes": b, "masks": out["masks"].flip(-1)}


def merge_passes(outputs: list[dict], iou_thresh: float, max_dets: int) -> dict:
    """Detections of several passes over one image -> one merged output (module docstring)."""
    n_passes = len(outputs)
    cat = {k: torch.cat([o[k] for o in outputs]) for k in ("boxes", "labels", "scores", "masks", "attribute_scores")}
    pass_of = torch.cat([torch.full((len(o["scores"]),), i, dtype=torch.long) for i, o in enumerate(outputs)])
    m = len(cat["scores"])
    if m == 0:
        return {k: v[:0] for k, v in cat.items()}
    order = torch.argsort(cat["scores"], descending=True, stable=True)
    iou = box_iou(cat["boxes"], cat["boxes"])
    free = torch.ones(m, dtype=torch.bool)
    merged: dict[str, list] = {k: [] for k in cat}
    for i in order.tolist():
        if not free[i]:
            continue
        members = torch.nonzero(free & (cat["labels"] == cat["labels"][i]) & (iou[i] >= iou_thresh)).flatten()
        members = torch.unique(torch.cat([members, torch.tensor([i])]))
        free[members] = False
        s = cat["scores"][members]
        best_per_pass = torch.zeros(n_passes).scatter_reduce(0, pass_of[members], s, reduce="amax")
        merged["scores"].append(best_per_pass.sum() / n_passes)
        boxes = cat["boxes"][members]
        merged["boxes"].append(boxes[0] if len(members) == 1 else (boxes * s[:, None]).sum(0) / s.sum().clamp_min(1e-12))
        merged["labels"].append(cat["labels"][i])
        merged["masks"].append(cat["masks"][members].float().mean(0))
        merged["attribute_scores"].append(cat["attribute_scores"][members].float().mean(0))
    out = {k: torch.stack(v) for k, v in merged.items()}
    keep = torch.argsort(out["scores"], descending=True, stable=True)[:max_dets]
    return {k: v[keep] for k, v in out.items()}


@torch.no_grad()
def tta_outputs(net: torch.nn.Module, images: list[torch.Tensor], scales=DEFAULT_TTA_SCALES, hflip: bool = True) -> list[dict]:
    """Run `net` (an unwrapped FashionMaskRCNN) over scales x flips and merge per image."""
    t = net.transform
    base_min, base_max = tuple(t.min_size), t.max_size
    per_image: list[list[dict]] = [[] for _ in images]
    try:
        for s in scales:
            t.min_size = tuple(max(8, round(v * s)) for v in base_min)
            t.max_size = max(8, round(base_max * s))
            batch = list(images) + ([im.flip(-1) for im in images] if hflip else [])
            outs = [{k: v.cpu() for k, v in o.items()} for o in inf.forward_by_shape(net, batch)]
            for i, im in enumerate(images):
                per_image[i].append(outs[i])
                if hflip:
                    per_image[i].append(_unflip(outs[len(images) + i], im.shape[-1]))
    finally:
        t.min_size, t.max_size = base_min, base_max
    rh = net.roi_heads
    return [merge_passes(p, rh.nms_thresh, rh.detections_per_img) for p in per_image]


# -- command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="model_final.pth written by `fashionseg train`")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images, or shard folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default=None, help="for shard input: only this split (default: all)")
    p.add_argument("--tta", action="store_true", help="horizontal flip x --tta-scales, merged (see module docs)")
    p.add_argument("--tta-scales", type=float, nargs="+", default=list(DEFAULT_TTA_SCALES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    inf.add_postprocess_arguments(p)
    p.add_argument("--attr-thresh", type=float, default=0.5, help="attribute score for the predicted attribute set")
    p.add_argument("--top-attributes", type=int, default=3, help="attribute names per instance on overlays")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def predict(model, vocab, items, total: int, out_dir: Path, *, mask_thresh: float, attr_thresh: float = 0.5,
            batch_size: int = 2, device="cpu", tta: bool = False, tta_scales=DEFAULT_TTA_SCALES,
            overlays: bool = True, top_attributes: int = 3, progress: bool = True, on_skip=None) -> dict:
    """The predict pipeline on an already loaded model; returns a summary dict.

    Images that fail to load are left out and listed in the summary's `skipped` (and
    `skipped.json`); `on_skip(entry)` is called for each as it happens."""
    from PIL import Image

    from fashionseg.data.shards.manifest import safe_key
    from fashionseg.eval.evaluate import progress_bar
    from fashionseg.eval.overlay import draw_overlay, save_png
    from fashionseg.eval.submission import image_rows, write_submission
    from fashionseg.io import atomic_write_json
    from fashionseg.model.build import unwrap

    net = unwrap(model).eval()
    results: list[dict] = []
    rows: list[tuple] = []
    skipped: list[dict] = []
    n_images = 0
    t0 = time.perf_counter()
    with progress_bar(progress, "predict", total) as advance, torch.no_grad():
        for batch in inf.batched(items, batch_size):
            n_batch = len(batch)
            images, loaded = [], []
            for it in batch:
                try:
                    images.append(it.load())
                    loaded.append(it)
                except ValueError as e:  # unreadable / undecodable: report, skip, go on
                    skipped.append({"image_id": it.image_key, "source": it.source, "reason": str(e)})
                    if on_skip is not None:
                        on_skip(skipped[-1])
            batch = loaded
            if not batch:
                advance(n_batch)
                continue
            dev_images = [im.to(device) for im in images]
            outputs = tta_outputs(net, dev_images, tta_scales) if tta else inf.forward_by_shape(net, dev_images)
            for it, im, out in zip(batch, images, outputs):
                size = it.orig_size or tuple(im.shape[-2:])
                res = inf.outputs_to_results(out, n_images, vocab, mask_thresh=mask_thresh, attr_thresh=attr_thresh,
                                             out_size=size, image_key=it.image_key)
                results += res
                rows += image_rows(it.image_key, res)
                if overlays:
                    pil = Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                    if pil.size != (size[1], size[0]):
                        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
                    save_png(out_dir / "overlays" / f"{safe_key(it.image_key)}.png",
                             draw_overlay(pil, res, vocab, top_attributes=top_attributes))
                n_images += 1
            advance(n_batch)
    seconds = time.perf_counter() - t0
    atomic_write_json(out_dir / "predictions.json", results, indent=None)
    n_rows = write_submission(out_dir / "submission.csv", rows)
    if skipped:
        atomic_write_json(out_dir / "skipped.json", skipped)
    elif (out_dir / "skipped.json").exists():  # from an earlier run into the same folder
        (out_dir / "skipped.json").unlink()
    return {"images": n_images, "detections": len(results), "submission_rows": n_rows, "seconds": seconds,
            "images_per_second": inf.images_per_second(n_images, seconds), "skipped": skipped}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fashionseg.data.shards.manifest import ManifestError
    from fashionseg.data.shards.reader import ShardError
    console = Console(stderr=True)
    if args.batch_size < 1:
        console.print("[red]error:[/] --batch-size must be >= 1")
        return 2
    out_dir = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        items, total = collect_inputs(args.inputs, args.split)
        model, vocab, model_cfg = inf.load_weights(args.weights, device)
        mask_thresh = inf.apply_postprocess(model, model_cfg, args)["mask_thresh"]
        summary = predict(model, vocab, items, total, out_dir, mask_thresh=mask_thresh, attr_thresh=args.attr_thresh,
                          batch_size=args.batch_size, device=device, tta=args.tta, tta_scales=tuple(args.tta_scales),
                          overlays=not args.no_overlays, top_attributes=args.top_attributes,
                          progress=not args.no_progress,
                          on_skip=lambda e: console.print(f"[yellow]skipped:[/] {escape(e['reason'])}", highlight=False))
    except (InputError, inf.WeightsError, ManifestError, ShardError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    console.print(f"{summary['images']} images, {summary['detections']} detections, {summary['submission_rows']} "
                  f"submission rows in {summary['seconds']:.1f} s ({summary['images_per_second']:.2f} images/s) -> {escape(str(out_dir))}")
    if summary["skipped"]:
        console.print(f"[yellow]{len(summary['skipped'])} image(s) could not be read and were skipped[/] "
                      f"(no rows, predictions or overlays): listed in {escape(str(out_dir / 'skipped.json'))}")
    if summary["images"] == 0 and summary["skipped"]:
        console.print("[red]error:[/] no image could be read")
        return 1
    return 0
