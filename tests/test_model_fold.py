"""Conv-BN folding: every BatchNorm after a convolution disappears, outputs stay within 1e-4."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fashionseg.model.build import ModelConfig, build_model
from fashionseg.model.fold import fold_batchnorm

torch.set_num_threads(1)
NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def small(backbone: str, **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_test=100,
                       rpn_post_nms_top_n_test=50, mask_head_hidden=32, attribute_hidden=32, score_thresh=0.0,
                       detections_per_img=20, **kw)


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Statistics far from identity, as after training; scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.6 + 0.4)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.fixture(scope="module")
def resnet50_imagenet_file(tmp_path_factory):
    """An ImageNet-shaped ResNet-50 state dict (random): loading it makes the body FrozenBatchNorm2d."""
    path = tmp_path_factory.mktemp("r50") / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("backbone", ["resnet18_fpn", "resnet50_fpn", "mobilenet_v3_large_fpn"])
def test_folded_model_matches_within_1e_4(backbone, resnet50_imagenet_file):
    torch.manual_seed(0)
    pretrained = str(resnet50_imagenet_file) if backbone == "resnet50_fpn" else None  # FrozenBatchNorm2d body
    model = build_model(small(backbone, pretrained=pretrained), 8, 24)
    randomise_norms(model)
    model.eval()
    norms = sum(isinstance(m, NORMS) for m in model.modules())
    assert norms > 0 and any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == (pretrained is not None)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == norms
    assert not any(isinstance(m, NORMS) for m in folded.modules())

    images = [torch.rand(3, 96, 80, generator=torch.Generator().manual_seed(1)),
              torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        batch, _ = model.transform(images)
        ref_features, fold_features = model.backbone(batch.tensors), folded.backbone(batch.tensors)
        ref, out = model(images), folded(images)
    for k, v in ref_features.items():
        assert (fold_features[k] - v).abs().max() <= 1e-4 * max(1.0, v.abs().max().item()), k
    for a, b in zip(ref, out):
        assert len(a["boxes"]) > 0 and torch.equal(a["labels"], b["labels"])
        for k in ("boxes", "scores", "masks", "attribute_scores"):
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), k


def test_folded_model_is_inference_only():
    model = build_model(small("resnet18_fpn"), 8, 24).eval()
    fold_batchnorm(model)
    assert model.folded
    with pytest.raises(RuntimeError, match="fold=False"):
        model.train()


def test_batchnorm_in_training_mode_or_without_statistics_is_left_alone():
    """A BatchNorm that normalises with batch statistics is not an affine map: nothing to fold."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    assert fold_batchnorm(seq) == 0  # training mode
    seq.eval()
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], nn.Identity) and isinstance(seq[3], nn.BatchNorm2d)
