"""Run a model over images: weights loading, the test scale, model outputs -> COCO results, rank split.

Images come from the data layer (`fashionseg.data.eval_source`): uint8 [3, h, w] at the test
scale, resized by the very code training uses. The model is asked for its outputs on the grid
results are scored on (`forward_by_shape(net, images, out_sizes)`): the original image for eval/predict by
default, the stored shard image with `--grid stored`. A model with contract 3
(`model(images, output_sizes=...)`) pastes its 28x28 mask probabilities directly at that size;
for an older model the probabilities come back on the input grid and `outputs_to_results`
resizes them (bilinear) before it cuts them at `mask_thresh` (`prob > mask_thresh`, as
torchvision), so a mask is binarised once.

Distributed evaluation: rank r takes the samples whose split index i has i % world_size == r
(every sample exactly once, no padding), and the per-rank results are gathered on rank 0 with
`torch.distributed.gather_object` (which accelerate also runs on). Images go through the model
in same-size groups (forward_by_shape), so a detection does not depend on the batch size or on
the number of processes: a distributed evaluation gives the single process's numbers.
"""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fashionseg.data.rle import encode_coco_many
from fashionseg.data.vocab import Vocab, VocabError

from fashionseg.model.weights_file import WeightsError, load_model  # noqa: E402  (re-exported)


# -- weights ------------------------------------------------------------------------------------
class Loaded(NamedTuple):
    model: torch.nn.Module
    vocab: Vocab
    model_cfg: Any
    config: dict  # the run's whole config as saved (sections "data", "model", ...)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> Loaded:
    """`model_final.pth` -> Loaded(model in eval mode on `device`, Vocab, ModelConfig, run config)."""
    model, wf, model_cfg = load_model(path, device)
    try:
        vocab = Vocab(list(wf.categories), list(wf.attributes))
    except (VocabError, TypeError) as e:
        raise WeightsError(f"{path}: bad 'categories'/'attributes' vocabulary ({e})") from e
    return Loaded(model, vocab, model_cfg, dict(wf.config))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """`model_final.pth` -> (model in eval mode on `device`, Vocab, ModelConfig)."""
    return load_for_inference(path, device)[:3]


def inference_scale(config: dict, test_size: int | None = None, max_size: int | None = None) -> tuple[int, int]:
    """(shorter side, longer-side cap) of test images: the flags, else the run's `data.test_size`
    (None: the largest `data.min_size`) and `data.max_size`, else an older file's model keys."""
    data, model = config.get("data") or {}, config.get("model") or {}
    if test_size is None:
        test_size = data.get("test_size")
    if test_size is None:
        sizes = data.get("min_size") or model.get("min_size") or [800]
        test_size = max(sizes) if isinstance(sizes, (list, tuple)) else sizes
    if max_size is None:
        max_size = data.get("max_size") or model.get("max_size") or 1333
    if int(test_size) < 1 or int(max_size) < 1:
        raise ValueError(f"test size {test_size} / max size {max_size} must be >= 1")
    return int(test_size), int(max_size)


def add_scale_arguments(p) -> None:
    """--test-size / --max-size, shared by eval, predict and tune-thresholds."""
    p.add_argument("--test-size", type=int, default=None,
                   help="shorter side of test images (default: the weights' data.test_size, else max data.min_size)")
    p.add_argument("--max-size", type=int, default=None, help="longer-side cap (default: the weights' data.max_size)")


# -- post-processing ------------------------------------------------------------------------------
POSTPROCESS_KEYS = ("score_thresh", "nms_thresh", "mask_thresh")


def add_postprocess_arguments(p) -> None:
    """--config / --score-thresh / --nms-thresh / --mask-thresh, shared by eval and predict."""
    p.add_argument("--config", default=None,
                   help="YAML whose model: score_thresh / nms_thresh / mask_thresh replace the checkpoint's "
                        "(e.g. the file `fashionseg tune-thresholds` writes)")
    p.add_argument("--score-thresh", type=float, default=None, help="default: --config's, else the checkpoint's")
    p.add_argument("--nms-thresh", type=float, default=None, help="default: --config's, else the checkpoint's")
    p.add_argument("--mask-thresh", type=float, default=None, help="default: --config's, else the checkpoint's")


