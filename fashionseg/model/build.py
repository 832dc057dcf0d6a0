"""Mask R-CNN with Fashionpedia's attribute head, built from a `ModelConfig`.

Contract (docs/design.md "Training targets" / "Model outputs"; other modules rely on it):

    model = build_model(cfg, num_classes=vocab.num_categories + 1, num_attributes=vocab.num_attributes)

- `num_classes` includes background; both counts come from the dataset vocabulary (47/294 for
  the 2020 data, 49/320 for older Fashionpedia files), never from constants here.
- The model never resizes: the data layer owns every resize, train and test, with one function
  (`model.min_size/max_size/resize_in_train` are gone; `REMOVED_KEYS` lists them for readers of
  older files). `images`: list of uint8 [3, H, W] (converted with `float() / 255` on their own
  device, then normalised) or float [3, H, W] in 0..1; both give identical results.
- Train mode: `model(images, targets) -> dict` with exactly `LOSS_NAMES` (torchvision's five
  terms + `loss_attributes`), each already multiplied by `cfg.loss_weights[name]`.
  `targets`: list of dicts with `boxes` float [N, 4] xyxy, `labels` int64 [N] in 1..C, `masks`
  uint8 [N, H, W], `attributes` float [N, A] multi-hot (other keys, e.g. `image_id`, `key`,
  `orig_size`, are ignored).
- Eval mode: `model(images, output_sizes=None) -> list[dict]` with `boxes` [N, 4] xyxy, `labels`
  int64 1..C, `scores` [N], `masks` float [N, 1, H, W] probabilities (binarise with
  `prob > cfg.mask_thresh`, also `model.mask_thresh`), `attribute_scores` float [N, A] sigmoid
  scores. Pixels are those of `output_sizes[i]` = (H, W) when given (boxes scaled, 28x28 mask
  probabilities pasted directly at that size: torchvision's postprocess with that "original
  size"), else of the input image.
- Post-processing (`score_thresh`, `nms_thresh` per class, `detections_per_img`, `mask_thresh`)
  can be changed on a built model with `set_postprocess` (threshold tuning needs no rebuild).
- Freeze-then-unfreeze: build the optimizer from `trainable_parameters(model)` (every parameter
  that is trainable at some step), then call `apply_freeze_schedule(model, step)` before each
  step (also right after resuming). For `step < cfg.freeze_backbone_steps` the whole backbone
  (body + FPN) has requires_grad=False, so only RPN and RoI heads train; it returns True when it
  changed anything. DDP/DeepSpeed only sync parameters that required grad when they were built:
  wrap first (accelerator.prepare, with `find_unused_parameters=True` when freeze_backbone_steps
  > 0: frozen parameters then get no gradient and torch optimizers skip them), then call it with
  the wrapped model; it raises if it sees a backbone that was frozen before wrapping.
- `trainable_backbone_layers` (0..5 for ResNets, 0..6 for MobileNetV3) applies with pretrained
  weights; without them every layer trains (torchvision's rule: nothing is worth freezing).
  Pretrained ResNet/MobileNet v1-style backbones use FrozenBatchNorm2d, otherwise BatchNorm2d
  (as torchvision's builders); the state-dict keys are the same either way.
- `cfg.pretrained` is loaded by `weights.load_pretrained` (local file or torch hub cache, never
  downloaded); its one-line report is logged (INFO, this module's logger, as the freeze-schedule
  changes) and kept as `model.pretrained_report`.
- Inference: `weights_file.load_model` folds BatchNorm into the convolutions by default
  (`fold.py`); a folded model refuses `.train()`.
- State dicts are plain tensors with torchvision's key names (`backbone.`, `rpn.`, `roi_heads.`;
  the attribute head under `roi_heads.attribute_head.`), so COCO checkpoints map onto them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from .attributes import ATTRIBUTE_LOSSES, AttributeHead, AttributeLoss, AttributeRoIHeads
from .per_image_loss import RecordingRPN
from .per_image_loss import image_losses as per_image_losses
from .weights import load_pretrained

log = logging.getLogger(__name__)

BACKBONES = ("resnet50_fpn", "resnet50_fpn_v2", "resnet18_fpn", "resnet34_fpn", "mobilenet_v3_large_fpn")
PRETRAINED_KINDS = ("auto", "maskrcnn", "backbone")
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss_attributes")
_MAX_TRAINABLE = {"mobilenet_v3_large_fpn": 6}  # ResNets: 5
_REPRESENTATION = 1024  # box head output (TwoMLPHead / ConvFC head), torchvision's size


@dataclass
class ModelConfig:
    backbone: str = "resnet50_fpn"
    # a local .pth (COCO Mask R-CNN / Faster R-CNN, or an ImageNet backbone), "coco", "imagenet",
    # or a torchvision weights name ("MaskRCNN_ResNet50_FPN_Weights.COCO_V1") from the hub cache
    pretrained: Optional[str] = None
    pretrained_kind: str = "auto"  # auto | maskrcnn | backbone
    trainable_backbone_layers: int = 3
    freeze_backbone_steps: int = 0  # heads only for the first K optimizer steps
    mask_head_hidden: int = 256
    # one size per FPN level for ResNets (5 levels); MobileNet uses all sizes on each of its 3
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    attribute_loss: str = "focal"  # focal | bce
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25  # < 0 disables the alpha balancing
    attribute_hidden: int = 1024  # 0: a linear classifier on the box representation
    # share of the attribute loss's gradient that reaches the box head it shares (0: detached)
    attribute_grad_scale: float = 0.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in LOSS_NAMES})
    # post-processing (inference)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    mask_thresh: float = 0.5

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"model.{name}: {why} (got {getattr(self, name)!r})")

        if isinstance(self.pretrained, str) and self.pretrained.strip().lower() in ("", "none", "null"):
            self.pretrained = None
        for name in _INT_FIELDS:  # YAML strings or floats here would fail later, obscurely
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(name, "must be an integer")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise bad(name, "must be a number")
            setattr(self, name, float(v))
        if self.backbone not in BACKBONES:
            raise bad("backbone", f"must be one of {', '.join(BACKBONES)}")
        if self.pretrained_kind not in PRETRAINED_KINDS:
            raise bad("pretrained_kind", f"must be one of {', '.join(PRETRAINED_KINDS)}")
        if self.attribute_loss not in ATTRIBUTE_LOSSES:
            raise bad("attribute_loss", f"must be one of {', '.join(ATTRIBUTE_LOSSES)}")
        max_layers = _MAX_TRAINABLE.get(self.backbone, 5)
        if not 0 <= self.trainable_backbone_layers <= max_layers:
            raise bad("trainable_backbone_layers", f"must be in 0..{max_layers} for {self.backbone}")
        def positive_ints(name: str, values) -> tuple[int, ...]:
            if not isinstance(values, (list, tuple)) or not values or any(
                    not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in values):
                raise bad(name, "must be a positive integer or a non-empty list of them")
            return tuple(values)

        self.anchor_sizes = positive_ints("anchor_sizes", self.anchor_sizes)
        if not isinstance(self.aspect_ratios, (list, tuple)) or not self.aspect_ratios or any(
                not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 for r in self.aspect_ratios):
            raise bad("aspect_ratios", "must be a non-empty list of positive numbers")
        self.aspect_ratios = tuple(float(r) for r in self.aspect_ratios)
        if self.backbone != "mobilenet_v3_large_fpn" and len(self.anchor_sizes) != 5:
            raise bad("anchor_sizes", f"{self.backbone} has 5 FPN levels: give one anchor size per level")
        if not isinstance(self.loss_weights, dict):
            raise bad("loss_weights", "must be a mapping of loss name to weight")
        unknown = set(self.loss_weights) - set(LOSS_NAMES)
        if unknown:
            raise bad("loss_weights", f"unknown loss names {sorted(unknown)}; known: {', '.join(LOSS_NAMES)}")
        for k, v in self.loss_weights.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise bad("loss_weights", f"weight of {k} must be a number >= 0")
        self.loss_weights = {k: float(self.loss_weights.get(k, 1.0)) for k in LOSS_NAMES}
        for name in ("freeze_backbone_steps", "attribute_hidden"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        for name in ("mask_head_hidden", "rpn_batch_size_per_image", "box_batch_size_per_image", "detections_per_img",
                     "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.focal_gamma < 0:
            raise bad("focal_gamma", "must be >= 0")
        for name in ("attribute_grad_scale", "score_thresh", "nms_thresh", "mask_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "must be in [0, 1]")


_INT_FIELDS = ("trainable_backbone_layers", "freeze_backbone_steps", "mask_head_hidden", "rpn_batch_size_per_image",
               "box_batch_size_per_image", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
               "rpn_post_nms_top_n_test", "attribute_hidden", "detections_per_img")
_FLOAT_FIELDS = ("attribute_grad_scale", "focal_gamma", "focal_alpha", "score_thresh", "nms_thresh", "mask_thresh")


# Keys older weights files and configs carry that no longer mean anything: the data layer owns
# every resize (data.min_size / max_size / test_size). Readers drop them instead of refusing.
REMOVED_KEYS = ("min_size", "max_size", "resize_in_train")


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: normalise (uint8 or float 0..1) and batch.

    The data layer resizes train and test images with one function; a second resize here would
    make train and test differ again. uint8 images are converted on their own device, so the
    loader ships a quarter of the bytes and the GPU does the arithmetic.
    """

    def __init__(self, image_mean: list[float], image_std: list[float]):
        super().__init__(0, 0, image_mean, image_std)
        self.min_size = self.max_size = None  # a caller that still sets a resize target fails loudly

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            image = image.float() / 255
        return super().normalize(image)

    def resize(self, image, target=None):
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uint8 or float 0..1, mean={self.image_mean}, std={self.image_std}, no resize)"


