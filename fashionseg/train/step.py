"""One optimizer step: forward and backward over the step's micro-batches, then step or skip.

Cost notes (nanoGPT-style):
- One host sync per optimizer step: every micro-batch's loss terms stay on the device; after the
  last forward one all-reduce carries [terms x b, total x b, non-finite count, stop flag, b] and a
  single `.tolist()` brings it (and this rank's own terms, for the miner, and with
  `image_losses=True` every term of every local image, for the per-image miner) to the host.
- Uneven per-rank batches: rank r scales its mean loss by b_r W / sum(b) (distributed.py), so DDP's
  equal-weight gradient average is the gradient of the global-batch mean.
- A non-finite loss on any rank skips the step on every rank: the last backward is poisoned so
  every backend sees non-finite gradients, and the backend does not move anything (backend.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass
class StepOutput:
    losses: dict[str, float] | None   # global-batch means of each term and "loss"; None when skipped
    skipped: bool                     # nothing moved: non-finite loss somewhere, or an fp16 overflow
    stop: bool                        # some rank was asked to stop (signal): every rank agrees
    images: int                       # images in the global batch of this step
    data_time: float                  # seconds this rank waited for its batches
    keys: list[str] = field(default_factory=list)            # this rank's sample keys
    local_losses: dict[str, float] = field(default_factory=dict)  # this rank's own means (hard miner)
    image_losses: list[dict[str, float]] = field(default_factory=list)  # per local image (image_losses=True)


def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    nb = device.type == "cuda"  # with pinned host memory the copy overlaps compute
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


class Stepper:
    """`stepper(batches, n_micro) -> StepOutput`: the whole of one optimizer step."""

    def __init__(self, model, backend, device: torch.device, loss_weight: float, world_size: int,
                 stop_requested: Callable[[], bool], image_losses: bool = False) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.loss_weight, self.world_size, self.stop_requested = loss_weight, world_size, stop_requested
        self.image_losses = image_losses  # every term per image too (the per-image miner), same sync

    def __call__(self, batches: Iterator, n_micro: int) -> StepOutput:
        data_time, keys, sums, local_n, per_image = 0.0, [], None, 0, []
        for i in range(n_micro):
            t0 = time.perf_counter()
            images, targets = next(batches)
            data_time += time.perf_counter() - t0
            keys += [t["key"] for t in targets]
            images, targets = to_device(images, targets, self.device)
            last = i == n_micro - 1
            with self.backend.micro(last):
                if self.image_losses:
                    loss_dict, image_terms = self.model(images, targets, image_losses=True)
                else:
                    loss_dict = self.model(images, targets)
                names = sorted(loss_dict)
                total = sum(loss_dict.values())
                b = len(images)
                terms = torch.stack([loss_dict[k].detach().float() for k in names] + [total.detach().float()]) * b
                sums = terms if sums is None else sums + terms
                local_n += b
                if self.image_losses:  # [b, terms + total]
                    rows = [image_terms[k] for k in names]
                    per_image.append(torch.stack([*rows, sum(rows)], dim=1).to(terms.device))
                if last:
                    reduced, local, flat = self._exchange(sums, local_n, per_image)  # the step's one host sync
                    skip = reduced[-3] > 0
                # rank r's share of the global-batch mean, split over the step's micro-batches
                loss = total * (self.loss_weight / n_micro)
                if last and skip:
                    loss = loss * float("nan")  # every rank skips: make every backend see it
                self.backend.backward(loss, last)
        applied = self.backend.step(skip)
        n = reduced[-1]
        losses = None
        if applied:
            losses = {k: reduced[j] / n for j, k in enumerate(names)}
            losses["loss"] = reduced[len(names)] / n
        width = len(names) + 1
        image_rows = [dict(zip([*names, "loss"], flat[i:i + width])) for i in range(0, len(flat), width)]
        return StepOutput(losses, not applied, reduced[-2] > 0, int(round(n)), data_time, keys,
                          dict(zip([*names, "loss"], local)), image_rows)

    def _exchange(self, sums: torch.Tensor, local_n: int,
                  per_image: list[torch.Tensor]) -> tuple[list[float], list[float], list[float]]:
        """(all-reduced [terms..., total, non-finite, stop, images], this rank's mean terms, this
        rank's per-image terms flattened image after image), in one transfer to the host."""
        nonfinite = (~torch.isfinite(sums)).any().float().reshape(1)
        flags = torch.tensor([float(self.stop_requested()), float(local_n)], device=sums.device)
        vec = torch.cat([torch.nan_to_num(sums, nan=0.0, posinf=0.0, neginf=0.0), nonfinite, flags])
        if self.world_size > 1:
            torch.distributed.all_reduce(vec)
        out = torch.cat([vec, sums / local_n, *(p.flatten() for p in per_image)]).tolist()
        k = vec.numel() + sums.numel()
        return out[: vec.numel()], out[vec.numel():k], out[k:]
