"""Pretrained weights from local files only, mapped onto the fashion model.

Nothing is downloaded at run time (training hosts are often offline, and a silent download on
every rank is worse): torchvision builders get weights=None and the state dict is loaded here.
`pretrained` may be
- a path to a .pth/.pt file: a COCO Mask R-CNN / Faster R-CNN state dict (torchvision keys), an
  ImageNet classifier (ResNet / MobileNetV3 keys), or a fashionseg checkpoint holding one under
  "model" / "state_dict";
- "coco" or "imagenet": the torchvision weights for the configured backbone (see COCO_WEIGHTS /
  IMAGENET_WEIGHTS), looked up in the torch hub cache;
- a torchvision weights name ("MaskRCNN_ResNet50_FPN_Weights.COCO_V1"), looked up in the torch
  hub cache at `torch.hub.get_dir()/checkpoints/<file name of its .url>`.
A missing hub file raises WeightsNotFoundError with the exact command to fetch it elsewhere.

Mapping: tensors whose name and shape match are copied; class-specific layers (box classifier,
box regressor, mask logits) and any other tensor whose shape differs keep their fresh
initialisation (COCO's 91 classes -> fashion's 47); the outcome is one line (`LoadReport`).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

COCO_WEIGHTS = {
    "resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
    "resnet50_fpn_v2": "MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
    "mobilenet_v3_large_fpn": "FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1",  # no mask head: kept fresh
}
IMAGENET_WEIGHTS = {
    "resnet50_fpn": "ResNet50_Weights.IMAGENET1K_V1",  # what torchvision's Mask R-CNN builders use
    "resnet50_fpn_v2": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet18_fpn": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34_fpn": "ResNet34_Weights.IMAGENET1K_V1",
    "mobilenet_v3_large_fpn": "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
}
CLASS_SPECIFIC = (
    "roi_heads.box_predictor.cls_score.",
    "roi_heads.box_predictor.bbox_pred.",
    "roi_heads.mask_predictor.mask_fcn_logits.",
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsNotFoundError(FileNotFoundError):
    pass


@dataclass
class LoadReport:
    source: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # shape differs: kept fresh
    new: list[str] = field(default_factory=list)  # in the model, not in the file
    unused: list[str] = field(default_factory=list)  # in the file, not in the model
    classes: tuple[int, int] | None = None  # (file, model) class counts when they differ

    def __str__(self) -> str:
        parts = [f"pretrained: loaded {len(self.loaded)} tensors from {self.source} ({self.kind})"]
        cls = [n for n in self.reinitialised if n.startswith(CLASS_SPECIFIC)]
        other = [n for n in self.reinitialised if n not in cls]
        if cls:
            change = f" ({self.classes[0]} -> {self.classes[1]} classes)" if self.classes else ""
            parts.append(f"re-initialised {len(cls)} class-specific{change}: {', '.join(cls)}")
        if other:
            parts.append(f"re-initialised {len(other)} with other shapes: {', '.join(other)}")
        if self.new:
            parts.append(f"{len(self.new)} not in the file kept their initialisation ({_modules(self.new)})")
        if self.unused:
            parts.append(f"{len(self.unused)} unused from the file ({_modules(self.unused)})")
        return "; ".join(parts)


def _modules(names: list[str], depth: int = 2) -> str:
    """Compact summary: ['roi_heads.attribute_head.fc.weight', ...] -> 'roi_heads.attribute_head x4'."""
    counts = Counter(".".join(n.split(".")[:depth]) for n in names)
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


# -- locating -------------------------------------------------------------------------------------
def hub_checkpoint_path(weights_name: str) -> tuple[Path, str]:
    """(path in the local torch hub cache, download URL) for a torchvision weights name."""
    from torchvision.models import get_weight

    url = get_weight(weights_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


def fetch_instructions(weights_name: str) -> str:
    path, url = hub_checkpoint_path(weights_name)
    return (
        f"pretrained weights {weights_name} are not in the torch hub cache: expected {path} "
        f"(nothing is downloaded at run time). On a machine with internet access run either\n"
        f"  python -c \"import torchvision; torchvision.models.get_weight('{weights_name}').get_state_dict()\"\n"
        f"    (it saves ~/.cache/torch/hub/checkpoints/{path.name} there), or\n"
        f"  curl -L -o {path.name} {url}\n"
        f"then copy the file to {path} on this machine (TORCH_HOME moves the hub directory), "
        f"or set model.pretrained to the file's path."
    )


def resolve_pretrained(pretrained: str, backbone: str) -> tuple[Path, str]:
    """(local file, how it was named) for a path, 'coco'/'imagenet', or a torchvision weights name."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path, str(path)
    alias = pretrained.strip().lower()
    if alias in ("coco", "imagenet"):
        table = COCO_WEIGHTS if alias == "coco" else IMAGENET_WEIGHTS
        if backbone not in table:
            raise ValueError(f"model.pretrained: torchvision has no {alias.upper()} weights for {backbone}; "
                             f"use 'imagenet' or a local file")
        name = table[backbone]
    else:
        name = pretrained
    try:
        hub_path, _ = hub_checkpoint_path(name)
    except (ValueError, KeyError, AttributeError):
        raise WeightsNotFoundError(
            f"model.pretrained: {pretrained!r} is neither a file nor a torchvision weights name "
            f"(like 'MaskRCNN_ResNet50_FPN_Weights.COCO_V1'), nor 'coco' / 'imagenet'"
        ) from None
    if not hub_path.is_file():
        raise WeightsNotFoundError(fetch_instructions(name))
    return hub_path, f"{name} ({hub_path})"


