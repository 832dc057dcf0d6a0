"""Several passes over one image merged into one set of detections: test-time augmentation
(`--tta`), several weights files (`--weights A B C`, e.g. the snapshots of a `cosine_restarts`
run), or both (every model x every TTA variant). eval and predict both call `ensemble_outputs`.

Passes: without --tta each model runs once, its outputs on the grid results are scored on (as a
single model's are); with --tta each model runs on the test image rescaled by each of the TTA
scales (antialiased bilinear) and, per scale, also horizontally flipped (flipped back after), all
on the test image's grid.

Merging (`merge_passes`): all passes' detections are pooled and merged per class: the
highest-scoring remaining detection opens a cluster that takes every remaining detection of its
class with box IoU >= the (first) model's nms_thresh. A cluster becomes one detection: score =
(sum over passes of the cluster's best score in that pass) / number of passes (a detection found
by one pass of six keeps a sixth of its score), box = score-weighted mean of the members' boxes,
mask probabilities and attribute scores = mean over members. At most detections_per_img merged
detections are kept. Passes that are identical give back exactly one of them (every cluster is a
detection and its copies, and the weights are normalised before they are summed), so an ensemble
of one file given twice equals that file alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.ops import box_iou

from fashionseg.eval import inference as inf

DEFAULT_TTA_SCALES = (0.8, 1.0, 1.2)


@dataclass(frozen=True)
class TTA:
    scales: tuple[float, ...] = DEFAULT_TTA_SCALES
    hflip: bool = True


def load_ensemble(paths: Sequence[str], device) -> list[inf.Loaded]:
    """Every weights file, loaded; refused when their vocabularies differ (labels are merged by
    their contiguous index, which only means the same class under the same vocabulary)."""
    loaded = [inf.load_for_inference(p, device) for p in paths]
    first = loaded[0].vocab
    for path, other in zip(paths[1:], loaded[1:]):
        for kind in ("categories", "attributes"):
            a, b = getattr(first, kind), getattr(other.vocab, kind)
            if [(c["id"], c.get("name")) for c in a] != [(c["id"], c.get("name")) for c in b]:
                raise inf.WeightsError(f"{paths[0]} and {path} have different {kind} ({len(a)} vs {len(b)}, or other "
                                       "ids/names): an ensemble merges detections by class, so every weights file must "
                                       "come from training on the same label_descriptions.json")
    return loaded


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
        weights = s / s.sum().clamp_min(1e-12)
        merged["boxes"].append(boxes[0] if len(members) == 1 else (boxes * weights[:, None]).sum(0))
        merged["labels"].append(cat["labels"][i])
        merged["masks"].append(cat["masks"][members].float().mean(0))
        merged["attribute_scores"].append(cat["attribute_scores"][members].float().mean(0))
    out = {k: torch.stack(v) for k, v in merged.items()}
    keep = torch.argsort(out["scores"], descending=True, stable=True)[:max_dets]
    return {k: v[keep] for k, v in out.items()}


def _unflip(out: dict, width: int) -> dict:
    b = out["boxes"].clone()
    b[:, 0], b[:, 2] = width - out["boxes"][:, 2], width - out["boxes"][:, 0]
    return {**out, "boxes": b, "masks": out["masks"].flip(-1)}


def _rescale(im: torch.Tensor, s: float) -> torch.Tensor:
    """uint8 [3, h, w] scaled by `s` (antialiased bilinear, the kind of resize the data layer uses)."""
    if s == 1.0:
        return im
    h, w = im.shape[-2:]
    size = (max(8, round(h * s)), max(8, round(w * s)))
    out = torch.nn.functional.interpolate(im[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def tta_passes(net: torch.nn.Module, images: list[torch.Tensor], tta: TTA) -> list[list[dict]]:
    """Per image, one output per TTA variant (scales x flips), on the test images' grid (CPU)."""
    sizes = [tuple(im.shape[-2:]) for im in images]
    per_image: list[list[dict]] = [[] for _ in images]
    for s in tta.scales:
        scaled = [_rescale(im, s) for im in images]
        batch = scaled + ([im.flip(-1) for im in scaled] if tta.hflip else [])
        outs = inf.forward_by_shape(net, batch, sizes + (sizes if tta.hflip else []))
        outs = [inf.output_on_grid({k: v.cpu() for k, v in o.items()}, size) for o, size in zip(outs, sizes + sizes)]
        for i, size in enumerate(sizes):
            per_image[i].append(outs[i])
            if tta.hflip:
                per_image[i].append(_unflip(outs[len(images) + i], size[1]))
    return per_image


def tta_outputs(net: torch.nn.Module, images: list[torch.Tensor], scales=DEFAULT_TTA_SCALES, hflip: bool = True) -> list[dict]:
    """One model's TTA passes, merged per image."""
    return ensemble_outputs([net], images, [tuple(im.shape[-2:]) for im in images], TTA(tuple(scales), hflip))


def ensemble_outputs(nets: Sequence[torch.nn.Module], images: list[torch.Tensor], out_sizes: list[tuple[int, int]],
                     tta: TTA | None = None) -> list[dict]:
    """The detections of every model (x every TTA variant) merged per image (module docstring).

    One model without TTA is exactly `forward_by_shape(net, images, out_sizes)`. Without TTA the
    passes are on `out_sizes`; with TTA on the test images' grid (outputs_to_results resizes)."""
    if len(nets) == 1 and tta is None:
        return inf.forward_by_shape(nets[0], images, out_sizes)
    per_image: list[list[dict]] = [[] for _ in images]
    for net in nets:
        if tta is None:
            outs = inf.forward_by_shape(net, images, out_sizes)
            passes = [[inf.output_on_grid({k: v.cpu() for k, v in o.items()}, size)] for o, size in zip(outs, out_sizes)]
        else:
            passes = tta_passes(net, images, tta)
        for mine, theirs in zip(per_image, passes):
            mine += theirs
    rh = nets[0].roi_heads
    return [merge_passes(p, rh.nms_thresh, rh.detections_per_img) for p in per_image]
