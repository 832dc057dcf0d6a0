"""Training step time: attribute logits from RoIHeads' own box features vs the old second pass.

`reuse` is the model as built (attributes.py: the attribute head reads the box features of the
sampled positives that RoIHeads already computed). `repool` is the previous path, kept here only
to measure against: RoIAlign and the box head run a second time on the positive proposals.
Both arms start from the same weights and train on the same batch (--batch synthetic images of
--size px with a few garment-like rectangles each); one step = forward, backward, SGD step.
The arms alternate step by step (`--steps` each per repeat, order flipped every repeat), so drift
in the machine's load hits both; the figure per arm is mean +- std over `--repeats` of the mean
ms/step, as wall time and as this process's CPU time (steadier on a shared machine: with one
thread it counts the work, not the waiting).

    OMP_NUM_THREADS=1 python bench/attribute_step.py                      # debug model, CPU
    python bench/attribute_step.py --box-batch 512 --rpn-post 2000 --size 512   # default sampling
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection.roi_heads import RoIHeads

from fashionseg.model.attributes import AttributeRoIHeads
from fashionseg.model.build import ModelConfig, build_model


class RepooledAttributeRoIHeads(AttributeRoIHeads):
    """The previous training path: a second RoIAlign + box head on the positive proposals."""

    def select_training_samples(self, proposals, targets):
        out = super().select_training_samples(proposals, targets)
        self._proposals = out[0]
        return out

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        self._check_attribute_targets(targets)
        result, losses = RoIHeads.forward(self, features, proposals, image_shapes, targets)
        matched_idxs, labels = self._sampled
        boxes, gt = [], []
        for props, idx, lab, t in zip(self._proposals, matched_idxs, labels, targets):
            pos = torch.where(lab > 0)[0]
            boxes.append(props[pos])
            gt.append(t["attributes"][idx[pos]])
        logits = self.attribute_head(self.box_head(self.box_roi_pool(features, boxes, image_shapes)))
        losses["loss_attributes"] = self.attribute_loss(logits, torch.cat(gt))
        self._box_features = self._sampled = self._proposals = None
        return result, losses


def batch(n: int, size: int, num_classes: int, num_attributes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.full((3, size, size), 30, dtype=torch.uint8)
        k = int(torch.randint(3, 7, (1,), generator=g))
        boxes, masks = [], torch.zeros(k, size, size, dtype=torch.uint8)
        for j in range(k):
            x0, y0 = (torch.rand(2, generator=g) * size * 0.6).int().tolist()
            w, h = (torch.rand(2, generator=g) * size * 0.35 + size * 0.05).int().tolist()
            x1, y1 = min(x0 + w, size), min(y0 + h, size)
            img[:, y0:y1, x0:x1] = torch.randint(60, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
            masks[j, y0:y1, x0:x1] = 1
            boxes.append([x0, y0, x1, y1])
        attributes = (torch.rand(k, num_attributes, generator=g) < 0.02).float()
        targets.append(dict(boxes=torch.tensor(boxes, dtype=torch.float32),
                            labels=torch.randint(1, num_classes, (k,), generator=g), masks=masks, attributes=attributes))
        images.append(img)
    return images, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18_fpn")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per arm per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    # configs/debug.yaml's sampling; torchvision's defaults are 512 RoIs / 2000 proposals
    p.add_argument("--box-batch", type=int, default=64)
    p.add_argument("--rpn-post", type=int, default=150)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ModelConfig(backbone=args.backbone, anchor_sizes=(8, 16, 32, 64, 128), mask_head_hidden=64, attribute_hidden=128,
                      rpn_batch_size_per_image=64, box_batch_size_per_image=args.box_batch,
                      rpn_pre_nms_top_n_train=2 * args.rpn_post, rpn_post_nms_top_n_train=args.rpn_post)
    num_classes, num_attributes = 47, 294
    torch.manual_seed(0)
    arms = {"reuse": build_model(cfg, num_classes, num_attributes)}
    arms["repool"] = build_model(cfg, num_classes, num_attributes)
    arms["repool"].load_state_dict(arms["reuse"].state_dict())
    arms["repool"].roi_heads.__class__ = RepooledAttributeRoIHeads
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.002, momentum=0.9) for k, m in arms.items()}
    images, targets = batch(args.batch, args.size, num_classes, num_attributes)

    def step(arm: str, seed: int) -> tuple[float, float]:
        """(wall ms, process CPU ms) of one optimizer step."""
        model, opt = arms[arm], opts[arm]
        torch.manual_seed(seed)  # same RPN / RoI sampling in both arms
        t0, c0 = time.perf_counter(), time.process_time()
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000

    for arm in arms:
        arms[arm].train()
        for i in range(args.warmup):
            step(arm, i)
    # per repeat: the arms alternate step by step (order flipped each repeat), summed per arm
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    for r in range(args.repeats):
        order = ("reuse", "repool") if r % 2 == 0 else ("repool", "reuse")
        totals = {arm: [0.0, 0.0] for arm in arms}
        for i in range(args.steps):
            for arm in order:
                w, c = step(arm, 1000 * r + i)
                totals[arm][0] += w / args.steps
                totals[arm][1] += c / args.steps
        for arm in arms:
            wall[arm].append(totals[arm][0])
            cpu[arm].append(totals[arm][1])
    print(f"# {args.backbone}, {args.size} px, batch {args.batch}, box batch {args.box_batch}, {args.rpn_post} proposals, "
          f"{args.threads} thread(s), {args.repeats} repeats x {args.steps} steps per arm, alternating step by step")
    for name, table in (("wall", wall), ("CPU", cpu)):
        for arm, t in table.items():
            print(f"{name:4s} {arm:7s} {statistics.mean(t):7.1f} +- {statistics.stdev(t):5.1f} ms/step  "
                  f"(repeats: {', '.join(f'{x:.0f}' for x in t)})")
        ratios = [a / b for a, b in zip(table["reuse"], table["repool"])]
        print(f"{name:4s} reuse/repool = {statistics.mean(ratios):.3f} +- {statistics.stdev(ratios):.3f} (per-repeat ratios)")

if __name__ == "__main__":
    main()
