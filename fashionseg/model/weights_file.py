"""The trained-weights file (`model_final.pth`): the one place that writes, reads and checks it.

Format (read with `torch.load(weights_only=True)`):
`{"model": state_dict, "config": {"model": ModelConfig fields, ...the run's other sections},
"categories": [...], "attributes": [...]}` plus optional extras (e.g. `averaged`: the checkpoints
an average was made of). The vocabulary travels inside, so eval/predict rebuild the model and map
contiguous labels back to source ids without the shards. The trainer, `fashionseg average`, eval,
predict and the tests all go through `save_weights` / `read_weights` / `load_model`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fashionseg.io import atomic_open
from fashionseg.model.build import REMOVED_KEYS, ModelConfig, build_model
from fashionseg.model.fold import fold_batchnorm
from fashionseg.names import FINAL_WEIGHTS

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("model", "config", "categories", "attributes")


class WeightsError(ValueError):
    """A weights file that cannot be turned into a model (the message names the file and key)."""


@dataclass
class WeightsFile:
    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    categories: list[dict]
    attributes: list[dict]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config": self.config, "categories": list(self.categories),
                "attributes": list(self.attributes), **self.extra}


def save_weights(path: str | os.PathLike, weights: WeightsFile) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in weights.model.items()}
    with atomic_open(path, "wb") as f:
        torch.save({**weights.to_dict(), "model": state}, f)
    return path


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """The file's parts, checked; WeightsError says what is wrong and what to pass instead."""
    path = Path(path)
    hint = f"pass the {FINAL_WEIGHTS} a training run writes in its --out folder"
    if path.is_dir():
        inside = path / FINAL_WEIGHTS
        raise WeightsError(f"{path}: is a folder, not a weights file; " + (f"pass {inside}" if inside.is_file() else hint))
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file" + ("" if path.parent.exists() else f" (folder {path.parent} does not exist)")
                           + f"; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean the same to the user
        raise WeightsError(f"{path}: cannot read as a torch weights file ({type(e).__name__}: {str(e).splitlines()[0][:120]}); {hint}") from e
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: not a fashionseg checkpoint (a {type(ckpt).__name__}, expected a dict with keys {', '.join(REQUIRED_KEYS)})")
    for key in REQUIRED_KEYS:
        if key not in ckpt:
            keys = list(map(str, ckpt))
            has = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "") if keys else "nothing"
            bare = " (a bare state dict?)" if keys and all(torch.is_tensor(v) for v in ckpt.values()) else ""
            raise WeightsError(f"{path}: not a fashionseg checkpoint: missing key '{key}'{bare}; has {has}. "
                               f"Use the {FINAL_WEIGHTS} a training run writes")
    config = ckpt["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise WeightsError(f"{path}: not a fashionseg checkpoint: missing key 'config.model' (the ModelConfig fields)")
    if not isinstance(ckpt["model"], dict):
        raise WeightsError(f"{path}: 'model' is a {type(ckpt['model']).__name__}, expected a state dict")
    if not isinstance(ckpt["categories"], list) or not isinstance(ckpt["attributes"], list):
        raise WeightsError(f"{path}: 'categories'/'attributes' must be lists (the vocabulary the model was trained with)")
    extra = {k: v for k, v in ckpt.items() if k not in REQUIRED_KEYS}
    return WeightsFile(ckpt["model"], config, ckpt["categories"], ckpt["attributes"], extra)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, fold: bool = True):
    """`model_final.pth` -> (model in eval mode on `device`, WeightsFile, ModelConfig).

    fold=True (eval/predict) folds BatchNorm into the convolutions (fold.py: same outputs within
    1e-4, faster); the model is then inference-only. Keys of `REMOVED_KEYS` (the model's old
    resize settings, now the data layer's) are dropped from older files, not refused.
    """
    path = Path(path)
    wf = read_weights(path)
    config = wf.config
    saved = {k: v for k, v in config["model"].items() if k not in REMOVED_KEYS}
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise WeightsError(f"{path}: config.model has keys this fashionseg does not know: {unknown} (written by a newer version?)")
    num_classes, num_attributes = len(wf.categories) + 1, len(wf.attributes)
    # pretrained weights are already in the state dict; never load (or look for) them again
    try:
        model_cfg = ModelConfig(**{**saved, "pretrained": None})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: config.model is invalid ({e})") from e
    model = build_model(model_cfg, num_classes=num_classes, num_attributes=num_attributes)
    own = model.state_dict()
    what = f"a {model_cfg.backbone} model with {num_classes - 1} categories / {num_attributes} attributes"
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in wf.model.items()
             if k in own and torch.is_tensor(v) and v.shape != own[k].shape]
    if wrong:
        raise WeightsError(f"{path}: weights do not fit {what} (file vs model): {'; '.join(wrong[:3])}"
                           f"{'...' if len(wrong) > 3 else ''}; the vocabulary in the file must be the one it was trained with")
    result = model.load_state_dict(wf.model, strict=False)
    # trained from pretrained weights the norm layers were FrozenBatchNorm2d, which has no
    # num_batches_tracked buffer; BatchNorm2d in eval mode computes the same function
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not fit {what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model_cfg.pretrained = saved.get("pretrained")
    model.to(device).eval()
    if fold:
        log.debug("%s: folded %d BatchNorm layers into their convolutions", path, fold_batchnorm(model))
    return model, wf, model_cfg