def apply_postprocess(model, model_cfg, args) -> dict[str, float]:
    """Set the model's score/NMS thresholds from flags > --config YAML > checkpoint; returns all three.

    The mask threshold is not a model setting at inference here (results are cut by
    outputs_to_results): callers pass the returned `mask_thresh` on."""
    from fashionseg.model.build import set_postprocess

    chosen = {k: float(getattr(model_cfg, k)) for k in POSTPROCESS_KEYS}
    if getattr(args, "config", None):
        import yaml

        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{args.config}: cannot read the config ({e})") from e
        model_section = cfg.get("model") if isinstance(cfg, dict) else None
        if not isinstance(model_section, dict):
            raise ValueError(f"{args.config}: no 'model:' mapping (expected model.score_thresh / nms_thresh / mask_thresh)")
        for k in POSTPROCESS_KEYS:
            if model_section.get(k) is not None:
                try:
                    chosen[k] = float(model_section[k])
                except (TypeError, ValueError):
                    raise ValueError(f"{args.config}: model.{k} must be a number, got {model_section[k]!r}") from None
    for k in POSTPROCESS_KEYS:
        if getattr(args, k, None) is not None:
            chosen[k] = float(getattr(args, k))
    for k, v in chosen.items():
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{k} must lie in [0, 1], got {v}")
    set_postprocess(model, score_thresh=chosen["score_thresh"], nms_thresh=chosen["nms_thresh"])
    return chosen


def check_same_vocab(model_vocab: Vocab, data_vocab: Vocab, where: str) -> None:
    """Category/attribute ids of a model and a dataset must agree, or every score is garbage."""
    for kind in ("categories", "attributes"):
        a = [c["id"] for c in getattr(model_vocab, kind)]
        b = [c["id"] for c in getattr(data_vocab, kind)]
        if a != b:
            raise WeightsError(f"{where}: the model's {kind} ({len(a)} ids) differ from the data's ({len(b)} ids); "
                               "evaluate with shards built from the same label_descriptions.json")


# -- model -------------------------------------------------------------------------------------
def takes_output_sizes(net: torch.nn.Module) -> bool:
    """Contract 3: the model pastes its outputs at requested sizes and takes uint8 images."""
    return "output_sizes" in inspect.signature(net.forward).parameters


