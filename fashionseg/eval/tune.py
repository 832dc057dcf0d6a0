"""`fashionseg tune-thresholds`: search score threshold, NMS IoU and mask threshold on val.

The model runs over the split ONCE with loose post-processing (score > min of the score grid,
no NMS (IoU 1.0), up to --cache-dets detections per image) and every candidate is re-applied to
those cached detections: score filter (`score > s`, torchvision's rule), per-class NMS at `n`
(torchvision's batched_nms), the first `detections_per_img` by score, masks cut at `m`. Mask
probabilities are cached as float16 crops around their non-zero support (exact: outside it the
pasted mask is 0). This equals re-running the model with (s, n) except that detections beyond
--cache-dets before NMS are lost (torchvision keeps at most detections_per_img after NMS).

The grid is searched exhaustively for the chosen metric: `segm` (COCO mask AP), `bbox`, or
`iou_f1` (Fashionpedia AP^{IoU+F1}). The best values are written to the `model:` section
(score_thresh, nms_thresh, mask_thresh) of a config YAML, atomically; the other keys stay.
`fashionseg eval/predict --config THAT.yaml` apply them to a weights file; a training run
started from it bakes them into its model_final.pth.
"""
from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

from fashionseg.data.rle import encode_coco
from fashionseg.data.vocab import Vocab
from fashionseg.eval import coco as coco_lib
from fashionseg.eval import inference as inf