class FashionMaskRCNN(GeneralizedRCNN):
    """torchvision's GeneralizedRCNN (same submodules and keys as MaskRCNN) + weighted losses
    + predictions at a requested grid."""

    def __init__(self, backbone, rpn, roi_heads, transform, *, num_classes: int, num_attributes: int,
                 loss_weights: dict[str, float], mask_thresh: float, freeze_backbone_steps: int):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes, self.num_attributes = num_classes, num_attributes
        self.loss_weights = dict(loss_weights)
        self.mask_thresh = mask_thresh
        self.freeze_backbone_steps = freeze_backbone_steps
        # the backbone parameters trainable_backbone_layers leaves trainable (the unfreeze target)
        self.backbone_trainable = [n for n, p in self.backbone.named_parameters() if p.requires_grad]
        self.backbone_frozen = False
        self.frozen_before_wrapping = False
        self.pretrained_report: Optional[str] = None
        self.folded = False  # set by fold.fold_batchnorm: inference only from then on

    def forward(self, images, targets=None, output_sizes: Optional[Sequence[tuple[int, int]]] = None,
                image_losses: bool = False):
        """Train: weighted losses; with `image_losses=True`, `(losses, per_image)` where per_image
        holds every term per image ([B], detached, weighted; per_image_loss.py), from the same
        forward. Eval: detections in the pixels of `output_sizes` (default: the input sizes); boxes
        are scaled and the 28x28 mask probabilities pasted straight at that size, so predictions
        reach the original resolution without resampling probability maps."""
        if self.training:
            try:
                out = super().forward(images, targets)
                losses = {k: v * self.loss_weights.get(k, 1.0) for k, v in out.items()}
                if not image_losses:
                    return losses
                per_image = per_image_losses(self.rpn.loss_inputs, self.roi_heads.loss_inputs, targets,
                                             self.roi_heads.attribute_loss, self.loss_weights)
                return losses, per_image
            finally:
                self.rpn.loss_inputs = self.roi_heads.loss_inputs = None
        sizes = [tuple(img.shape[-2:]) for img in images] if output_sizes is None else [tuple(s) for s in output_sizes]
        if len(sizes) != len(images) or any(len(s) != 2 for s in sizes):
            raise ValueError(f"output_sizes needs one (H, W) per image: {len(images)} images, got {output_sizes!r}")
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, [(int(h), int(w)) for h, w in sizes])

    def train(self, mode: bool = True):
        if mode and self.folded:
            raise RuntimeError("this model's BatchNorm layers were folded into its convolutions (inference "
                               "only); load the weights again with fold=False to train")
        return super().train(mode)


