"""`fashionseg eval`: COCO bbox/segm AP and Fashionpedia's AP^{IoU+F1} of a weights file on a split.

`evaluate_model` is the one evaluation path, used by this command and by the trainer: every rank
infers its share of the split (iter_rank_samples), results and ground truth are gathered on rank
0, scored there, and the metrics dict is broadcast so every rank returns the same numbers.

Metrics dict (also the JSON written by `--out`):
  {"split", "num_images", "num_detections", "mask_thresh", "attr_thresh",
   "bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
            "per_category": {str(cat id): {"AP", "AP50", "AP75"}}},
   "segm": {same},
   "iou_f1": {"AP", "AP_IOU50", "AP_IOU75", "AP_F150", ..., "per_category": {...}} (mask IoU),
   "gt_counts": {str(cat id): n}}
Values are fractions in 0..1; None where undefined (no ground truth of that kind). The command's
JSON adds "weights", "shards", "score_thresh" and "nms_thresh" (the post-processing it ran with:
flags > --config YAML, e.g. tune-thresholds' output > the checkpoint's model config).

Under `accelerate launch` / torchrun only rank 0 prints and writes; an error on any rank (say a
sample it cannot decode) is gathered too and raised on every rank, so none waits for the others.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from fashionseg.data.vocab import Vocab
from fashionseg.eval import coco as coco_lib
from fashionseg.eval import inference as inf
from fashionseg.eval.score import score_results
from fashionseg.io import atomic_write_json


def headline(metrics: dict) -> dict[str, float]:
    """The few numbers a training log shows: {"bbox_AP", "segm_AP", "segm_AP50", "iou_f1_AP"}."""
    out = {}
    for name, (section, key) in {"bbox_AP": ("bbox", "AP"), "segm_AP": ("segm", "AP"), "segm_AP50": ("segm", "AP50"),
                                 "iou_f1_AP": ("iou_f1", "AP")}.items():
        v = (metrics.get(section) or {}).get(key)
        if v is not None:
            out[name] = float(v)
    return out


@torch.no_grad()
def run_split(model: torch.nn.Module, shard_dir, split: str, vocab: Vocab, *, mask_thresh: float, batch_size: int,
              device, accelerator=None, attr_thresh: float = 0.5, max_images: int | None = None,
              progress: bool = True) -> tuple[dict | None, list[dict] | None, float]:
    """Infer this rank's share of `split`; on rank 0 return (GT dict, results, seconds), else (None, None, s)."""
    from fashionseg.model.build import unwrap

    rank, world = inf.rank_and_world(accelerator)
    net = unwrap(model)  # no DDP wrapper: ranks run different numbers of batches, without collectives
    was_training = net.training
    net.eval()
    images, anns, results = [], [], []
    total = inf.rank_share(inf.split_size(shard_dir, split, max_images), rank, world)
    t0 = time.perf_counter()
    error = None
    try:
        with progress_bar(progress and rank == 0, f"eval {split}", total) as advance:
            for batch in inf.batched(inf.iter_rank_samples(shard_dir, split, rank, world, max_images), batch_size):
                tensors = [inf.decode_image(jpg, f"{shard_dir}/{split} sample '{key}'").to(device) for _, key, jpg, _ in batch]
                outputs = inf.forward_by_shape(net, tensors)
                for (index, key, _, meta), out in zip(batch, outputs):
                    gt = coco_lib.gt_from_samples([(key, meta)], vocab)
                    for im in gt["images"]:
                        im["id"] = index
                    for a in gt["annotations"]:
                        a["image_id"] = index
                    images += gt["images"]
                    anns += gt["annotations"]
                    results += inf.outputs_to_results(out, index, vocab, mask_thresh=mask_thresh, attr_thresh=attr_thresh,
                                                      out_size=(int(meta["height"]), int(meta["width"])))
                advance(len(batch))
    except Exception as e:
        if world == 1:
            raise
        # still join the gather below, or the other ranks would wait there until the timeout
        error = (type(e), f"rank {rank}: {e}")
    finally:
        net.train(was_training)
    seconds = time.perf_counter() - t0
    parts = inf.gather_to_main((images, anns, results, error), accelerator)
    errors = inf.broadcast_from_main([p[3] for p in parts if p[3] is not None] if parts is not None else None, accelerator)
    if errors:  # every rank raises the same error
        kind, message = errors[0]
        raise (kind if issubclass(kind, ValueError) else RuntimeError)("; ".join(m for _, m in errors))
    if parts is None:
        return None, None, seconds
    all_images = sorted((im for p in parts for im in p[0]), key=lambda im: im["id"])
    all_anns = sorted((a for p in parts for a in p[1]), key=lambda a: a["image_id"])  # stable: keeps instance order
    for i, a in enumerate(all_anns):
        a["id"] = i + 1
    gt = {"images": all_images, "annotations": all_anns, "categories": [dict(c) for c in vocab.categories],
          "attributes": [dict(a) for a in vocab.attributes]}
    return gt, [r for p in parts for r in p[2]], seconds


