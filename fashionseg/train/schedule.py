"""Optimizer and learning-rate schedule built from `TrainConfig`.

The schedule is a `LambdaLR` (a component with `state_dict()`), stepped once per optimizer step
that was actually taken: linear warmup from `warmup_factor` (seed 000: 1/1000 over
min(1000, steps_per_epoch - 1) iterations, torchvision's reference), then multistep decay at
fractions of the run or a cosine to `min_lr_factor`.
"""
from __future__ import annotations

import math

import torch

from fashionseg.train.config import TrainConfig


def default_warmup_iters(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_iters is not None:
        return max(0, cfg.warmup_iters)
    return max(0, min(1000, steps_per_epoch - 1))


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (the Mask R-CNN recipe) or AdamW; no weight decay on norms and biases
    (torchvision's `norm_weight_decay=0` practice)."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


class LRFactor:
    """lr(step) / peak lr: a pure function of the optimizer step, so resume is exact."""

    def __init__(self, cfg: TrainConfig, total_steps: int, warmup_iters: int) -> None:
        self.schedule = cfg.schedule
        self.total = max(1, total_steps)
        self.warmup_iters = warmup_iters
        self.warmup_factor = cfg.warmup_factor
        self.milestones = sorted(int(round(m * total_steps)) for m in cfg.milestones)
        self.gamma = cfg.gamma
        self.min_factor = cfg.min_lr_factor

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup_iters:  # torchvision's linear warmup
            alpha = step / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        if self.schedule == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestones)
        if self.schedule == "cosine":
            t = min(max(step - self.warmup_iters, 0) / max(1, self.total - self.warmup_iters), 1.0)
            return warm * (self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        return warm


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRFactor(cfg, total_steps, warmup_iters))
