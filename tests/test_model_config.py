"""ModelConfig / build_model validation: bad values fail at config time, naming the key.

Before these checks, zero or negative sizes, empty anchor/ratio lists, negative loss weights and
YAML strings were accepted and failed much later (or never: a negative loss weight trains the
model to get worse), with torch errors that did not name the setting.
"""
from __future__ import annotations

import pytest
import torch

from fashionseg.model.build import BACKBONES, LOSS_NAMES, ModelConfig, build_model


@pytest.mark.parametrize("kw, key", [
    ({"mask_head_hidden": 0}, "mask_head_hidden"),
    ({"box_batch_size_per_image": 0}, "box_batch_size_per_image"), ({"rpn_batch_size_per_image": 0}, "rpn_batch_size_per_image"),
    ({"rpn_pre_nms_top_n_train": 0}, "rpn_pre_nms_top_n_train"), ({"detections_per_img": 0}, "detections_per_img"),
    ({"anchor_sizes": (0, 64, 128, 256, 512)}, "anchor_sizes"), ({"backbone": "mobilenet_v3_large_fpn", "anchor_sizes": ()}, "anchor_sizes"),
    ({"aspect_ratios": ()}, "aspect_ratios"), ({"aspect_ratios": (-1.0,)}, "aspect_ratios"),
    ({"loss_weights": {"loss_mask": -1}}, "loss_weights"), ({"loss_weights": {"loss_mask": "x"}}, "loss_weights"),
    ({"focal_gamma": -1}, "focal_gamma"), ({"trainable_backbone_layers": "3"}, "trainable_backbone_layers"),
    ({"nms_thresh": "0.5"}, "nms_thresh"),
])
def test_bad_values_raise_valueerror_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"^model\.{key}: "):
        ModelConfig(**kw)


def test_valid_values_are_kept_and_normalised():
    cfg = ModelConfig(anchor_sizes=[16, 32, 64, 128, 256], aspect_ratios=[1, 2], focal_gamma=0, loss_weights={"loss_mask": 2})
    assert cfg.anchor_sizes == (16, 32, 64, 128, 256)
    assert cfg.aspect_ratios == (1.0, 2.0) and cfg.focal_gamma == 0.0 and cfg.loss_weights["loss_mask"] == 2.0


def test_float_class_count_is_a_clear_error():
    """Bug: num_classes=49.0 (e.g. computed with /) failed deep in torch.empty()."""
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        build_model(ModelConfig(backbone="mobilenet_v3_large_fpn"), 49.0, 320)


def test_older_fashionpedia_vocabulary_sizes_the_heads():
    """48 categories + background and 320 attributes (older Fashionpedia), on an odd-sized image."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v3_large_fpn", mask_head_hidden=16, attribute_hidden=16,
                      rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    m = build_model(cfg, 49, 320)
    assert m.roi_heads.box_predictor.cls_score.out_features == 49
    assert m.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 49
    masks = torch.zeros(1, 61, 97, dtype=torch.uint8)
    masks[0, 5:30, 10:50] = 1
    target = {"boxes": torch.tensor([[10.0, 5, 50, 30]]), "labels": torch.tensor([48]), "masks": masks,
              "attributes": torch.zeros(1, 320).index_fill_(1, torch.tensor([0, 319]), 1.0)}
    m.train()
    losses = m([torch.rand(3, 61, 97)], [target])
    assert set(losses) == set(LOSS_NAMES) and all(torch.isfinite(v) for v in losses.values())
    m.eval()
    with torch.no_grad():
        out = m([torch.rand(3, 61, 97)])[0]
    assert out["attribute_scores"].shape[1] == 320 and out["masks"].shape[-2:] == (61, 97)


def test_every_backbone_name_is_accepted_by_the_config():
    for b in BACKBONES:
        assert ModelConfig(backbone=b).backbone == b


def test_attribute_targets_of_another_vocabulary_are_named():
    """Bug: targets with 294 attributes fed to a 320-attribute model failed inside the focal loss
    with a bare tensor-size mismatch."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v3_large_fpn", mask_head_hidden=16, attribute_hidden=16)
    m = build_model(cfg, 49, 320).train()
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 5:30, 10:50] = 1
    target = {"boxes": torch.tensor([[10.0, 5, 50, 30]]), "labels": torch.tensor([3]), "masks": masks,
              "attributes": torch.zeros(1, 294)}
    with pytest.raises(ValueError, match=r"targets\[0\]\['attributes'\] has shape \[1, 294\], expected \[1 boxes, 320 attributes\]"):
        m([torch.rand(3, 64, 64)], [target])
