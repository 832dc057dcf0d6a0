"""Optimizer and learning-rate schedule built from `TrainConfig`, and `fashionseg schedule`.

The schedule saves only its position (optimizer steps taken that count in the schedule); the LR
is recomputed from the *current* config at every step, so `--resume train.max_steps=<more>` follows
the new schedule. Shape: linear warmup from `warmup_factor` over `warmup_iters` (default
min(1000, steps_per_epoch - 1), torchvision's detection reference), then multistep decay at
fractions of the run, a cosine to `min_lr_factor`, or `cosine_restarts`: the same cosine restarted
`cycles` times (SGDR without growth, Huang et al.'s snapshot ensembles) over equal cycles after the
warmup; `LRFactor.cycle_ends()` are the positions where a cycle ends (a snapshot is kept there).
"""
from __future__ import annotations

import argparse
import bisect
import math
from typing import Any

import torch

from fashionseg.train.config import ConfigError, TrainConfig


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
    """lr(step) / peak lr: a pure function of the schedule position."""

    def __init__(self, cfg: TrainConfig, total_steps: int, warmup_iters: int) -> None:
        self.schedule = cfg.schedule
        self.total = max(1, total_steps)
        self.warmup_iters = warmup_iters
        self.warmup_factor = cfg.warmup_factor
        self.milestones = sorted(int(round(m * total_steps)) for m in cfg.milestones)
        self.gamma = cfg.gamma
        self.min_factor = cfg.min_lr_factor
        self.cycles = cfg.cycles if cfg.schedule == "cosine_restarts" else 1
        span = self.total - warmup_iters
        if self.schedule == "cosine_restarts" and span < self.cycles:
            raise ConfigError(f"train.cycles={self.cycles} leaves less than one step per cycle: {self.total} steps minus "
                              f"{warmup_iters} warmup steps; lower train.cycles or raise the run length")
        # cycle k covers positions [ends[k-1], ends[k]); the last one ends with the run
        self._ends = [warmup_iters + (k * span) // self.cycles for k in range(self.cycles + 1)]

    def cycle_ends(self) -> list[int]:
        """Positions after which cycle 1..K is complete (the last one is the run's length)."""
        return self._ends[1:]

    def _cosine(self, t: float) -> float:
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))

    def __call__(self, step: int) -> float:
        warm = 1.0
        if step < self.warmup_iters:  # torchvision's linear warmup
            alpha = step / self.warmup_iters
            warm = self.warmup_factor * (1 - alpha) + alpha
        if self.schedule == "multistep":
            return warm * self.gamma ** sum(step >= m for m in self.milestones)
        if self.schedule == "cosine":
            return warm * self._cosine(max(step - self.warmup_iters, 0) / max(1, self.total - self.warmup_iters))
        if self.schedule == "cosine_restarts":
            if step >= self._ends[-1]:
                return warm * self.min_factor
            k = max(0, bisect.bisect_right(self._ends, step) - 1)  # the cycle this position lies in
            start, end = self._ends[k], self._ends[k + 1]
            return warm * self._cosine((step - start) / (end - start))
        return warm


class LRSchedule:
    """Sets the optimizer's LR to peak x LRFactor(position). Stateful: only the position is saved."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, factor: LRFactor) -> None:
        self.optimizer, self.peak_lr, self.factor = optimizer, peak_lr, factor
        self.position = 0
        self._apply()

    def lr(self) -> float:
        return self.peak_lr * self.factor(self.position)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr()

    def step(self) -> None:
        self.position += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self._apply()


# -- `fashionseg schedule` -------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--steps-per-epoch", type=int, required=True, metavar="N",
                   help="optimizer steps per epoch of the run (see `shard plan`)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="images per optimizer step for lr: auto (default: train.batch_sizes' sum, else train.batch_size x accumulate)")
    p.add_argument("--png", default=None, help="also plot the LR over the run into this PNG")
    p.add_argument("--every", type=int, default=None, help="print every K-th step (default: about 20 rows)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def run(args: argparse.Namespace) -> int:
    """Print (and plot) the LR a run will use at each step, before anyone spends a night on it.

    `iter` is the 0-based iteration torchvision's reference logs ("[100/22812]"); its `lr` is the
    value after that iteration's scheduler update, as the reference and metrics.jsonl log it."""
    import sys

    from fashionseg.train import config as config_lib
    from fashionseg.train.distributed import resolved_lr

    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = cfg.train
    if args.steps_per_epoch < 1:
        print("error: --steps-per-epoch must be >= 1", file=sys.stderr)
        return 2
    batch = args.global_batch or (sum(t.batch_sizes) if t.batch_sizes else t.batch_size) * t.accumulate_steps
    peak, how = resolved_lr(t, batch)
    total = t.max_steps if t.max_steps is not None else t.epochs * args.steps_per_epoch
    warmup = default_warmup_iters(t, args.steps_per_epoch)
    factor = LRFactor(t, total, warmup)
    lrs = [peak * factor(s) for s in range(1, total + 1)]  # lr after step s's update
    every = args.every or max(1, total // 20)
    print(f"peak lr {peak:.6g} ({how}); warmup {warmup} steps from x{t.warmup_factor:g}; {t.schedule} over {total} steps "
          f"({total / args.steps_per_epoch:.2f} epochs of {args.steps_per_epoch})")
    ends = factor.cycle_ends() if t.schedule == "cosine_restarts" else []
    if ends:
        print(f"{len(ends)} cycles; a snapshot after steps {', '.join(map(str, ends))} (RUN_DIR/snapshots/cycle_<k>.pth)")
    print(f"{'iter':>8} {'epoch':>6} {'lr':>12}")
    shown = sorted({i for i in range(0, total, every)} | {0, min(100, total - 1), min(200, total - 1),
                                                          min(500, total - 1), max(warmup - 1, 0), total - 1}
                   | {e - 1 for e in ends} | {e for e in ends if e < total})
    for i in shown:
        print(f"{i:>8} {i // args.steps_per_epoch:>6} {lrs[i]:>12.6f}")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fashionseg.io import atomic_open

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(range(total), lrs)
        ax.set_xlabel("iteration")
        ax.set_ylabel("lr")
        ax.set_title(f"{args.config}: {t.schedule}, warmup {warmup}")
        fig.tight_layout()
        with atomic_open(args.png, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        print(f"plot: {args.png}")
    return 0