def unwrap(model: nn.Module) -> nn.Module:
    """The FashionMaskRCNN inside DDP / accelerate / torch.compile wrappers."""
    while not isinstance(model, FashionMaskRCNN):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a fashionseg model: {type(model).__name__}")
        model = inner
    return model


def _norm_layer(pretrained: bool):
    return FrozenBatchNorm2d if pretrained else nn.BatchNorm2d


def _build_backbone_parts(cfg: ModelConfig, pretrained: bool):
    """(backbone with FPN, roi featmap names, anchor generator, rpn head, box head, mask head, rpn score thresh)."""
    layers = cfg.trainable_backbone_layers if pretrained else _MAX_TRAINABLE.get(cfg.backbone, 5)
    hidden = [cfg.mask_head_hidden] * 4
    ratios = cfg.aspect_ratios
    if cfg.backbone == "mobilenet_v3_large_fpn":
        body = mobilenet_v3_large(weights=None, norm_layer=_norm_layer(pretrained))
        backbone = _mobilenet_extractor(body, True, layers)
        anchors = AnchorGenerator((cfg.anchor_sizes,) * 3, (ratios,) * 3)
        featmaps, rpn_score_thresh = ["0", "1"], 0.05  # torchvision's mobilenet defaults
    else:
        v2 = cfg.backbone == "resnet50_fpn_v2"
        arch = cfg.backbone.split("_")[0]
        norm = nn.BatchNorm2d if v2 else _norm_layer(pretrained)
        body = getattr(resnet, arch)(weights=None, norm_layer=norm)
        backbone = _resnet_fpn_extractor(body, layers, norm_layer=nn.BatchNorm2d if v2 else None)
        anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (ratios,) * len(cfg.anchor_sizes))
        featmaps, rpn_score_thresh = ["0", "1", "2", "3"], 0.0
    c = backbone.out_channels
    num_anchors = anchors.num_anchors_per_location()[0]
    if cfg.backbone == "resnet50_fpn_v2":
        rpn_head = RPNHead(c, num_anchors, conv_depth=2)
        box_head = FastRCNNConvFCHead((c, 7, 7), [256] * 4, [_REPRESENTATION], norm_layer=nn.BatchNorm2d)
        mask_head = MaskRCNNHeads(c, hidden, 1, norm_layer=nn.BatchNorm2d)
    else:
        rpn_head = RPNHead(c, num_anchors)
        box_head = TwoMLPHead(c * 7 * 7, _REPRESENTATION)
        mask_head = MaskRCNNHeads(c, hidden, 1)
    return backbone, featmaps, anchors, rpn_head, box_head, mask_head, rpn_score_thresh


