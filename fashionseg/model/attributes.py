"""Fashionpedia's attribute head: multi-label attributes per instance, on the box head's features.

Attribute-Mask R-CNN (Fashionpedia) classifies attributes from the same RoI representation the
box classifier uses. `AttributeRoIHeads` is torchvision's RoIHeads plus that branch, fed with the
box features RoIHeads has just computed (kept by a forward hook on `box_head`; no second RoIAlign
or box-head pass):
- training: the rows of the sampled positive proposals, with the attributes of the ground truth
  torchvision's own sampling matched them to (`select_training_samples` keeps labels/matches);
- inference: the row of the proposal each final detection came from (`postprocess_detections`
  keeps that index), as Fashionpedia's reference gathers attribute outputs with the detections.
  The class score and the attributes of a detection then come from one feature vector, the one
  the head was trained on (proposal features); re-pooling at the regressed box would feed the
  head features of a distribution it never saw in training, and cost a RoIAlign + box head.
`AttributeHead` is a small MLP on top of the shared box head (TwoMLPHead / ConvFC head). How much
of the attribute loss's gradient reaches that shared head is `attribute_grad_scale` (model config):
at 1 (joint training, as Fashionpedia's paper) the attribute loss pulls the representation the
box classifier and regressor need, and the accuracy bench measured detection at less than half of
the torchvision reference's (mask AP 3.6 vs 7.3 at 200 steps); at 0 the head learns on detached
features, and both detection and the attribute metric came out higher (docs/benchmarks.md).

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
from torchvision.ops import boxes as box_ops, sigmoid_focal_loss

from .per_image_loss import RoILossInputs

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

    def __init__(self, *args, attribute_head: AttributeHead, attribute_loss: AttributeLoss,
                 attribute_grad_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.attribute_head = attribute_head
        self.attribute_loss = attribute_loss
        self.attribute_grad_scale = attribute_grad_scale
        # filled and consumed within one forward: box features, training samples, detection rows
        self._box_features: Optional[Tensor] = None
        self._sampled: Optional[tuple[list[Tensor], ...]] = None  # proposals, matched, labels, regression targets
        self._detection_rows: Optional[list[Tensor]] = None
        # what the losses of the last training forward were computed from (per_image_loss.py)
        self._outputs: dict[str, Tensor] = {}
        self.loss_inputs: Optional[RoILossInputs] = None
        self.box_head.register_forward_hook(self._keep_box_features)
        self.box_predictor.register_forward_hook(self._keep_output("box"))
        if self.mask_predictor is not None:
            self.mask_predictor.register_forward_hook(self._keep_output("mask"))

    def _keep_box_features(self, module, inputs, output: Tensor) -> None:
        self._box_features = output

    def _keep_output(self, name: str):
        def hook(module, inputs, output) -> None:
            if self.training:
                self._outputs[name] = output
        return hook

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._sampled = (proposals, matched_idxs, labels, regression_targets)
        return proposals, matched_idxs, labels, regression_targets

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """torchvision's, keeping for each detection the row (over all images) of its proposal."""
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        pred_scores = F.softmax(class_logits, -1).split(counts)
        all_boxes, all_scores, all_labels, all_rows = [], [], [], []
        offset = 0
        for boxes, scores, image_shape, n in zip(pred_boxes, pred_scores, image_shapes, counts):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            rows = torch.arange(offset, offset + n, device=scores.device).view(-1, 1).expand_as(scores)
            offset += n
            # every class prediction but background is a separate instance
            boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
            labels, rows = labels[:, 1:].reshape(-1), rows[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[box_ops.remove_small_boxes(boxes[keep], min_size=1e-2)]
            keep = keep[box_ops.batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
            all_rows.append(rows[keep])
        self._detection_rows = all_rows
        return all_boxes, all_scores, all_labels

    def _check_attribute_targets(self, targets) -> None:
        if targets is None or not all("attributes" in t for t in targets):
            raise ValueError("training targets need an 'attributes' entry: float multi-hot [N, num_attributes]")
        num_attributes = self.attribute_head.logits.out_features
        for i, t in enumerate(targets):
            want = (len(t["boxes"]), num_attributes)
            if tuple(t["attributes"].shape) != want:
                raise ValueError(f"targets[{i}]['attributes'] has shape {list(t['attributes'].shape)}, expected "
                                 f"[{want[0]} boxes, {want[1]} attributes]: build the model from the same "
                                 "vocabulary (shard manifest) the loader reads")

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            self._check_attribute_targets(targets)
        try:
            result, losses = super().forward(features, proposals, image_shapes, targets)
            box_features = self._box_features
            if self.training:
                sampled_proposals, matched, sampled_labels, regression_targets = self._sampled
                rows, gt, positives, offset = [], [], [], 0  # box_features rows: the sampled proposals, image after image
                for t, idx, lab in zip(targets, matched, sampled_labels):
                    pos = torch.where(lab > 0)[0]
                    positives.append(pos)
                    rows.append(pos + offset)
                    gt.append(t["attributes"][idx[pos]])
                    offset += len(lab)
                # no positive RoI: empty logits still put every attribute parameter in the graph (DDP)
                x = box_features[torch.cat(rows)]
                if self.attribute_grad_scale == 0.0:  # the default: no backward through the box head for it
                    x = x.detach()
                elif self.attribute_grad_scale != 1.0:  # same values, a scaled gradient into the shared box head
                    x = x.detach() + self.attribute_grad_scale * (x - x.detach())
                logits = self.attribute_head(x)
                losses["loss_attributes"] = self.attribute_loss(logits, torch.cat(gt).to(logits.device))
                class_logits, box_regression = self._outputs["box"]
                self.loss_inputs = RoILossInputs(class_logits, box_regression, sampled_proposals, matched, sampled_labels,
                                                 regression_targets, positives, self._outputs.get("mask"), logits, gt)
            else:
                rows = self._detection_rows
                logits = self.attribute_head(box_features[torch.cat(rows)])
                for r, s in zip(result, logits.float().sigmoid().split([len(x) for x in rows])):
                    r["attribute_scores"] = s
        finally:
            self._box_features = self._sampled = self._detection_rows = None
            self._outputs = {}
        return result, losses