def forward_by_shape(net: torch.nn.Module, images: list[torch.Tensor], out_sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """The model's outputs for uint8 `images`, one call per image size, in input order; on
    `out_sizes` for a model with contract 3, else on the input grid (outputs_to_results resizes).

    torchvision pads a batch to its largest image, and the padding changes the features near
    the border: the same image gave different detections depending on its batch partners, so
    `--batch-size` and the number of eval processes (which decides who shares a batch) moved
    the metrics. Same-size images pad alike, so this equals running the images one by one."""
    native = takes_output_sizes(net)

    def call(idx: list[int]) -> list[dict]:
        batch = [images[i] for i in idx]
        if native:
            return net(batch, output_sizes=None if out_sizes is None else [tuple(out_sizes[i]) for i in idx])
        t = getattr(net, "transform", None)
        if t is not None and hasattr(t, "min_size"):  # an older model resizes itself: make that the identity
            h, w = batch[0].shape[-2:]
            saved = (t.min_size, t.max_size)
            t.min_size, t.max_size = (min(h, w),), max(h, w)
            try:
                return net([im.float() / 255 if im.dtype == torch.uint8 else im for im in batch])
            finally:
                t.min_size, t.max_size = saved
        return net([im.float() / 255 if im.dtype == torch.uint8 else im for im in batch])

    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    out: list = [None] * len(images)
    for idx in groups.values():
        for i, o in zip(idx, call(idx)):
            out[i] = o
    return out


def output_on_grid(out: dict, size: tuple[int, int]) -> dict:
    """An output whose masks lie on another grid (older models) -> boxes and mask probabilities
    on `size` (bilinear), for callers that need the probabilities themselves (TTA, tuning)."""
    masks = out["masks"]
    h, w = masks.shape[-2:]
    if len(masks) == 0:
        return {**out, "masks": masks.new_zeros((0, 1, *size))}
    if (h, w) == tuple(size):
        return out
    scale = out["boxes"].new_tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    probs = F.interpolate(masks.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return {**out, "boxes": out["boxes"] * scale, "masks": probs}


# -- outputs -> results -------------------------------------------------------------------------
def _to_grid(output: dict, mask_thresh: float, out_size: tuple[int, int] | None,
             chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes, binary masks uint8 [N, H, W]) on `out_size`, resizing probabilities first."""
    probs, boxes = output["masks"], output["boxes"].float()
    n, _, h, w = probs.shape if probs.dim() == 4 else (0, 1, 0, 0)
    H, W = out_size if out_size is not None else (h, w)
    if n == 0:
        return boxes.reshape(0, 4), torch.zeros((0, H, W), dtype=torch.uint8)
    if (H, W) == (h, w):
        return boxes, (probs[:, 0] > mask_thresh).to(torch.uint8)
    scale = boxes.new_tensor([W / w, H / h, W / w, H / h])
    out = torch.empty((n, H, W), dtype=torch.uint8)
    for i in range(0, n, chunk):
        p = F.interpolate(probs[i : i + chunk].float(), size=(H, W), mode="bilinear", align_corners=False)
        out[i : i + chunk] = (p[:, 0] > mask_thresh).to(torch.uint8).cpu()
    return boxes * scale, out


def outputs_to_results(output: dict, image_id: int, vocab: Vocab, *, mask_thresh: float, attr_thresh: float = 0.5,
                       out_size: tuple[int, int] | None = None, image_key: str | None = None) -> list[dict]:
    """One image's model output -> COCO result dicts (source category/attribute ids).

    `attribute_ids` are the attributes with sigmoid score >= attr_thresh, highest first, with
    their scores in `attribute_scores`; masks and boxes are on `out_size` (default: as given)."""
    output = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in output.items()}
    boxes, masks = _to_grid(output, mask_thresh, out_size)
    rles = encode_coco_many(masks.numpy())
    labels = output["labels"].tolist()
    scores = output["scores"].float().tolist()
    attr = output.get("attribute_scores")
    attr = attr.float().numpy() if attr is not None else np.zeros((len(labels), 0), np.float32)
    results = []
    for i, (label, score) in enumerate(zip(labels, scores)):
        x0, y0, x1, y1 = boxes[i].tolist()
        order = np.argsort(-attr[i], kind="stable")
        keep = [j for j in order.tolist() if attr[i, j] >= attr_thresh]
        r = {"image_id": int(image_id), "category_id": vocab.category_id(int(label)), "score": float(score),
             "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rles[i],
             "attribute_ids": [vocab.attribute_id(j) for j in keep],
             "attribute_scores": [round(float(attr[i, j]), 5) for j in keep]}
        if image_key is not None:
            r["image_key"] = image_key
        results.append(r)
    return results


# -- distributed --------------------------------------------------------------------------------
def rank_and_world(accelerator: Any = None) -> tuple[int, int]:
    """(rank, world size) of the process group the gathers below run on.

    torch.distributed's own answer when it is initialised: an Accelerator made without
    `cpu=True` on a machine without a GPU reports one process although `accelerate launch
    --multi_gpu` has initialised a group of several, and every rank would then score the
    whole split on its own."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    return 0, 1


def gather_to_main(obj: Any, accelerator: Any = None) -> list | None:
    """Every rank's `obj` as a list (rank order) on rank 0; None on the other ranks."""
    rank, world = rank_and_world(accelerator)
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, accelerator: Any = None) -> Any:
    """Rank 0's `obj` on every rank (so every rank takes the same decision on the metrics)."""
    _, world = rank_and_world(accelerator)
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# -- iteration ----------------------------------------------------------------------------------
def batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def split_size(shard_dir, split: str, max_images: int | None = None) -> int:
    from fashionseg.data.shards.reader import read_manifest

    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        from fashionseg.data.shards.manifest import ManifestError

        raise ManifestError(f"{shard_dir}: no split '{split}' (has {', '.join(manifest['splits'])})")
    n = int(manifest["splits"][split]["num_samples"])
    return n if max_images is None else min(n, max_images)


def rank_share(n: int, rank: int, world: int) -> int:
    return len(range(rank, n, world))


def images_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.inf