METRICS = ("segm", "bbox", "iou_f1")
DEFAULT_SCORES = (0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_NMS = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_MASKS = (0.3, 0.4, 0.5, 0.6)


class CachedImage:
    """One image's loose detections: boxes/labels/scores/attributes + mask probability crops."""

    def __init__(self, image_id: int, out: dict, size: tuple[int, int]):
        self.image_id, self.size = image_id, size
        self.boxes = out["boxes"].float().cpu()
        self.labels = out["labels"].cpu()
        self.scores = out["scores"].float().cpu()
        self.attr = out["attribute_scores"].float().cpu().numpy()
        self.crops = []
        probs = out["masks"][:, 0].float().cpu()
        for p in probs:
            nz = torch.nonzero(p > 0)
            if len(nz) == 0:
                self.crops.append((0, 0, np.zeros((0, 0), np.float16)))
                continue
            (y0, x0), (y1, x1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
            self.crops.append((y0, x0, p[y0 : y1 + 1, x0 : x1 + 1].numpy().astype(np.float16)))
        self._rle: dict = {}

    def rle(self, i: int, mask_thresh: float) -> dict:
        key = (i, mask_thresh)
        if key not in self._rle:
            m = np.zeros(self.size, np.uint8)
            y0, x0, crop = self.crops[i]
            m[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop.astype(np.float32) > mask_thresh
            self._rle[key] = encode_coco(m)
        return self._rle[key]

    def results(self, vocab: Vocab, score: float, nms: float, max_dets: int, mask_thresh: float,
                attr_thresh: float) -> list[dict]:
        keep = torch.nonzero(self.scores > score).flatten()
        if len(keep):
            kept = batched_nms(self.boxes[keep], self.scores[keep], self.labels[keep], nms)
            keep = keep[kept[:max_dets]]
        out = []
        for i in keep.tolist():
            x0, y0, x1, y1 = self.boxes[i].tolist()
            attrs = [j for j in np.argsort(-self.attr[i], kind="stable").tolist() if self.attr[i, j] >= attr_thresh]
            out.append({"image_id": self.image_id, "category_id": vocab.category_id(int(self.labels[i])),
                        "score": float(self.scores[i]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "segmentation": self.rle(i, mask_thresh), "attribute_ids": [vocab.attribute_id(j) for j in attrs]})
        return out


@torch.no_grad()
def cache_split(model, shard_dir, split: str, vocab: Vocab, *, min_score: float, cache_dets: int, batch_size: int,
                device, test_size: int, max_size: int, grid: str = "original", max_images: int | None = None,
                progress: bool = True) -> tuple[dict, list[CachedImage]]:
    """Run the model once with loose post-processing -> (GT dict, cached detections per image),
    through the data layer as `eval` does (same test resize, same grid, the source's image ids)."""
    from fashionseg.data.eval_source import ground_truth, iter_eval_samples
    from fashionseg.eval.evaluate import progress_bar
    from fashionseg.model.build import set_postprocess, unwrap

    net = unwrap(model).eval()
    rh = net.roi_heads
    saved = (rh.score_thresh, rh.nms_thresh, rh.detections_per_img)
    set_postprocess(net, score_thresh=min_score, nms_thresh=1.0, detections_per_img=cache_dets)
    cache = []
    try:
        total = inf.split_size(shard_dir, split, max_images)
        samples = iter_eval_samples(shard_dir, split, test_size=test_size, max_size=max_size, max_images=max_images)
        with progress_bar(progress, f"cache {split}", total) as advance:
            for batch in inf.batched(samples, batch_size):
                sizes = [s.original_size if grid == "original" else s.stored_size for s in batch]
                outs = inf.forward_by_shape(net, [s.image.to(device) for s in batch], sizes)
                for s, out, size in zip(batch, outs, sizes):
                    out = inf.output_on_grid({k: v.cpu() for k, v in out.items()}, size)
                    cache.append(CachedImage(s.image_id, out, size))
                advance(len(batch))
    finally:
        set_postprocess(net, score_thresh=saved[0], nms_thresh=saved[1], detections_per_img=saved[2])
    return ground_truth(shard_dir, split, grid=grid, max_images=max_images), cache


def metric_of(gt_coco, results: list[dict], metric: str) -> float:
    if metric == "iou_f1":
        from fashionseg.eval.fashionpedia import fashionpedia_evaluate

        v = fashionpedia_evaluate(gt_coco, coco_lib.segm_results(results), "segm", per_category=False)["iou_f1"]["AP"]
    else:
        v = coco_lib.coco_evaluate(gt_coco, coco_lib.segm_results(results) if metric == "segm" else results, metric)["AP"]
    return -1.0 if v is None else float(v)


def search(gt: dict, cache: list[CachedImage], vocab: Vocab, *, metric: str, scores, nms_values, mask_values,
           max_dets: int, attr_thresh: float = 0.5, progress: bool = True) -> list[dict]:
    """Every (score, nms, mask) candidate's metric, best first."""
    from fashionseg.eval.evaluate import progress_bar

    gt_coco = coco_lib.coco_from_dict(gt)
    trials = []
    grid = list(itertools.product(scores, nms_values, mask_values))
    with progress_bar(progress, f"search {metric}", len(grid), unit="trial") as advance:
        for s, n, m in grid:
            results = [r for c in cache for r in c.results(vocab, s, n, max_dets, m, attr_thresh)]
            trials.append({"score_thresh": s, "nms_thresh": n, "mask_thresh": m, "metric": metric,
                           "value": metric_of(gt_coco, results, metric), "detections": len(results)})
            advance(1)
    # best first; ties go to the higher score threshold (fewer detections, faster)
    return sorted(trials, key=lambda t: (-t["value"], -t["score_thresh"], t["nms_thresh"], t["mask_thresh"]))


def write_config(path: str | Path, base: dict, best: dict) -> dict:
    """`base` config with model.score_thresh/nms_thresh/mask_thresh set to `best`, written atomically."""
    import yaml

    from fashionseg.io import atomic_write_text

    cfg = dict(base)
    model = dict(cfg.get("model") or {})
    for k in ("score_thresh", "nms_thresh", "mask_thresh"):
        model[k] = float(best[k])
    cfg["model"] = model
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0.0 <= v <= 1.0 for v in vals):
        raise argparse.ArgumentTypeError(f"values must lie in [0, 1], got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="model_final.pth written by `fashionseg train`")
    p.add_argument("--shards", required=True, help="shard folder (with manifest.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--metric", choices=METRICS, default="segm", help="what to maximise (default: segm AP)")
    p.add_argument("--config", default=None, help="YAML to update (default: the checkpoint's own config)")
    p.add_argument("--out", default=None, help="YAML to write (default: --config in place, or tuned.yaml beside the weights)")
    p.add_argument("--scores", type=_floats, default=DEFAULT_SCORES, help="score thresholds, comma-separated")
    p.add_argument("--nms", type=_floats, default=DEFAULT_NMS, help="NMS IoU thresholds, comma-separated")
    p.add_argument("--masks", type=_floats, default=DEFAULT_MASKS, help="mask thresholds, comma-separated")
    p.add_argument("--cache-dets", type=int, default=300, help="detections per image kept before NMS")
    p.add_argument("--attr-thresh", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--grid", choices=("original", "stored"), default="original", help="as `fashionseg eval --grid`")
    inf.add_scale_arguments(p)


def run(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fashionseg.data.shards.manifest import ManifestError
    from fashionseg.data.shards.reader import ShardError, read_manifest
    from fashionseg.io import atomic_write_json

    console = Console(stderr=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        base = None
        if args.config:
            try:
                base = yaml.safe_load(Path(args.config).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"{args.config}: cannot read the config ({e})") from e
            if not isinstance(base, dict):
                raise ValueError(f"{args.config}: not a YAML mapping")
        model, vocab, model_cfg, config = inf.load_for_inference(args.weights, device)
        test_size, max_size = inf.inference_scale(config, args.test_size, args.max_size)
        if base is None:
            base = dict(config)
        inf.check_same_vocab(vocab, Vocab.from_dict(read_manifest(args.shards)), str(args.shards))
        t0 = time.perf_counter()
        gt, cache = cache_split(model, args.shards, args.split, vocab, min_score=min(args.scores),
                                cache_dets=args.cache_dets, batch_size=args.batch_size, device=device,
                                test_size=test_size, max_size=max_size, grid=args.grid,
                                max_images=args.max_images, progress=not args.no_progress)
        trials = search(gt, cache, vocab, metric=args.metric, scores=args.scores, nms_values=args.nms,
                        mask_values=args.masks, max_dets=model_cfg.detections_per_img, attr_thresh=args.attr_thresh,
                        progress=not args.no_progress)
    except (inf.WeightsError, ManifestError, ShardError, coco_lib.EvalDataError, ValueError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        return 1
    best = trials[0]
    out = Path(args.out or args.config or Path(args.weights).with_name("tuned.yaml"))
    write_config(out, base, best)
    atomic_write_json(out.with_suffix(".trials.json"), trials)
    table = Table(title=f"top candidates by {args.metric} AP ({len(trials)} tried, {time.perf_counter() - t0:.1f} s)")
    for col in ("score_thresh", "nms_thresh", "mask_thresh", "AP", "detections"):
        table.add_column(col, justify="right")
    current = (model_cfg.score_thresh, model_cfg.nms_thresh, model_cfg.mask_thresh)
    for t in trials[:10]:
        table.add_row(f"{t['score_thresh']:g}", f"{t['nms_thresh']:g}", f"{t['mask_thresh']:g}",
                      f"{100 * t['value']:.2f}", str(t["detections"]))
    Console().print(table)
    console.print(f"best {args.metric} AP {100 * best['value']:.2f} at score_thresh={best['score_thresh']:g} "
                  f"nms_thresh={best['nms_thresh']:g} mask_thresh={best['mask_thresh']:g} "
                  f"(was {current[0]:g}/{current[1]:g}/{current[2]:g}); written to {escape(str(out))} (model: section)")
    return 0
