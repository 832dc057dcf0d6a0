"""Mask R-CNN + attribute head: every backbone trains and predicts on CPU, losses fall on a tiny set."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d, box_iou

from fashionseg.model.attributes import AttributeLoss
from fashionseg.model.build import (
    BACKBONES, LOSS_NAMES, ModelConfig, apply_freeze_schedule, binarize_masks, build_model,
    set_postprocess, trainable_parameters,
)

torch.set_num_threads(1)


def tiny_config(backbone: str, **kw) -> ModelConfig:
    """Small enough for a 2-core CPU: 64-96 px, a few dozen proposals and RoIs."""
    small_anchors = (16, 32, 64) if backbone == "mobilenet_v3_large_fpn" else (16, 32, 64, 128, 256)
    base = dict(backbone=backbone, min_size=80, max_size=96, anchor_sizes=small_anchors,
                rpn_batch_size_per_image=32, box_batch_size_per_image=32,
                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                mask_head_hidden=32, attribute_hidden=64)
    base.update(kw)
    return ModelConfig(**base)


def synthetic_image(h, w, rects, labels, attrs, num_attributes):
    """Flat background with coloured rectangles; targets exactly as the loader yields them."""
    img = torch.full((3, h, w), 0.1)
    masks = torch.zeros(len(rects), h, w, dtype=torch.uint8)
    att = torch.zeros(len(rects), num_attributes)
    for i, ((x0, y0, x1, y1), c, a) in enumerate(zip(rects, labels, attrs)):
        img[c % 3, y0:y1, x0:x1] = 0.9
        img[(c + 1) % 3, y0:y1, x0:x1] = 0.3 * (c % 2)
        masks[i, y0:y1, x0:x1] = 1
        att[i, a] = 1
    target = dict(boxes=torch.tensor(rects, dtype=torch.float32), labels=torch.tensor(labels),
                  masks=masks, attributes=att, image_id=torch.tensor(0), key="synthetic", orig_size=(h, w))
    return img, target


def two_images(num_attributes):
    return [
        synthetic_image(80, 96, [(8, 8, 40, 60), (50, 20, 90, 70)], [1, 3], [[0, 4], [7]], num_attributes),
        synthetic_image(96, 80, [(10, 30, 70, 90)], [5], [[2, 11, 19]], num_attributes),
    ]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_forward_backward_and_predict_each_backbone(backbone):
    torch.manual_seed(0)
    num_classes, num_attributes = (49, 320) if backbone == "resnet34_fpn" else (47, 294)  # both vocab releases
    model = build_model(tiny_config(backbone, score_thresh=0.0), num_classes, num_attributes)
    img, target = two_images(num_attributes)[0]

    model.train()
    losses = model([img], [target])
    assert tuple(sorted(losses)) == tuple(sorted(LOSS_NAMES))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    heads = model.roi_heads
    for module in (heads.attribute_head, heads.box_predictor, heads.mask_predictor, model.rpn.head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    model.eval()
    with torch.no_grad():
        (out,) = model([img])
    n = len(out["boxes"])
    assert n > 0  # score_thresh=0: random weights still yield detections
    assert out["masks"].shape == (n, 1, 80, 96) and out["masks"].dtype == torch.float32
    assert out["attribute_scores"].shape == (n, num_attributes)
    assert 0 <= out["attribute_scores"].min() and out["attribute_scores"].max() <= 1
    assert out["labels"].min() >= 1 and out["labels"].max() < num_classes
    assert model.roi_heads.box_predictor.cls_score.out_features == num_classes
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == num_classes


def test_overfit_two_images_drives_every_loss_down():
    """40 AdamW steps on two synthetic images: each of the six terms falls below half its start,
    and at inference the detection on each object scores its own attributes above the others."""
    torch.manual_seed(0)
    num_attributes = 20
    data = two_images(num_attributes)
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), num_classes=6, num_attributes=num_attributes)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(40):
        losses = model(images, targets)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    for name in LOSS_NAMES:
        first = sum(h[name] for h in history[:5]) / 5
        last = sum(h[name] for h in history[-5:]) / 5
        assert last < 0.5 * first, f"{name}: {first:.4f} -> {last:.4f}"

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out, target in zip(outputs, targets):
        iou = box_iou(target["boxes"], out["boxes"])
        for g in range(len(target["boxes"])):
            j = iou[g].argmax()
            assert iou[g, j] > 0.5
            scores, positive = out["attribute_scores"][j], target["attributes"][g] > 0
            assert scores[positive].mean() > scores[~positive].mean() + 0.1


def test_loss_weights_scale_each_term():
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn"), 47, 294)
    img, target = two_images(294)[0]
    torch.manual_seed(1)
    plain = model([img], [target])
    model.loss_weights.update(loss_attributes=2.5, loss_mask=0.0)
    torch.manual_seed(1)
    weighted = model([img], [target])
    assert torch.allclose(weighted["loss_attributes"], 2.5 * plain["loss_attributes"])
    assert weighted["loss_mask"] == 0
    assert torch.equal(weighted["loss_classifier"], plain["loss_classifier"])


def test_loss_weights_from_config_partial_and_validated():
    cfg = ModelConfig(loss_weights={"loss_attributes": 0.5})
    assert cfg.loss_weights == {**{k: 1.0 for k in LOSS_NAMES}, "loss_attributes": 0.5}
    with pytest.raises(ValueError, match="model.loss_weights.*loss_attribute"):
        ModelConfig(loss_weights={"loss_attribute": 1.0})
    with pytest.raises(ValueError, match="model.backbone"):
        ModelConfig(backbone="resnet101_fpn")
    with pytest.raises(ValueError, match="model.anchor_sizes"):
        ModelConfig(anchor_sizes=(32, 64))
    assert ModelConfig(min_size=[640, 800]).min_size == (640, 800)  # YAML lists -> multi-scale tuple


def test_attribute_losses_match_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = logits.sigmoid()
    ce = -(targets * p.log() + (1 - targets) * (1 - p).log())
    assert torch.allclose(AttributeLoss("bce")(logits, targets), ce.mean())
    p_t = targets * p + (1 - targets) * (1 - p)
    alpha_t = 0.25 * targets + 0.75 * (1 - targets)
    focal = (alpha_t * (1 - p_t) ** 2 * ce).sum() / targets.sum()  # normalised by positive labels
    assert torch.allclose(AttributeLoss("focal", gamma=2.0, alpha=0.25)(logits, targets), focal)
    empty = AttributeLoss("focal")(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3))
    assert empty.item() == 0 and empty.requires_grad


def test_image_without_instances_still_trains():
    torch.manual_seed(0)
    model = build_model(tiny_config("mobilenet_v3_large_fpn"), 47, 294)
    img = torch.rand(3, 64, 64)
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64),
                 masks=torch.zeros(0, 64, 64, dtype=torch.uint8), attributes=torch.zeros(0, 294))
    losses = model([img], [empty])
    assert losses["loss_attributes"].item() == 0 and losses["loss_mask"].item() == 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.roi_heads.attribute_head.parameters())


def test_missing_attributes_in_targets_is_a_clear_error():
    model = build_model(tiny_config("mobilenet_v3_large_fpn"), 47, 294)
    img, target = two_images(294)[0]
    del target["attributes"]
    with pytest.raises(ValueError, match="'attributes'"):
        model([img], [target])


def test_postprocess_settings_apply_without_rebuild():
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), 47, 294).eval()
    img, _ = two_images(294)[0]
    set_postprocess(model, detections_per_img=3, mask_thresh=0.3)
    with torch.no_grad():
        (out,) = model([img])
    assert len(out["boxes"]) == 3 and model.mask_thresh == 0.3
    set_postprocess(model, score_thresh=1.0)
    with torch.no_grad():
        (none,) = model([img])
    assert len(none["boxes"]) == 0 and none["attribute_scores"].shape == (0, 294)
    probs = torch.tensor([[[[0.2, 0.3], [0.31, 0.9]]]])
    assert binarize_masks(probs, model.mask_thresh).tolist() == [[[False, False], [True, True]]]


def test_freeze_schedule_trains_heads_only_then_everything():
    torch.manual_seed(0)
    model = build_model(tiny_config("mobilenet_v3_large_fpn", freeze_backbone_steps=2), 47, 294)
    params = trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=0.01)
    img, target = two_images(294)[0]
    backbone_before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head_before = model.roi_heads.attribute_head.logits.weight.detach().clone()

    assert apply_freeze_schedule(model, 0) is True
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert len(trainable_parameters(model)) == len(params)  # frozen ones still belong to the optimizer
    for step in range(2):
        assert apply_freeze_schedule(model, step) is False  # already frozen at step 0
        opt.zero_grad()
        sum(model([img], [target]).values()).backward()
        opt.step()
    assert all(torch.equal(p, backbone_before[n]) for n, p in model.backbone.named_parameters())
    assert not torch.equal(model.roi_heads.attribute_head.logits.weight, head_before)

    assert apply_freeze_schedule(model, 2) is True  # unfrozen: back to the trainable_backbone_layers set
    assert [n for n, p in model.backbone.named_parameters() if p.requires_grad] == model.backbone_trainable
    opt.zero_grad()
    sum(model([img], [target]).values()).backward()
    opt.step()
    assert not torch.equal(model.backbone.fpn.inner_blocks[0][0].weight, backbone_before["fpn.inner_blocks.0.0.weight"])
    assert apply_freeze_schedule(model, 3) is False


def test_trainable_backbone_layers_only_with_pretrained(tmp_path):
    """Without pretrained weights every layer trains (torchvision's rule); with them, only the last K."""
    scratch = build_model(tiny_config("resnet18_fpn", trainable_backbone_layers=1), 47, 294)
    assert all(p.requires_grad for p in scratch.backbone.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in scratch.backbone.body.modules())

    import torchvision

    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    model = build_model(tiny_config("resnet18_fpn", pretrained=str(path), trainable_backbone_layers=2), 47, 294)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.body.modules())


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_freeze_schedule_refuses_a_backbone_frozen_before_ddp(single_process_group):
    """Frozen before wrapping, DDP would never all-reduce the backbone after unfreezing (ranks
    silently diverge); wrapped first, the schedule works through the wrapper."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(tiny_config("mobilenet_v3_large_fpn", freeze_backbone_steps=1), 47, 294)
    apply_freeze_schedule(model, 0)
    with pytest.raises(RuntimeError, match="frozen before the model was wrapped"):
        apply_freeze_schedule(DDP(model, find_unused_parameters=True), 1)

    model = build_model(tiny_config("mobilenet_v3_large_fpn", freeze_backbone_steps=1), 47, 294)
    ddp = DDP(model, find_unused_parameters=True)
    assert apply_freeze_schedule(ddp, 0) is True and model.backbone_frozen
    img, target = two_images(294)[0]
    sum(ddp([img], [target]).values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert apply_freeze_schedule(ddp, 1) is True and not model.backbone_frozen


@pytest.mark.parametrize("resize_in_train", [True, False])
def test_training_images_keep_the_loaders_size_unless_asked(resize_in_train):
    """The trainer's loader already resized (multi-scale, masks in RLE): with resize_in_train=False
    the backbone sees training images at their own size; eval mode always resizes to min_size."""
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", min_size=32, max_size=48, resize_in_train=resize_in_train), 8, 24)
    seen = []
    model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    img, target = synthetic_image(96, 64, [(8, 8, 40, 60)], [1], [[0]], 24)
    model.train()
    model([img], [target])
    model.eval()
    with torch.no_grad():
        model([img])
    resized = (64, 32)  # 96x64 scaled by min(32/64, 48/96) to 48x32, padded to multiples of 32
    assert seen[0] == (resized if resize_in_train else (96, 64))
    assert seen[1] == resized