def build_model(cfg: ModelConfig, num_classes: int, num_attributes: int) -> FashionMaskRCNN:
    """Mask R-CNN + attribute head sized from the dataset vocabulary; loads cfg.pretrained if set."""
    for name, v in (("num_classes", num_classes), ("num_attributes", num_attributes)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an integer (from the dataset vocabulary), got {v!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts background: need >= 2, got {num_classes}")
    if num_attributes < 0:
        raise ValueError(f"num_attributes must be >= 0, got {num_attributes}")
    pretrained = cfg.pretrained is not None
    backbone, featmaps, anchors, rpn_head, box_head, mask_head, rpn_score_thresh = _build_backbone_parts(cfg, pretrained)
    rpn = RecordingRPN(
        anchors, rpn_head,
        fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=cfg.rpn_batch_size_per_image, positive_fraction=0.5,
        pre_nms_top_n=dict(training=cfg.rpn_pre_nms_top_n_train, testing=cfg.rpn_pre_nms_top_n_test),
        post_nms_top_n=dict(training=cfg.rpn_post_nms_top_n_train, testing=cfg.rpn_post_nms_top_n_test),
        nms_thresh=0.7, score_thresh=rpn_score_thresh,
    )
    roi_heads = AttributeRoIHeads(
        MultiScaleRoIAlign(featmaps, output_size=7, sampling_ratio=2),
        box_head,
        FastRCNNPredictor(_REPRESENTATION, num_classes),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=cfg.box_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(featmaps, output_size=14, sampling_ratio=2),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_hidden, cfg.mask_head_hidden, num_classes),
        attribute_head=AttributeHead(_REPRESENTATION, cfg.attribute_hidden, num_attributes),
        attribute_loss=AttributeLoss(cfg.attribute_loss, cfg.focal_gamma, cfg.focal_alpha),
        attribute_grad_scale=cfg.attribute_grad_scale,
    )
    transform = DetectionTransform([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    model = FashionMaskRCNN(
        backbone, rpn, roi_heads, transform,
        num_classes=num_classes, num_attributes=num_attributes, loss_weights=cfg.loss_weights,
        mask_thresh=cfg.mask_thresh, freeze_backbone_steps=cfg.freeze_backbone_steps,
    )
    if pretrained:
        report = load_pretrained(model, cfg.pretrained, kind=cfg.pretrained_kind, backbone=cfg.backbone)
        model.pretrained_report = str(report)
        log.info(model.pretrained_report)
    return model


def set_postprocess(model: nn.Module, *, score_thresh: float | None = None, nms_thresh: float | None = None,
                    detections_per_img: int | None = None, mask_thresh: float | None = None) -> None:
    """Change inference post-processing in place (threshold tuning without a rebuild)."""
    m = unwrap(model)
    if score_thresh is not None:
        m.roi_heads.score_thresh = float(score_thresh)
    if nms_thresh is not None:
        m.roi_heads.nms_thresh = float(nms_thresh)
    if detections_per_img is not None:
        m.roi_heads.detections_per_img = int(detections_per_img)
    if mask_thresh is not None:
        m.mask_thresh = float(mask_thresh)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters trainable at some step (includes a backbone frozen by the schedule right now)."""
    m = unwrap(model)
    scheduled = {id(p) for n, p in m.backbone.named_parameters() if n in set(m.backbone_trainable)}
    return [p for p in m.parameters() if p.requires_grad or id(p) in scheduled]


def apply_freeze_schedule(model: nn.Module, step: int) -> bool:
    """Freeze the backbone (body + FPN) for step < freeze_backbone_steps, unfreeze after.

    Returns True when requires_grad changed. Raises when a backbone frozen before DDP/DeepSpeed
    wrapping is seen through the wrapper: those parameters would never be synchronised after
    unfreezing, and each rank would train its own backbone.
    """
    m = unwrap(model)
    distributed = _in_distributed_wrapper(model)
    if distributed and m.backbone_frozen and m.frozen_before_wrapping:
        raise RuntimeError(
            "the backbone was frozen before the model was wrapped for distributed training: DDP/DeepSpeed "
            "only sync parameters that required grad when they were built, so after unfreezing each rank "
            "would train its own backbone. Call apply_freeze_schedule after wrapping (accelerator.prepare)")
    frozen = step < m.freeze_backbone_steps
    if frozen == m.backbone_frozen:
        return False
    if frozen:
        m.frozen_before_wrapping = not distributed
    trainable = set(m.backbone_trainable)
    for name, p in m.backbone.named_parameters():
        if name in trainable:
            p.requires_grad_(not frozen)
    m.backbone_frozen = frozen
    log.info("backbone %s at step %d", "frozen (heads only)" if frozen else "unfrozen", step)
    return True


def _in_distributed_wrapper(model: nn.Module) -> bool:
    while not isinstance(model, FashionMaskRCNN):
        if type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel"):
            return True
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if model is None:
            return False
    return False

