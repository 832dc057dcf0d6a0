"""Fashionpedia's attribute head: multi-label attributes per instance, on the box head's features.

Attribute-Mask R-CNN (Fashionpedia) classifies attributes from the same RoI representation the
box classifier uses. `AttributeRoIHeads` is torchvision's RoIHeads plus that branch, following
the mask branch exactly: in training it takes the positive sampled proposals and their matched
ground truth (the proposals/matched indices torchvision's own sampling produced, kept by
`select_training_samples`); at inference it re-pools the final detections' boxes. Features are
`box_head(box_roi_pool(...))`, so the box head (TwoMLPHead / ConvFC head) is shared and learns
from the attribute loss too; `AttributeHead` is a small MLP on top of it.

Losses (over positive RoIs x attributes, computed in fp32):
- "focal": sigmoid focal loss summed, divided by the number of positive labels (RetinaNet's
  normalisation; the Kaggle 2020 winner used focal loss for attributes);
- "bce": binary cross-entropy, mean over all elements.
The logits' bias starts at the prior p=0.01 (most attributes are absent for most instances), so
the loss starts near its steady-state scale instead of at 294 * log 2.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import sigmoid_focal_loss

ATTRIBUTE_LOSSES = ("bce", "focal")


class AttributeHead(nn.Module):
    """representation -> (hidden, ReLU) -> one logit per attribute (hidden=0: a single Linear)."""

    def __init__(self, in_features: int, hidden: int, num_attributes: int, prior_prob: float = 0.01):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden) if hidden > 0 else None
        self.logits = nn.Linear(hidden if hidden > 0 else in_features, num_attributes)
        nn.init.normal_(self.logits.weight, std=0.01)
        nn.init.constant_(self.logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, x: Tensor) -> Tensor:
        if self.fc is not None:
            x = F.relu(self.fc(x))
        return self.logits(x)


class AttributeLoss(nn.Module):
    """Multi-label loss over [R, A] logits and {0,1} targets (see the module docstring)."""

    def __init__(self, kind: str = "focal", gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        if kind not in ATTRIBUTE_LOSSES:
            raise ValueError(f"attribute_loss must be one of {ATTRIBUTE_LOSSES}, got {kind!r}")
        self.kind, self.gamma, self.alpha = kind, gamma, alpha

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        logits, targets = logits.float(), targets.float()
        if logits.numel() == 0:
            return logits.sum() * 0.0
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, targets)
        loss = sigmoid_focal_loss(logits, targets, alpha=self.alpha, gamma=self.gamma, reduction="sum")
        return loss / targets.sum().clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, gamma={self.gamma}, alpha={self.alpha}"


class AttributeRoIHeads(RoIHeads):
    """torchvision RoIHeads + `loss_attributes` in training + `attribute_scores` at inference."""

    def __init__(self, *args, attribute_head: AttributeHead, attribute_loss: AttributeLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.attribute_head = attribute_head
        self.attribute_loss = attribute_loss
        self._sampled: Optional[tuple[list[Tensor], list[Tensor], list[Tensor]]] = None

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._sampled = (proposals, matched_idxs, labels)  # consumed by forward, same call
        return proposals, matched_idxs, labels, regression_targets

    def attribute_logits(self, features: dict[str, Tensor], boxes: list[Tensor],
                         image_shapes: list[tuple[int, int]]) -> Tensor:
        x = self.box_roi_pool(features, boxes, image_shapes)
        return self.attribute_head(self.box_head(x))

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None or not all("attributes" in t for t in targets):
                raise ValueError("training targets need an 'attributes' entry: float multi-hot [N, num_attributes]")
            num_attributes = self.attribute_head.logits.out_features
            for i, t in enumerate(targets):
                want = (len(t["boxes"]), num_attributes)
                if tuple(t["attributes"].shape) != want:
                    raise ValueError(f"targets[{i}]['attributes'] has shape {list(t['attributes'].shape)}, expected "
                                     f"[{want[0]} boxes, {want[1]} attributes]: build the model from the same "
                                     "vocabulary (shard manifest) the loader reads")
        self._sampled = None
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            assert self._sampled is not None and targets is not None
            sampled, matched_idxs, labels = self._sampled
            self._sampled = None
            boxes, gt = [], []
            for props, idxs, labs, t in zip(sampled, matched_idxs, labels, targets):
                pos = torch.where(labs > 0)[0]
                boxes.append(props[pos])
                gt.append(t["attributes"][idxs[pos]])
            if sum(len(b) for b in boxes) == 0:  # no positive RoI: keep every parameter in the graph (DDP)
                losses["loss_attributes"] = sum(p.sum() for p in self.attribute_head.parameters()) * 0.0
            else:
                logits = self.attribute_logits(features, boxes, image_shapes)
                losses["loss_attributes"] = self.attribute_loss(logits, torch.cat(gt).to(logits.device))
        else:
            boxes = [r["boxes"] for r in result]
            counts = [len(b) for b in boxes]
            num_attributes = self.attribute_head.logits.out_features
            if sum(counts) == 0:
                scores = [b.new_zeros((0, num_attributes)) for b in boxes]
            else:
                scores = self.attribute_logits(features, boxes, image_shapes).float().sigmoid().split(counts)
            for r, s in zip(result, scores):
                r["attribute_scores"] = s
        return result, losses
