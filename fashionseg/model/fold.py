"""Conv-BN folding for inference: a BatchNorm right after a convolution becomes part of it.

At inference a FrozenBatchNorm2d (always) or a BatchNorm2d in eval mode with running statistics
is a per-channel affine map y = (x - mean) * s + beta, s = gamma / sqrt(var + eps). After a
convolution it is the same convolution with weight W * s (per output channel) and bias
(b - mean) * s + beta, so the BatchNorm's pass over the feature map disappears (the Kaggle
write-ups' "+13-15 FPS"). Computed in float64, cast back to the convolution's dtype.

Pairs are found by structure, never by guessing at forward code:
- in an `nn.Sequential` (torchvision's Conv2dNormActivation, ResNet's downsample, MobileNet
  blocks) or an `IntermediateLayerGetter` (the backbone body, ResNet's stem), a Conv2d child
  directly followed by a BatchNorm child, unless the getter returns the conv's own output;
- in ResNet's BasicBlock / Bottleneck, `conv{k}` with `bn{k}`.
The BatchNorm is replaced by nn.Identity, so the state dict changes: a folded model is for
inference only (FashionMaskRCNN refuses `.train()` once `folded` is set).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d


def _foldable(bn: nn.Module) -> bool:
    if isinstance(bn, FrozenBatchNorm2d):
        return True
    return isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None


def _pairs(module: nn.Module):
    """(parent, conv name, bn name) for every foldable conv -> BatchNorm pair directly in `module`."""
    children = list(module.named_children())
    if isinstance(module, (nn.Sequential, IntermediateLayerGetter)):
        returned = getattr(module, "return_layers", {})
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and _foldable(bn) and cname not in returned:
                yield module, cname, bname
    elif isinstance(module, (BasicBlock, Bottleneck)):
        for cname, conv in children:
            bname = "bn" + cname.removeprefix("conv")
            if cname.startswith("conv") and isinstance(conv, nn.Conv2d) and _foldable(getattr(module, bname, None)):
                yield module, cname, bname


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.Module) -> None:
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    scale = weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    dtype = conv.weight.dtype
    conv.weight.copy_((conv.weight.double() * scale.view(-1, *[1] * (conv.weight.dim() - 1))).to(dtype))
    conv.bias = nn.Parameter(((bias - bn.running_mean.double()) * scale + beta.double()).to(dtype),
                             requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every conv -> BatchNorm pair of `model` in place; returns how many were folded."""
    pairs = [p for m in model.modules() for p in _pairs(m)]
    for parent, cname, bname in pairs:
        _fold_pair(getattr(parent, cname), getattr(parent, bname))
        setattr(parent, bname, nn.Identity())
    if hasattr(model, "folded"):
        model.folded = True
    return len(pairs)