def evaluate_model(model: torch.nn.Module, shard_dir, split: str, vocab: Vocab, *, mask_thresh: float, batch_size: int,
                   device, accelerator=None, attr_thresh: float = 0.5, max_images: int | None = None,
                   iou_f1: bool = True, progress: bool = True) -> dict:
    """Metrics of `model` on `split` of a shard set (module docstring); identical on every rank.

    Leaves the model in the train/eval mode it was given in. `device` is where images go
    (the model's device)."""
    from fashionseg.data.shards.reader import read_manifest

    inf.check_same_vocab(vocab, Vocab.from_dict(read_manifest(shard_dir)), str(shard_dir))
    gt, results, seconds = run_split(model, shard_dir, split, vocab, mask_thresh=mask_thresh, batch_size=batch_size,
                                     device=device, accelerator=accelerator, attr_thresh=attr_thresh,
                                     max_images=max_images, progress=progress)
    metrics = None
    if gt is not None:
        metrics = score_results(gt, results, iou_f1=iou_f1)
        metrics.update(split=split, mask_thresh=mask_thresh, attr_thresh=attr_thresh,
                       infer_seconds=round(seconds, 3))
    return inf.broadcast_from_main(metrics, accelerator)


class progress_bar:  # noqa: N801 (used like a function)
    """rich progress bar with images/s (a no-op when disabled)."""

    def __init__(self, enabled: bool, label: str, total: int, unit: str = "img"):
        self.enabled, self.label, self.total, self.unit = enabled, label, total, unit

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.t0 = time.perf_counter()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total, rate="")

        def advance(n: int) -> None:
            done = self.bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(task, advance=n, rate=f"{rate:.2f} {self.unit}/s")

        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


# -- command ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="model_final.pth written by `fashionseg train`")
    p.add_argument("--shards", required=True, help="shard folder (with manifest.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write the metrics JSON here (default: eval.json beside the weights)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    inf.add_postprocess_arguments(p)
    p.add_argument("--attr-thresh", type=float, default=0.5, help="attribute score for the predicted attribute set")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N samples of the split only")
    p.add_argument("--no-iou-f1", action="store_true", help="skip AP^{IoU+F1} (COCO AP only)")
    p.add_argument("--no-progress", action="store_true")


def _accelerator(device: str | None):
    """An Accelerator when launched with several processes (accelerate launch / torchrun)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from accelerate import Accelerator

    # no GPU: say so, or accelerate reports a single process although the group has several
    acc = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
    return acc, acc.device


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from fashionseg.data.shards.manifest import ManifestError
    from fashionseg.eval.tables import print_metrics
    from fashionseg.data.shards.reader import ShardError

    console = Console(stderr=True)
    if args.batch_size < 1:
        console.print("[red]error:[/] --batch-size must be >= 1")
        return 2
    try:
        accelerator, device = _accelerator(args.device)
        model, vocab, model_cfg = inf.load_weights(args.weights, device)
        post = inf.apply_postprocess(model, model_cfg, args)
        mask_thresh = post["mask_thresh"]
        metrics = evaluate_model(model, args.shards, args.split, vocab, mask_thresh=mask_thresh,
                                 batch_size=args.batch_size, device=device, accelerator=accelerator,
                                 attr_thresh=args.attr_thresh, max_images=args.max_images,
                                 iou_f1=not args.no_iou_f1, progress=not args.no_progress)
    except (inf.WeightsError, ManifestError, ShardError, coco_lib.EvalDataError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    rank, _ = inf.rank_and_world(accelerator)
    if rank != 0:
        return 0
    metrics.update(weights=str(args.weights), shards=str(args.shards),
                   score_thresh=post["score_thresh"], nms_thresh=post["nms_thresh"])
    out = Path(args.out) if args.out else Path(args.weights).with_name("eval.json")
    atomic_write_json(out, metrics)
    print_metrics(metrics, vocab.categories, Console())
    console.print(f"metrics written to {escape(str(out))}")
    return 0
