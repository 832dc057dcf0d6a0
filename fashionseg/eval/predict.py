"""`fashionseg predict`: images, folders or shard sets -> predictions.json, submission.csv, overlays.

Outputs in `--out DIR`:
- `predictions.json`: a COCO segm results file (a list) that the official `Fashionpedia.loadRes`,
  pycocotools' `COCO.loadRes` and `fashionseg score` accept against the source's annotation
  file: `image_id` (the source's own id: COCO/Fashionpedia `images[].id`; Kaggle sources: the
  integer the shard build assigned; loose files: numbered in input order after the largest id
  of the shard sets given with them, else from 1), `category_id` and
  `attribute_ids` as SOURCE ids, `score`, `segmentation` (COCO RLE on the ORIGINAL image grid),
  plus `image_key` (the ImageId) and `attribute_scores` (parallel to `attribute_ids`: the
  attributes scoring >= --attr-thresh, best first). There is no `bbox`: the official loadRes
  takes a result's area from its box when it has one (that moves detections between the
  small/medium/large ranges), without it from the mask, as for ground truth. Masks may overlap.
- `images.json`: the id map, COCO-style: `{"images": [{"id", "file_name" (the ImageId), "height",
  "width", "source"}], "categories", "attributes"}` (for Kaggle sources and loose files, whose
  ImageIds are strings, this is the key from results back to images).
- `submission.csv`: Kaggle's format (submission.py: overlaps resolved by score); with
  `--sample-submission FILE`, every ImageId of FILE in its order.
- `overlays/<ImageId>.png`: masks, names, top attributes (overlay.py), unless --no-overlays.

The ImageId is the file name without its extension for files, the source's image name for
shards (Kaggle ImageId, COCO file name without extension). Images are decoded and resized by
the data layer (eval_source.decode_for_test / iter_eval_samples: the training resize, at the
test scale) and the model pastes masks at the original size.

The grid of a file is its pixels as stored: an EXIF orientation tag is NOT applied, because
Kaggle's Height/Width (and the masks of train.csv) describe the stored pixel grid, and the model
was trained on stored grids too (shard build applies an orientation only when it is what makes
an image fit its annotated grid). A file that cannot be read or decoded (empty, truncated, not
an image) is reported on the console and in `skipped.json` (`[{"image_id", "source", "reason"}]`),
gets no prediction or overlay (and no row, or the sample's row with --sample-submission), and
the run goes on; the exit code is 0 when at least one image was predicted.

--tta (horizontal flip x --tta-scales) and several weights files (`--weights A B C`, e.g. the
snapshots of a `train.schedule=cosine_restarts` run; one vocabulary) run every model x every TTA
variant and merge the detections per image and class (ensemble.py). One file without --tta is the
model's own output.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from fashionseg.eval import inference as inf
from fashionseg.eval.ensemble import DEFAULT_TTA_SCALES, TTA, ensemble_outputs, load_ensemble

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class InputError(ValueError):
    """An INPUT that is neither an image, a folder of images nor a shard set."""


@dataclass
class Item:
    image_key: str                      # submission ImageId
    image_id: int                       # the source's integer id (shards); files: numbered after the shards' ids
    source: str                         # for messages
    load: Callable[[], tuple[torch.Tensor, tuple[int, int]]]  # (uint8 image at the test scale, original (H, W))


def collect_inputs(inputs: list[str], split: str | None = None, *, test_size: int = 800,
                   max_size: int = 1333) -> tuple[Iterator[Item], int]:
    """INPUT paths -> (items in order, count). Shards stream lazily; files are listed up front."""
    from fashionseg.data.eval_source import decode_for_test, iter_eval_samples
    from fashionseg.data.shards.manifest import MANIFEST_NAME
    from fashionseg.data.shards.reader import read_manifest

    plans: list = []
    total = 0
    ids: dict[str, str] = {}  # ImageId -> where
    shard_ids: set[int] = set()

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
                for shard in manifest["splits"][s]["shards"]:
                    for sample in shard["samples"]:
                        claim(str(sample.get("source_id", sample["key"])), f"{p} [{s}]")
                        shard_ids.add(int(sample.get("image_id", 0)))
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

    file_ids = iter(range(max(shard_ids, default=0) + 1, 2**62))  # never a shard's id

    def items() -> Iterator[Item]:
        seen: dict[str, str] = {}
        for kind, p, s in plans:
            if kind == "file":
                stream = [Item(p.stem, next(file_ids), str(p), lambda p=p: decode_for_test(p, test_size, max_size))]
            else:
                stream = (Item(str(e.meta.get("source_id", e.key)), e.image_id, f"{p} [{s}] sample {e.key}",
                               lambda e=e: (e.image, e.original_size))
                          for e in iter_eval_samples(p, s, test_size=test_size, max_size=max_size))
            for item in stream:
                if item.image_key in seen:
                    raise InputError(f"ImageId '{item.image_key}' appears twice: {seen[item.image_key]} and {item.source}")
                seen[item.image_key] = item.source
                yield item

    return items(), total


# -- command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, nargs="+", metavar="W",
                   help="model_final.pth written by `fashionseg train`; several (e.g. RUN/snapshots/cycle_*.pth): "
                        "their detections merged as --tta merges passes. The first folder or image file after "
                        "--weights starts the INPUTs (or end the list with --)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders of images, or shard folders")
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
    p.add_argument("--sample-submission", default=None, metavar="FILE",
                   help="the competition's sample_submission.csv: submission.csv then lists every ImageId of it, in "
                        "its order; an image without detections gets the sample's own row (submission.py)")
    inf.add_scale_arguments(p)


def predict(model, vocab, items, total: int, out_dir: Path, *, mask_thresh: float, attr_thresh: float = 0.5,
            batch_size: int = 2, device="cpu", tta: bool = False, tta_scales=DEFAULT_TTA_SCALES,
            overlays: bool = True, top_attributes: int = 3, progress: bool = True, on_skip=None,
            sample_submission: str | Path | None = None) -> dict:
    """The predict pipeline on an already loaded model (or a list of models: an ensemble); returns
    a summary dict.

    Images that fail to load are left out and listed in the summary's `skipped` (and
    `skipped.json`); `on_skip(entry)` is called for each as it happens."""
    from PIL import Image

    from fashionseg.data.shards.manifest import safe_key
    from fashionseg.eval.coco import segm_results
    from fashionseg.eval.evaluate import progress_bar
    from fashionseg.eval.overlay import draw_overlay, save_png
    from fashionseg.eval.submission import align_to_sample, image_rows, read_sample, write_submission
    from fashionseg.io import atomic_write_json
    from fashionseg.model.build import unwrap

    sample = read_sample(sample_submission) if sample_submission else None  # a bad file fails before the model runs
    nets = [unwrap(m).eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
    tta_spec = TTA(tuple(tta_scales)) if tta else None
    results: list[dict] = []
    rows: list[tuple] = []
    skipped: list[dict] = []
    images_meta: list[dict] = []
    t0 = time.perf_counter()
    with progress_bar(progress, "predict", total) as advance, torch.no_grad():
        for batch in inf.batched(items, batch_size):
            n_batch = len(batch)
            loaded = []
            for it in batch:
                try:
                    loaded.append((it, *it.load()))
                except ValueError as e:  # unreadable / undecodable: report, skip, go on
                    skipped.append({"image_id": it.image_key, "source": it.source, "reason": str(e)})
                    if on_skip is not None:
                        on_skip(skipped[-1])
            if not loaded:
                advance(n_batch)
                continue
            dev_images = [im.to(device) for _, im, _ in loaded]
            sizes = [size for _, _, size in loaded]
            outputs = ensemble_outputs(nets, dev_images, sizes, tta_spec)
            for (it, im, size), out in zip(loaded, outputs):
                image_id = it.image_id
                images_meta.append({"id": int(image_id), "file_name": it.image_key, "height": int(size[0]),
                                    "width": int(size[1]), "source": it.source})
                res = inf.outputs_to_results(out, image_id, vocab, mask_thresh=mask_thresh, attr_thresh=attr_thresh,
                                             out_size=size, image_key=it.image_key)
                results += res
                rows += image_rows(it.image_key, res)
                if overlays:
                    pil = Image.fromarray(im.permute(1, 2, 0).cpu().numpy())
                    if pil.size != (size[1], size[0]):
                        pil = pil.resize((size[1], size[0]), Image.BILINEAR)
                    save_png(out_dir / "overlays" / f"{safe_key(it.image_key)}.png",
                             draw_overlay(pil, res, vocab, top_attributes=top_attributes))
            advance(n_batch)
    seconds = time.perf_counter() - t0
    ids = [m["id"] for m in images_meta]
    if len(set(ids)) != len(ids):  # two shard sets of different sources
        raise InputError("two inputs share an image id (each shard set keeps its source's ids): "
                         "predict them into separate --out folders")
    atomic_write_json(out_dir / "predictions.json", segm_results(results), indent=None)
    atomic_write_json(out_dir / "images.json", {"images": images_meta,
                                                "categories": [dict(c) for c in vocab.categories],
                                                "attributes": [dict(a) for a in vocab.attributes]})
    aligned = None
    if sample is not None:
        rows, aligned = align_to_sample(rows, sample, [m["file_name"] for m in images_meta])
    n_rows = write_submission(out_dir / "submission.csv", rows)
    if skipped:
        atomic_write_json(out_dir / "skipped.json", skipped)
    elif (out_dir / "skipped.json").exists():  # from an earlier run into the same folder
        (out_dir / "skipped.json").unlink()
    return {"images": len(images_meta), "detections": len(results), "submission_rows": n_rows, "seconds": seconds,
            "images_per_second": inf.images_per_second(len(images_meta), seconds), "skipped": skipped,
            "sample_submission": aligned}


def split_weights_and_inputs(weights: list[str], inputs: list[str]) -> tuple[list[str], list[str]]:
    """`--weights A B images/ x.jpg`: argparse gives every path to --weights; the INPUTs start at
    the first folder or image file."""
    if inputs:
        return weights, inputs
    n = next((i for i, w in enumerate(weights) if i and (Path(w).is_dir() or Path(w).suffix.lower() in IMAGE_EXTENSIONS)),
             len(weights))
    return weights[:n], weights[n:]


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fashionseg.data.shards.manifest import ManifestError
    from fashionseg.data.shards.reader import ShardError
    from fashionseg.eval.submission import SubmissionError
    console = Console(stderr=True)
    if args.batch_size < 1:
        console.print("[red]error:[/] --batch-size must be >= 1")
        return 2
    args.weights, args.inputs = split_weights_and_inputs(args.weights, args.inputs)
    if not args.inputs:
        console.print("[red]error:[/] no INPUT: give image files, folders of images or shard folders after the weights")
        return 2
    out_dir = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        loaded = load_ensemble(args.weights, device)
        vocab, config = loaded[0].vocab, loaded[0].config
        test_size, max_size = inf.inference_scale(config, args.test_size, args.max_size)
        items, total = collect_inputs(args.inputs, args.split, test_size=test_size, max_size=max_size)
        mask_thresh = [inf.apply_postprocess(m.model, m.model_cfg, args) for m in loaded][0]["mask_thresh"]
        summary = predict([m.model for m in loaded], vocab, items, total, out_dir, mask_thresh=mask_thresh, attr_thresh=args.attr_thresh,
                          batch_size=args.batch_size, device=device, tta=args.tta, tta_scales=tuple(args.tta_scales),
                          overlays=not args.no_overlays, top_attributes=args.top_attributes,
                          progress=not args.no_progress, sample_submission=args.sample_submission,
                          on_skip=lambda e: console.print(f"[yellow]skipped:[/] {escape(e['reason'])}", highlight=False))
    except (InputError, inf.WeightsError, ManifestError, ShardError, SubmissionError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    console.print(f"{summary['images']} images, {summary['detections']} detections, {summary['submission_rows']} "
                  f"submission rows in {summary['seconds']:.1f} s ({summary['images_per_second']:.2f} images/s) -> {escape(str(out_dir))}")
    if summary["skipped"]:
        console.print(f"[yellow]{len(summary['skipped'])} image(s) could not be read and were skipped[/] "
                      f"(no rows, predictions or overlays): listed in {escape(str(out_dir / 'skipped.json'))}")
    aligned = summary["sample_submission"]
    if aligned:
        console.print(f"submission.csv follows {escape(str(args.sample_submission))}: {aligned['images']} ImageIds, "
                      f"{len(aligned['placeholder'])} with the sample's own row (no detections or not predicted)")
        if aligned["not_predicted"]:
            console.print(f"[yellow]{len(aligned['not_predicted'])} ImageId(s) of the sample were not among the inputs[/] "
                          f"(e.g. {escape(', '.join(aligned['not_predicted'][:3]))}): they keep the sample's row")
        if aligned["extra"]:
            console.print(f"[yellow]{len(aligned['extra'])} predicted image(s) are not in the sample and were left out "
                          f"of submission.csv[/] (e.g. {escape(', '.join(aligned['extra'][:3]))})")
    if summary["images"] == 0 and summary["skipped"]:
        console.print("[red]error:[/] no image could be read")
        return 1
    return 0
