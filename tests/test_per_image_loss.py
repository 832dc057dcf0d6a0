"""Per-image losses (model/per_image_loss.py): from the same forward, the batch losses unchanged,
one image = the batch loss bit for bit, and the documented weighted means give the batch value."""
from __future__ import annotations

import pytest
import torch
from test_model import synthetic_image, tiny_config

from fashionseg.model.build import LOSS_NAMES, build_model

torch.set_num_threads(1)
NUM_CLASSES, NUM_ATTRIBUTES = 47, 294


def images(n: int):
    """`n` images of one size (the loader pads a batch anyway) with 0-3 instances each; one has none."""
    out = []
    for i in range(n):
        rects = [(8 + 4 * i, 8, 40 + 4 * i, 60), (50, 20 + 2 * i, 90, 70), (20, 64, 60, 90)][: (i % 4)]
        img, t = synthetic_image(96, 96, rects, [1 + i % 5, 3, 7][: len(rects)],
                                 [[0, 4], [], [2, 11, 19]][: len(rects)], NUM_ATTRIBUTES)
        t["boxes"], t["labels"] = t["boxes"].reshape(-1, 4), t["labels"].long()
        out.append((img, t))
    return out


def model_with(**kw):
    torch.manual_seed(0)
    model = build_model(tiny_config("resnet18_fpn", **kw), NUM_CLASSES, NUM_ATTRIBUTES)
    return model.train()


def run(model, batch, seed=0, **kw):
    torch.manual_seed(seed)  # the RPN/RoI samplers draw at random: same seed, same draw
    imgs, targets = zip(*batch)
    return model(list(imgs), list(targets), **kw)


def test_batch_losses_and_gradients_are_unchanged():
    batch = images(3)
    model = model_with()
    plain = run(model, batch)
    sum(plain.values()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    losses, per_image = run(model, batch, image_losses=True)
    sum(losses.values()).backward()
    assert all(torch.equal(plain[k], losses[k]) for k in plain)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))
    assert sorted(per_image) == sorted(LOSS_NAMES)
    assert all(v.shape == (3,) and not v.requires_grad and torch.isfinite(v).all() for v in per_image.values())
    assert model.rpn.loss_inputs is None and model.roi_heads.loss_inputs is None  # nothing kept after the forward


@pytest.mark.parametrize("attribute_loss", ["focal", "bce"])
def test_one_image_equals_the_batch_loss_exactly(attribute_loss):
    model = model_with(attribute_loss=attribute_loss, loss_weights={"loss_mask": 2.0})
    for i, sample in enumerate(images(4)[1:]):
        losses, per_image = run(model, [sample], seed=i, image_losses=True)
        for k in LOSS_NAMES:
            assert per_image[k].shape == (1,)
            assert per_image[k][0].item() == losses[k].item(), k


def test_weighted_means_of_the_images_give_the_batch_loss():
    """The relation stated in per_image_loss.py, with the counts read off the forward's samples."""
    model = model_with(attribute_loss="focal")
    batch = images(4)
    seen = {}
    rpn_compute, roi_forward = model.rpn.compute_loss, model.roi_heads.forward

    def keep_rpn(*a):
        out = rpn_compute(*a)
        seen["rpn"] = model.rpn.loss_inputs
        return out

    def keep_roi(*a, **k):
        out = roi_forward(*a, **k)
        seen["roi"] = model.roi_heads.loss_inputs
        return out

    model.rpn.compute_loss, model.roi_heads.forward = keep_rpn, keep_roi
    losses, per_image = run(model, batch, image_losses=True)
    rpn, roi = seen["rpn"], seen["roi"]
    s = torch.tensor([float(p.sum() + n.sum()) for p, n in zip(rpn.pos, rpn.neg)])
    n = torch.tensor([float(len(l)) for l in roi.labels])
    p = torch.tensor([float(len(x)) for x in roi.positives])
    t = torch.tensor([float(x.sum()) for x in roi.attribute_targets])
    assert p[0] == 0 and (p[1:] > 0).all() and per_image["loss_mask"][0] == 0  # no instance: no positive RoI

    def mean(k, w, denominator=None):
        return (w * per_image[k]).sum() / (w.sum() if denominator is None else denominator)

    expected = {"loss_objectness": mean("loss_objectness", s), "loss_rpn_box_reg": mean("loss_rpn_box_reg", s),
                "loss_classifier": mean("loss_classifier", n), "loss_box_reg": mean("loss_box_reg", n),
                "loss_mask": mean("loss_mask", p),
                "loss_attributes": mean("loss_attributes", t.clamp(min=1), t.sum().clamp(min=1))}
    for k, v in expected.items():
        assert v.item() == pytest.approx(losses[k].item(), rel=1e-5, abs=1e-7), k
