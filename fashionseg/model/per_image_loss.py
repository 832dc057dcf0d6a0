"""Per-image training losses from the batch forward, for hard mining per image.

Mask R-CNN's losses are batch means: one number per term for the whole batch, so a miner can only
rank batches. This module gives every image its own value of every term, from what the one
forward already built (no second forward, no gradient): the RPN's sampled anchors (recorded by
`RecordingSampler`) and the RoI heads' sampled proposals, logits and targets (kept by
`AttributeRoIHeads`). Each per-image term is torchvision's own loss function applied to that
image's rows, so with one image in the batch it equals the batch loss bit for bit, and the batch
loss the optimizer sees is computed exactly as before.

Relation to the batch value (n_i: image i's sampled RoIs, p_i: its positive RoIs, s_i: its sampled
anchors, t_i: its positive attribute labels; l_i: its per-image loss):
- loss_classifier, loss_box_reg: batch = sum_i n_i l_i / sum_i n_i (cross-entropy mean over sampled
  RoIs; smooth-L1 summed over positives and divided by the sampled RoIs);
- loss_mask: batch = sum_i p_i l_i / sum_i p_i (BCE mean over positives x 28 x 28; l_i = 0 if p_i = 0);
- loss_objectness, loss_rpn_box_reg: batch = sum_i s_i l_i / sum_i s_i;
- loss_attributes: focal, batch = sum_i max(t_i, 1) l_i / max(sum_i t_i, 1); bce, weights p_i.
Equal up to float rounding (the batch sums in another order). Costs: the per-image mask targets
(one RoIAlign of the ground-truth masks, as torchvision's loss does) and a few small kernels per
image and term; measured in docs/hard_mining.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork


class RecordingSampler:
    """Wraps a BalancedPositiveNegativeSampler and keeps its last draw (per-image pos/neg masks):
    the RPN samples anchors at random inside its loss, and per-image losses need the same draw."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.last: tuple[list[Tensor], list[Tensor]] | None = None

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        self.last = self.sampler(matched_idxs)
        return self.last

    def __getattr__(self, name):  # batch_size_per_image, positive_fraction
        if "sampler" not in self.__dict__:  # copy/pickle probe a bare instance before __init__'s state
            raise AttributeError(name)
        return getattr(self.__dict__["sampler"], name)


class RecordingRPN(RegionProposalNetwork):
    """torchvision's RPN (same parameters, same losses) that keeps its loss inputs of the last
    training forward in `loss_inputs`, for `rpn_image_losses`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = RecordingSampler(self.fg_bg_sampler)
        self.loss_inputs: RPNLossInputs | None = None

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        losses = super().compute_loss(objectness, pred_bbox_deltas, labels, regression_targets)
        self.loss_inputs = RPNLossInputs(objectness, pred_bbox_deltas, labels, regression_targets, *self.fg_bg_sampler.last)
        self.fg_bg_sampler.last = None
        return losses


@dataclass
class RPNLossInputs:
    objectness: Tensor            # [B * A] logits, image after image (torchvision's concat order)
    deltas: Tensor                # [B * A, 4]
    labels: list[Tensor]          # per image [A]: 1 fg, 0 bg, -1 ignored
    regression_targets: list[Tensor]
    pos: list[Tensor]             # per image [A] sampled-positive masks (the loss's own draw)
    neg: list[Tensor]


@dataclass
class RoILossInputs:
    class_logits: Tensor          # [sum n_i, C]
    box_regression: Tensor        # [sum n_i, 4C]
    proposals: list[Tensor]       # per image [n_i, 4], the sampled proposals
    matched_idxs: list[Tensor]
    labels: list[Tensor]
    regression_targets: list[Tensor]
    positives: list[Tensor]       # per image: indices of its positive sampled proposals
    mask_logits: Tensor | None    # [sum p_i, C, M, M]
    attribute_logits: Tensor      # [sum p_i, A]
    attribute_targets: list[Tensor]


def rpn_image_losses(inp: RPNLossInputs) -> dict[str, Tensor]:
    """loss_objectness and loss_rpn_box_reg per image, as RegionProposalNetwork.compute_loss."""
    objectness, deltas = inp.objectness.flatten(), inp.deltas
    n = len(inp.labels)
    per_image = objectness.numel() // max(n, 1)
    obj, box = [], []
    for i, (labels, targets, pos_mask, neg_mask) in enumerate(zip(inp.labels, inp.regression_targets, inp.pos, inp.neg)):
        rows = slice(i * per_image, (i + 1) * per_image)
        pos, neg = torch.where(pos_mask)[0], torch.where(neg_mask)[0]
        sampled = torch.cat([pos, neg], dim=0)
        if sampled.numel() == 0:
            obj.append(objectness.new_zeros(()))
            box.append(objectness.new_zeros(()))
            continue
        d = deltas[rows]
        box.append(F.smooth_l1_loss(d[pos], targets[pos], beta=1 / 9, reduction="sum") / sampled.numel())
        obj.append(F.binary_cross_entropy_with_logits(objectness[rows][sampled], labels[sampled]))
    return {"loss_objectness": torch.stack(obj), "loss_rpn_box_reg": torch.stack(box)}


def roi_image_losses(inp: RoILossInputs, targets: list[dict], attribute_loss) -> dict[str, Tensor]:
    """The RoI heads' four terms per image, each torchvision's (or AttributeLoss's) own function
    applied to one image's rows."""
    counts = [len(l) for l in inp.labels]
    logits, regression = inp.class_logits.split(counts), inp.box_regression.split(counts)
    p = [len(x) for x in inp.positives]
    masks = inp.mask_logits.split(p) if inp.mask_logits is not None else None
    attrs = inp.attribute_logits.split(p)
    out: dict[str, list[Tensor]] = {"loss_classifier": [], "loss_box_reg": [], "loss_attributes": []}
    if masks is not None:
        out["loss_mask"] = []
    for i, t in enumerate(targets):
        cls, box = fastrcnn_loss(logits[i], regression[i], [inp.labels[i]], [inp.regression_targets[i]])
        out["loss_classifier"].append(cls)
        out["loss_box_reg"].append(box)
        if masks is not None:
            pos = inp.positives[i]
            out["loss_mask"].append(maskrcnn_loss(masks[i], [inp.proposals[i][pos]], [t["masks"]], [t["labels"]],
                                                  [inp.matched_idxs[i][pos]]))
        out["loss_attributes"].append(attribute_loss(attrs[i], inp.attribute_targets[i].to(attrs[i].device)))
    return {k: torch.stack([x.float() for x in v]) for k, v in out.items()}


def image_losses(rpn: RPNLossInputs, roi: RoILossInputs, targets: list[dict], attribute_loss,
                 weights: dict[str, float]) -> dict[str, Tensor]:
    """Every loss term per image ([B] each, detached, fp32), times its configured weight, as the
    model's batch losses are."""
    with torch.no_grad():
        terms = {**rpn_image_losses(rpn), **roi_image_losses(roi, targets, attribute_loss)}
        return {k: v.detach().float() * weights.get(k, 1.0) for k, v in terms.items()}


__all__ = ["RecordingRPN", "RecordingSampler", "RPNLossInputs", "RoILossInputs", "image_losses", "rpn_image_losses",
           "roi_image_losses"]
