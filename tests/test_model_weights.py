"""Pretrained weights: local files and the hub cache only; COCO -> fashion heads; the report is logged."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from fashionseg.model.build import ModelConfig, build_model
from fashionseg.model.weights import (
    WeightsNotFoundError, hub_checkpoint_path, load_pretrained, load_state_dict_file,
)

torch.set_num_threads(1)

CLASS_SPECIFIC = {
    "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
    "roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias",
    "roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias",
}


def small(**kw) -> ModelConfig:
    return ModelConfig(rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, **kw)


class Opaque:
    """Not a tensor: torch.load(weights_only=True) must refuse it."""


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """A COCO-shaped (91 classes) torchvision Mask R-CNN state dict with random weights."""
    torch.manual_seed(123)
    coco = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path_factory.mktemp("coco") / "maskrcnn_coco_shaped.pth"
    torch.save(coco.state_dict(), path)
    return path


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_coco_checkpoint_loads_with_class_heads_reinitialised(coco_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="fashionseg"):
        model = build_model(small(pretrained=str(coco_checkpoint)), num_classes=47, num_attributes=294)
    coco = torch.load(coco_checkpoint, weights_only=True)
    own = model.state_dict()
    shared = [k for k in coco if k in own and not k.endswith("num_batches_tracked")]
    for k in shared:
        if k in CLASS_SPECIFIC:
            assert own[k].shape[0] in (47, 47 * 4) and own[k].shape != coco[k].shape
        else:
            assert torch.equal(own[k], coco[k]), k
    assert len(shared) - len(CLASS_SPECIFIC) > 300
    report = model.pretrained_report
    assert "\n" not in report and report.startswith(f"pretrained: loaded {len(shared) - 6} tensors from")
    assert "re-initialised 6 class-specific (91 -> 47 classes): " in report
    assert all(k in report for k in CLASS_SPECIFIC)
    assert "4 not in the file kept their initialisation (roi_heads.attribute_head x4)" in report
    assert "unused" not in report  # BatchNorm's num_batches_tracked vs FrozenBatchNorm2d is not news
    # through logging (no print), so the CLI's logging configuration shows it to the user
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [("fashionseg.model.build", logging.INFO, report)]


def test_named_weights_resolve_from_the_hub_cache_only(coco_checkpoint, empty_hub):
    path, url = hub_checkpoint_path("MaskRCNN_ResNet50_FPN_Weights.COCO_V1")
    assert path == empty_hub / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        build_model(small(pretrained="coco"), 47, 294)
    msg = str(err.value)
    assert str(path) in msg and url in msg
    assert f"curl -L -o {path.name} {url}" in msg
    assert "torchvision.models.get_weight('MaskRCNN_ResNet50_FPN_Weights.COCO_V1').get_state_dict()" in msg

    empty_hub.mkdir(parents=True)
    (empty_hub / path.name).symlink_to(coco_checkpoint)
    by_alias = build_model(small(pretrained="coco"), 47, 294)
    by_name = build_model(small(pretrained="MaskRCNN_ResNet50_FPN_Weights.COCO_V1"), 47, 294)
    assert "MaskRCNN_ResNet50_FPN_Weights.COCO_V1" in by_alias.pretrained_report
    key = "backbone.body.layer1.0.conv1.weight"
    assert torch.equal(by_alias.state_dict()[key], by_name.state_dict()[key])


def test_unknown_pretrained_names_are_clear_errors(empty_hub):
    with pytest.raises(WeightsNotFoundError, match="neither a file nor a torchvision weights name"):
        build_model(small(pretrained="/nowhere/model.pth"), 47, 294)
    with pytest.raises(ValueError, match="no COCO weights for resnet18_fpn"):
        build_model(small(backbone="resnet18_fpn", pretrained="coco"), 47, 294)


def test_imagenet_backbones_load_into_the_body(tmp_path):
    for arch, backbone, unused in (("resnet18", "resnet18_fpn", "fc"), ("mobilenet_v3_large", "mobilenet_v3_large_fpn", "classifier")):
        torch.manual_seed(0)
        classifier = getattr(torchvision.models, arch)(weights=None)
        path = tmp_path / f"{arch}.pth"
        torch.save(classifier.state_dict(), path)
        model = build_model(small(backbone=backbone, pretrained=str(path)), 47, 294)
        body = model.backbone.body.state_dict()
        src = {k.removeprefix("features."): v for k, v in classifier.state_dict().items()}
        assert all(torch.equal(v, src[k]) for k, v in body.items()), arch
        assert f"({'backbone'})" in model.pretrained_report and f"unused from the file ({unused}" in model.pretrained_report


def test_coco_faster_rcnn_mobilenet_keeps_fresh_mask_head(tmp_path):
    coco = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "frcnn_mobilenet.pth"
    torch.save(coco.state_dict(), path)
    model = build_model(small(backbone="mobilenet_v3_large_fpn", pretrained=str(path)), 47, 294)
    report = model.pretrained_report
    assert "re-initialised 4 class-specific (91 -> 47 classes)" in report
    assert "roi_heads.mask_head" in report and "roi_heads.mask_predictor" in report
    assert torch.equal(model.state_dict()["rpn.head.conv.0.0.weight"], coco.state_dict()["rpn.head.conv.0.0.weight"])


def test_checkpoint_wrappers_and_pickles(tmp_path):
    model = build_model(small(backbone="resnet18_fpn"), 47, 294)
    wrapped = {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "step": torch.tensor(7)}
    torch.save(wrapped, tmp_path / "trainer.pth")
    assert set(load_state_dict_file(tmp_path / "trainer.pth")) == set(model.state_dict())
    report = load_pretrained(build_model(small(backbone="resnet18_fpn"), 47, 294), str(tmp_path / "trainer.pth"))
    assert report.kind == "maskrcnn" and not report.reinitialised and not report.new

    torch.save({"model": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(tmp_path / "pickled.pth")
