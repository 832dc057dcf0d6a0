"""`fashionseg eval`: COCO bbox/segm AP and Fashionpedia's AP^{IoU+F1} of a weights file on a split.

`evaluate_model` is the one evaluation path, used by this command and by the trainer: every rank
reads and infers only its share of the split through `fashionseg.data.eval_source` (the test
resize of training), results are gathered on rank 0 and scored there against the split's
ground truth (eval_source.ground_truth), and the metrics dict is broadcast so every rank
returns the same numbers.

Grid: by default ("original") predictions are pasted at each source image's own size and scored
against the original-resolution ground truth, as Kaggle and the official Fashionpedia evaluator
do, also for shards built with `--max-size`; `--grid stored` scores on the shard images' grid.
Image ids are the source's own (COCO `images[].id`; Kaggle sources: the id the build assigned).

Ensembles: `model` may be a list of models (`--weights A B C`, one vocabulary; the test scale and
post-processing thresholds are the first file's unless flags say otherwise) and `tta` a
`ensemble.TTA`: every model x every TTA variant, merged per image as ensemble.py says. One model
without TTA is scored exactly as before.

Metrics dict: score.score_results' layout (also the JSON written by `--out`) plus "split",
"grid", "mask_thresh", "attr_thresh", "test_size", "max_size", "infer_seconds"; the command's
JSON adds "weights", "shards", "score_thresh" and "nms_thresh" (the post-processing it ran with:
flags > --config YAML, e.g. tune-thresholds' output > the checkpoint's model config). A split
without images gives `{"split", "num_images": 0, "num_detections": 0, "empty": True}`.

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
from fashionseg.eval.ensemble import DEFAULT_TTA_SCALES, TTA, ensemble_outputs, load_ensemble
from fashionseg.eval.fashionpedia import parse_attribute_categories
from fashionseg.eval.score import add_attribute_categories_argument, score_results
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


GRIDS = ("original", "stored")


def empty_split(split: str) -> dict:
    """The metrics of a split without images: the trainer says so once and skips evaluation."""
    return {"split": split, "num_images": 0, "num_detections": 0, "empty": True}


def _default_scale(net) -> tuple[int, int]:
    """An older model's own resize target (it resized test images itself)."""
    t = getattr(net, "transform", None)
    if getattr(t, "min_size", None) is None or getattr(t, "max_size", None) is None:
        raise ValueError("evaluate_model needs test_size and max_size: the run's data.test_size (or the largest "
                         "data.min_size) and data.max_size (inference.inference_scale(config) gives both)")
    return int(max(t.min_size)), int(t.max_size)


@torch.no_grad()
def _models(model) -> list[torch.nn.Module]:
    from fashionseg.model.build import unwrap

    # no DDP wrapper: ranks run different numbers of batches, without collectives
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def run_split(model: torch.nn.Module | list[torch.nn.Module], shard_dir, split: str, vocab: Vocab, *, mask_thresh: float, batch_size: int,
              device, test_size: int, max_size: int, grid: str = "original", accelerator=None,
              attr_thresh: float = 0.5, max_images: int | None = None, progress: bool = True,
              tta: TTA | None = None) -> tuple[list[dict] | None, float]:
    """Infer this rank's share of `split`; on rank 0 return (all results, seconds), else (None, s)."""
    from fashionseg.data.eval_source import iter_eval_samples

    rank, world = inf.rank_and_world(accelerator)
    nets = _models(model)
    was_training = [net.training for net in nets]
    for net in nets:
        net.eval()
    results: list[dict] = []
    total = inf.rank_share(inf.split_size(shard_dir, split, max_images), rank, world)
    t0 = time.perf_counter()
    error = None
    try:
        samples = iter_eval_samples(shard_dir, split, rank=rank, world_size=world, test_size=test_size,
                                    max_size=max_size, max_images=max_images)
        with progress_bar(progress and rank == 0, f"eval {split}", total) as advance:
            for batch in inf.batched(samples, batch_size):
                sizes = [s.original_size if grid == "original" else s.stored_size for s in batch]
                outputs = ensemble_outputs(nets, [s.image.to(device) for s in batch], sizes, tta)
                for s, out, size in zip(batch, outputs, sizes):
                    results += inf.outputs_to_results(out, s.image_id, vocab, mask_thresh=mask_thresh,
                                                      attr_thresh=attr_thresh, out_size=size)
                advance(len(batch))
    except Exception as e:
        if world == 1:
            raise
        # still join the gather below, or the other ranks would wait there until the timeout
        error = (type(e), f"rank {rank}: {e}")
    finally:
        for net, mode in zip(nets, was_training):
            net.train(mode)
    seconds = time.perf_counter() - t0
    parts = inf.gather_to_main((results, error), accelerator)
    errors = inf.broadcast_from_main([p[1] for p in parts if p[1] is not None] if parts is not None else None, accelerator)
    if errors:  # every rank raises the same error
        kind, message = errors[0]
        raise (kind if issubclass(kind, ValueError) else RuntimeError)("; ".join(m for _, m in errors))
    if parts is None:
        return None, seconds
    return [r for p in parts for r in p[0]], seconds


