"""Mask R-CNN + attribute head: every backbone trains and predicts on CPU, losses fall on a tiny set."""
from __future__ import annotations

import logging

import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d, box_iou

from fashionseg.model.attributes import AttributeLoss
from fashionseg.model.build import (
    BACKBONES, LOSS_NAMES, ModelConfig, apply_freeze_schedule, build_model, set_postprocess, trainable_parameters,
)

torch.set_num_threads(1)


def tiny_config(backbone: str, **kw) -> ModelConfig:
    """Small enough for a 2-core CPU: 64-96 px, a few dozen proposals and RoIs."""
    small_anchors = (16, 32, 64) if backbone == "mobilenet_v3_large_fpn" else (16, 32, 64, 128, 256)
    base = dict(backbone=backbone, anchor_sizes=small_anchors,
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
    """60 AdamW steps on two synthetic images: each of the six terms falls below half its start,
    and at inference the detection on each object scores its own attributes above the others.
    (The attribute head learns on detached box features by default, attribute_grad_scale=0: it
    separates the objects' attributes once detection has shaped them; 40 steps were not enough.)"""
    torch.manual_seed(0)
    num_attributes = 20
    data = two_images(num_attributes)
    images, targets = [d[0] for d in data], [d[1] for d in data]
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), num_classes=6, num_attributes=num_attributes)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(60):
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


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_attribute_grad_scale_scales_only_what_reaches_the_shared_box_head(scale):
    """Same losses; the attribute loss's gradient into box_head is `scale` x the full one, while
    the attribute head itself learns at full strength (the accuracy bench's finding, README)."""
    img, target = two_images(294)[0]

    def grads(s):
        torch.manual_seed(0)
        model = build_model(tiny_config("resnet18_fpn", attribute_grad_scale=s), 47, 294)
        torch.manual_seed(1)
        losses = model([img], [target])
        losses["loss_attributes"].backward()
        heads = model.roi_heads
        shared = heads.box_head.fc7.weight
        shared_grad = torch.zeros_like(shared) if shared.grad is None else shared.grad.clone()  # detached: none
        return losses, shared_grad, heads.attribute_head.logits.weight.grad.clone()

    full, scaled = grads(1.0), grads(scale)
    assert all(torch.equal(full[0][k], scaled[0][k]) for k in full[0])
    assert torch.equal(full[2], scaled[2])
    assert full[1].abs().sum() > 0
    assert torch.allclose(scaled[1], scale * full[1], atol=1e-8, rtol=1e-5)
    with pytest.raises(ValueError, match="model.attribute_grad_scale"):
        ModelConfig(attribute_grad_scale=1.5)


def test_loss_weights_from_config_partial_and_validated():
    cfg = ModelConfig(loss_weights={"loss_attributes": 0.5})
    assert cfg.loss_weights == {**{k: 1.0 for k in LOSS_NAMES}, "loss_attributes": 0.5}
    with pytest.raises(ValueError, match="model.loss_weights.*loss_attribute"):
        ModelConfig(loss_weights={"loss_attribute": 1.0})
    with pytest.raises(ValueError, match="model.backbone"):
        ModelConfig(backbone="resnet101_fpn")
    with pytest.raises(ValueError, match="model.anchor_sizes"):
        ModelConfig(anchor_sizes=(32, 64))


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


def test_freeze_schedule_trains_heads_only_then_everything(caplog):
    caplog.set_level(logging.INFO, logger="fashionseg")
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
    # each change is logged once (no print), so the CLI's logging configuration shows it
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("fashionseg.model.build", "backbone frozen (heads only) at step 0"),
        ("fashionseg.model.build", "backbone unfrozen at step 2")]


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


def test_the_model_never_resizes():
    """The data layer owns every resize: the backbone sees each image at its own size (padded to
    a multiple of 32) in training and at inference, and the old resize keys are gone."""
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn"), 8, 24)
    seen = []
    model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[-2:])))
    img, target = synthetic_image(96, 64, [(8, 8, 40, 60)], [1], [[0]], 24)
    model.train()
    model([img], [target])
    model.eval()
    with torch.no_grad():
        (out,) = model([img])
    assert seen == [(96, 64), (96, 64)]
    assert out["masks"].shape[-2:] == (96, 64)
    for key in ("min_size", "max_size", "resize_in_train"):
        with pytest.raises(TypeError, match=key):
            ModelConfig(**{key: 96})


