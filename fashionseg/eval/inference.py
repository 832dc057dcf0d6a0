"""Run a model over images: weights loading, decoding, model outputs -> COCO results, rank split.

Model outputs (docs/design.md) come back on the grid of the image the model was given; a result
is RLE-encoded on the grid the caller names (`out_size`): the stored image's own grid for
evaluation against shard ground truth, the original (pre-resize) grid for predict/submission.
Mask probabilities are resized to that grid (bilinear) before they are binarised, so a mask is
cut at `mask_thresh` only once. Binarisation is `prob > mask_thresh`, as `binarize_masks` in
model/build.py and torchvision do.

Distributed evaluation: rank r takes the samples whose split index i has i % world_size == r
(every sample exactly once, no padding: a training loader that evens out step counts would
duplicate or drop samples), and the per-rank results are gathered on rank 0 with
`torch.distributed.gather_object` (which accelerate also runs on). Images go through the model
in same-size groups (forward_by_shape), so a detection does not depend on the batch size or on
the number of processes: a distributed evaluation gives the single process's numbers.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fashionseg.data.rle import encode_coco_many
from fashionseg.data.vocab import Vocab, VocabError

from fashionseg.model.weights_file import WeightsError, load_model  # noqa: E402  (re-exported)


# -- weights ------------------------------------------------------------------------------------
def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """`model_final.pth` -> (model in eval mode on `device`, Vocab, ModelConfig)."""
    model, wf, model_cfg = load_model(path, device)
    try:
        vocab = Vocab(list(wf.categories), list(wf.attributes))
    except (VocabError, TypeError) as e:
        raise WeightsError(f"{path}: bad 'categories'/'attributes' vocabulary ({e})") from e
    return model, vocab, model_cfg


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


# -- images -------------------------------------------------------------------------------------
def decode_image(data: bytes | str | os.PathLike, name: str = "") -> torch.Tensor:
    """JPEG/PNG bytes or a file path -> float32 [3, H, W] in 0..1 (greyscale/CMYK made RGB).

    torchvision's decoder first, as the training transforms (data/transforms.py) use, so eval
    sees the pixels training saw; PIL for what it cannot read. The pixel grid is the file's own
    (no EXIF rotation), the grid Kaggle's Height/Width use."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    raw = data if isinstance(data, (bytes, bytearray)) else None
    where = (name or str(data)) if raw is None else (name or "image")
    try:
        if raw is None:
            raw = Path(data).read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read the image ({e.strerror or e})") from e
    if len(raw) == 0:
        raise ValueError(f"{where}: empty file (0 bytes), not an image")
    try:
        img = tv_decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        try:
            pil = Image.open(io.BytesIO(raw))
            pil.load()  # truncated data fails here, not later
            pil = pil.convert("RGB")
        except Image.UnidentifiedImageError:
            raise ValueError(f"{where}: not an image format PIL or torchvision can read ({len(raw)} bytes)") from None
        except Exception as e:
            raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from e
        img = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)
    # 16-bit PNGs decode to uint16: scale by that type's range, not 255
    return img.float().div_(float(torch.iinfo(img.dtype).max))


def forward_by_shape(net: torch.nn.Module, images: list[torch.Tensor]) -> list[dict]:
    """`net(images)`, one call per image size, outputs in input order.

    torchvision pads a batch to its largest image, and the padding changes the features near
    the border: the same image gave different detections depending on its batch partners, so
    `--batch-size` and the number of eval processes (which decides who shares a batch) moved
    the metrics. Same-size images pad alike, so this equals running the images one by one."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    if len(groups) <= 1:
        return net(images)
    out: list = [None] * len(images)
    for idx in groups.values():
        for i, o in zip(idx, net([images[i] for i in idx])):
            out[i] = o
    return out


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
def iter_rank_samples(shard_dir, split: str, rank: int = 0, world_size: int = 1,
                      max_images: int | None = None) -> Iterator[tuple[int, str, bytes, dict]]:
    """(split index, key, jpg bytes, sample JSON) of the samples this rank owns (index % world == rank)."""
    from fashionseg.data.shards.reader import iter_split

    for index, (key, jpg, meta) in enumerate(iter_split(shard_dir, split)):
        if max_images is not None and index >= max_images:
            return
        if index % world_size == rank:
            yield index, key, jpg, meta


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