def evaluate_model(model: torch.nn.Module | list[torch.nn.Module], shard_dir, split: str, vocab: Vocab, *, mask_thresh: float, batch_size: int,
                   device, accelerator=None, attr_thresh: float = 0.5, max_images: int | None = None,
                   iou_f1: bool = True, progress: bool = True, test_size: int | None = None,
                   max_size: int | None = None, grid: str = "original", attribute_categories="official",
                   tta: TTA | None = None) -> dict:
    """Metrics of `model` on `split` of a shard set (module docstring); identical on every rank.

    `test_size`/`max_size`: the test scale (the run's data.test_size or max data.min_size, and
    data.max_size; None: an older model's own transform sizes). Leaves the model in the
    train/eval mode it was given in. `device` is where images go (the model's device)."""
    from fashionseg.data.eval_source import ground_truth
    from fashionseg.data.shards.reader import read_manifest

    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    inf.check_same_vocab(vocab, Vocab.from_dict(read_manifest(shard_dir)), str(shard_dir))
    if inf.split_size(shard_dir, split, max_images) == 0:
        return empty_split(split)
    if test_size is None or max_size is None:
        default = _default_scale(_models(model)[0])
        test_size, max_size = test_size or default[0], max_size or default[1]
    results, seconds = run_split(model, shard_dir, split, vocab, mask_thresh=mask_thresh, batch_size=batch_size,
                                 device=device, test_size=test_size, max_size=max_size, grid=grid,
                                 accelerator=accelerator, attr_thresh=attr_thresh, max_images=max_images,
                                 progress=progress, tta=tta)
    metrics, error = None, None
    if results is not None:
        try:
            gt = ground_truth(shard_dir, split, grid=grid, max_images=max_images)
            metrics = score_results(gt, results, iou_f1="segm" if iou_f1 else None,
                                    attribute_categories=attribute_categories, segm_area_from_masks=True)
            metrics.update(split=split, grid=grid, mask_thresh=mask_thresh, attr_thresh=attr_thresh,
                           test_size=test_size, max_size=max_size, infer_seconds=round(seconds, 3))
        except Exception as e:  # raised on every rank below: the others would wait for the metrics forever
            if inf.rank_and_world(accelerator)[1] == 1:
                raise
            error = (type(e), str(e))
    metrics, error = inf.broadcast_from_main((metrics, error), accelerator)
    if error:
        raise (error[0] if issubclass(error[0], ValueError) else RuntimeError)(error[1])
    return metrics


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
    p.add_argument("--weights", required=True, nargs="+", metavar="W",
                   help="model_final.pth written by `fashionseg train`; several (e.g. RUN/snapshots/cycle_*.pth): "
                        "an ensemble, detections merged as --tta merges passes")
    p.add_argument("--shards", required=True, help="shard folder (with manifest.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--out", default=None, help="write the metrics JSON here (default: eval.json beside the weights; "
                   "eval_ensemble.json beside the first of several)")
    p.add_argument("--tta", action="store_true", help="horizontal flip x --tta-scales, merged (ensemble.py)")
    p.add_argument("--tta-scales", type=float, nargs="+", default=list(DEFAULT_TTA_SCALES))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    inf.add_postprocess_arguments(p)
    p.add_argument("--attr-thresh", type=float, default=0.5, help="attribute score for the predicted attribute set")
    p.add_argument("--max-images", type=int, default=None, help="evaluate the first N samples of the split only")
    p.add_argument("--no-iou-f1", action="store_true", help="skip AP^{IoU+F1} (COCO AP only)")
    p.add_argument("--grid", choices=GRIDS, default="original",
                   help="score on the source images' own grid (default, as Kaggle / the official tools) or the shards'")
    inf.add_scale_arguments(p)
    add_attribute_categories_argument(p)
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
    try:
        return _run(args)
    finally:
        # every rank leaves together: a rank that tears gloo down while rank 0 still writes aborts
        # the job ("terminate called without an active exception", exit -6)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
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
        spec = parse_attribute_categories(args.attribute_categories)
        loaded = load_ensemble(args.weights, device)
        vocab, config = loaded[0].vocab, loaded[0].config
        test_size, max_size = inf.inference_scale(config, args.test_size, args.max_size)
        post = [inf.apply_postprocess(m.model, m.model_cfg, args) for m in loaded][0]
        mask_thresh = post["mask_thresh"]
        tta = TTA(tuple(args.tta_scales)) if args.tta else None
        metrics = evaluate_model([m.model for m in loaded], args.shards, args.split, vocab, mask_thresh=mask_thresh,
                                 batch_size=args.batch_size, device=device, accelerator=accelerator,
                                 attr_thresh=args.attr_thresh, max_images=args.max_images,
                                 iou_f1=not args.no_iou_f1, progress=not args.no_progress, test_size=test_size,
                                 max_size=max_size, grid=args.grid, attribute_categories=spec, tta=tta)
    except (inf.WeightsError, ManifestError, ShardError, coco_lib.EvalDataError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    rank, _ = inf.rank_and_world(accelerator)
    if rank != 0:
        return 0
    if metrics.get("empty"):
        console.print(f"[red]error:[/] split '{escape(args.split)}' of {escape(str(args.shards))} has no images: nothing to evaluate")
        return 1
    one = len(args.weights) == 1
    metrics.update(weights=str(args.weights[0]) if one else [str(w) for w in args.weights], shards=str(args.shards),
                   score_thresh=post["score_thresh"], nms_thresh=post["nms_thresh"])
    if tta is not None:
        metrics["tta_scales"] = list(tta.scales)
    out = Path(args.out) if args.out else Path(args.weights[0]).with_name("eval.json" if one else "eval_ensemble.json")
    atomic_write_json(out, metrics)
    print_metrics(metrics, vocab.categories, Console())
    console.print(f"metrics written to {escape(str(out))}")
    return 0