def test_uint8_images_give_the_same_losses_and_detections_as_float():
    """Contract 2: uint8 [3, H, W] is converted with float() / 255 by the model itself."""
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), 8, 24)
    img, target = synthetic_image(80, 96, [(8, 8, 40, 60), (50, 20, 90, 70)], [1, 3], [[0, 4], [7]], 24)
    as_uint8 = (img * 255).round().to(torch.uint8)
    as_float = as_uint8.float() / 255
    model.train()
    runs = []
    for image in (as_uint8, as_float):
        torch.manual_seed(1)  # same RPN / RoI sampling
        runs.append(model([image], [target]))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in LOSS_NAMES)
    model.eval()
    with torch.no_grad():
        (a,), (b,) = model([as_uint8]), model([as_float])
    assert len(a["boxes"]) > 0 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class DiscMasks(torch.nn.Module):
    """Mask predictor stand-in: the same disc (logit 10 * (0.4 - r)) in every RoI, for every class,
    so a pasted mask has a known shape at any output size."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
        disc = 10 * (0.4 - (yy ** 2 + xx ** 2).sqrt())
        return disc.expand(len(x), self.num_classes, 28, 28)


def test_output_sizes_scale_boxes_and_paste_masks_at_that_size():
    """Contract 3: at output_sizes=(2H, 2W) the boxes double and the masks, pasted straight at that
    size, agree with the input-grid masks (nearest-upsampled) up to the edge pixels."""
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), 8, 24).eval()
    model.roi_heads.mask_predictor = DiscMasks(8)
    img, _ = synthetic_image(80, 96, [(8, 8, 40, 60), (50, 20, 90, 70)], [1, 3], [[0, 4], [7]], 24)
    with torch.no_grad():
        (small,) = model([img])
        (big,) = model([img], output_sizes=[(160, 192)])
    n = len(small["boxes"])
    assert n > 0 and big["masks"].shape == (n, 1, 160, 192) and small["masks"].shape == (n, 1, 80, 96)
    assert torch.allclose(big["boxes"], small["boxes"] * 2)
    for k in ("labels", "scores", "attribute_scores"):
        assert torch.equal(big[k], small[k])
    up = torch.nn.functional.interpolate(small["masks"], scale_factor=2, mode="nearest") > 0.5
    pasted = big["masks"] > 0.5
    inter, union = (up & pasted).flatten(1).sum(1), (up | pasted).flatten(1).sum(1)
    solid = up.flatten(1).sum(1) >= 4 * 150  # >= 150 px at the input grid: edges do not dominate
    assert solid.sum() >= 3
    assert (inter[solid] / union[solid]).min() > 0.88
    # the pasted disc lies inside its (doubled) box: nothing is resampled from another grid
    for box, mask in zip(big["boxes"][solid], pasted[solid]):
        ys, xs = torch.where(mask[0])
        assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() and ys.min() >= box[1].floor() - 1
    with pytest.raises(ValueError, match="one \\(H, W\\) per image"):
        model([img, img], output_sizes=[(160, 192)])


def test_detections_are_torchvisions_and_carry_their_proposals_attributes():
    """Inference keeps torchvision's detections exactly; each detection's attribute scores are the
    attribute head on the box features of the proposal it was decoded from (no second RoIAlign)."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.ops import clip_boxes_to_image

    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", score_thresh=0.0), 8, 24).eval()
    heads = model.roi_heads
    images = [d[0] for d in two_images(24)]
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        logits, regression = heads.box_predictor(box_features)
        ours = heads.postprocess_detections(logits, regression, proposals, batch.image_sizes)
        rows = heads._detection_rows
        theirs = RoIHeads.postprocess_detections(heads, logits, regression, proposals, batch.image_sizes)
        outputs = model(images)
    decoded = heads.box_coder.decode(regression, proposals)
    probs = logits.softmax(-1)
    for i, out in enumerate(outputs):
        boxes, scores, labels = ours[0][i], ours[1][i], ours[2][i]
        assert len(boxes) > 0 and all(torch.equal(a[i], b[i]) for a, b in zip(ours, theirs))
        assert torch.equal(out["boxes"], boxes) and torch.equal(out["labels"], labels)
        size = batch.image_sizes[i]
        assert torch.equal(clip_boxes_to_image(decoded[rows[i], labels], size), boxes)  # its own proposal
        assert torch.equal(probs[rows[i], labels], scores)
        expected = heads.attribute_head(box_features[rows[i]]).sigmoid()
        assert torch.allclose(out["attribute_scores"], expected, atol=1e-6)


def test_attribute_loss_is_computed_on_the_sampled_positives():
    """Training: loss_attributes equals the loss of the attribute head on the sampled positive
    proposals, re-pooled here the old way, against the attributes of their matched ground truth."""
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn"), 8, 24).train()
    heads = model.roi_heads
    data = two_images(24)
    images, targets = [d[0] for d in data], [d[1] for d in data]
    seen = {}
    heads.register_forward_pre_hook(lambda mod, args: seen.update(features=args[0], image_sizes=args[2]))
    sample = heads.select_training_samples

    def keep_samples(proposals, tgts):
        seen["samples"] = sample(proposals, tgts)
        return seen["samples"]

    heads.select_training_samples = keep_samples
    losses = model(images, targets)
    proposals, matched, labels, _ = seen["samples"]
    boxes, gt = [], []
    for props, idx, lab, t in zip(proposals, matched, labels, targets):
        pos = torch.where(lab > 0)[0]
        boxes.append(props[pos])
        gt.append(t["attributes"][idx[pos]])
    assert sum(len(b) for b in boxes) > 0
    repooled = heads.box_head(heads.box_roi_pool(seen["features"], boxes, seen["image_sizes"]))
    expected = heads.attribute_loss(heads.attribute_head(repooled), torch.cat(gt))
    assert torch.allclose(losses["loss_attributes"], expected, rtol=1e-5)