# -- reading ---------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A plain {name: tensor} dict from a file, with weights_only=True; wrappers' prefixes removed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle of arbitrary objects, truncated file, not a torch file
        raise ValueError(f"{path}: cannot be read as a state dict with torch.load(weights_only=True): {e}") from e
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors (top-level keys: {list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        for prefix in _WRAPPER_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# -- mapping --------------------------------------------------------------------------------------
def detect_kind(state: dict[str, Tensor]) -> str:
    """'maskrcnn' for detection checkpoints (backbone./rpn./roi_heads. keys), else 'backbone'."""
    return "maskrcnn" if any(k.startswith(("backbone.body.", "rpn.", "roi_heads.")) for k in state) else "backbone"


def _backbone_key(k: str) -> str:
    """ImageNet classifier key -> detection key ('layer1.0.conv1.weight', 'features.3.block...')."""
    for prefix in ("backbone.body.", "features."):
        if k.startswith(prefix):
            k = k[len(prefix):]
            break
    return "backbone.body." + k


def load_pretrained(model: nn.Module, pretrained: str, kind: str = "auto", backbone: str = "resnet50_fpn") -> LoadReport:
    """Copy matching tensors from `pretrained` into `model` (unwrapped); returns what happened (str(): one line)."""
    path, source = resolve_pretrained(pretrained, backbone)
    state = load_state_dict_file(path)
    if kind == "auto":
        kind = detect_kind(state)
    origin = {k: k for k in state}  # model key -> the file's key, for the report
    if kind == "backbone":
        origin = {_backbone_key(k): k for k in state}
        state = {_backbone_key(k): v for k, v in state.items()}
    elif kind != "maskrcnn":
        raise ValueError(f"pretrained_kind must be auto, maskrcnn or backbone, got {kind!r}")

    own = model.state_dict()
    report = LoadReport(source=source, kind=kind)
    merged = {}
    for k, v in state.items():
        if k not in own:
            if not k.endswith("num_batches_tracked"):  # BatchNorm vs FrozenBatchNorm2d: no meaning
                report.unused.append(origin[k])
        elif own[k].shape != v.shape:
            report.reinitialised.append(k)
        else:
            merged[k] = v
            report.loaded.append(k)
    report.new = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if kind == "backbone":  # everything outside the body is expected to be fresh: report the body only
        report.new = [k for k in report.new if k.startswith("backbone.body.")]
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if cls_key in state and cls_key in own and state[cls_key].shape[0] != own[cls_key].shape[0]:
        report.classes = (state[cls_key].shape[0], own[cls_key].shape[0])
    if not merged:
        raise ValueError(f"{source}: no tensor matches the {backbone} model by name and shape "
                         f"(kind={kind}); is it a checkpoint for another backbone?")
    model.load_state_dict(merged, strict=False)
    return report
