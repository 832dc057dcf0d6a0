"""Resuming on another layout (fewer or other GPUs, other per-rank batch sizes): what it means.

The loader re-plans the rest of the epoch over the samples not yet used (its position is
layout-free; fashionseg/data/loader.py). For the rest of the run:
- the step counter continues: optimizer steps already taken stay taken;
- `train.lr: auto` follows the new global batch (linear scaling); a fixed lr stays;
- run length: a fixed `train.max_steps` stays; with `train.epochs` it becomes the steps done plus
  the rest of this epoch and the remaining epochs, counted on the new layout;
- the schedule (warmup, milestones as fractions of max_steps, cosine) is re-derived for that
  length and continues at its saved position;
- per-rank RNG is reseeded from (seed, step, rank) and the hard miner starts with an empty window:
  neither can be mapped from other ranks (so the run is exactly-once, not bit-exact).
All of it is printed at resume.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from fashionseg.train.config import TrainConfig
from fashionseg.train.distributed import resolved_lr
from fashionseg.train.schedule import LRFactor


def resume_on_new_layout(trainer, meta: dict[str, Any]) -> None:
    t, step, loader = trainer.cfg.train, trainer.state.step, trainer.loader
    old_t = TrainConfig(**{**meta["config"]["train"], "batch_sizes": None})
    old_global = sum(meta["batch_sizes"]) * old_t.accumulate_steps
    old_lr, _ = resolved_lr(old_t, old_global)
    old_max = trainer.max_steps
    if t.max_steps is None:
        left = loader.steps_left() // t.accumulate_steps
        trainer.max_steps = step + left + max(0, t.epochs - loader.epoch - 1) * trainer.steps_per_epoch
    trainer.schedule.factor = LRFactor(t, trainer.max_steps, trainer.warmup)
    trainer.schedule.load_state_dict(trainer.schedule.state_dict())  # re-apply the LR at the saved position
    seed = t.seed * 1000 + 17 + trainer.layout.rank + 7919 * step
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if loader.layout_change:
        trainer.say(loader.layout_change)
    trainer.say(
        f"elastic resume: {meta['world_size']} -> {trainer.layout.world} process(es), per-rank batch {meta['batch_sizes']} -> "
        f"{trainer.layout.batch_sizes}, global batch {old_global} -> {trainer.layout.global_batch}; the step counter "
        f"continues at {step}; lr {old_lr:.6g} -> {trainer.peak_lr:.6g} ({'auto: scales with the global batch' if t.lr == 'auto' else 'fixed'}); "
        + (f"max_steps {trainer.max_steps} (train.max_steps, unchanged)" if t.max_steps is not None else
           f"max_steps {old_max} -> {trainer.max_steps} ({t.epochs} epochs at {trainer.steps_per_epoch} steps/epoch on this layout)")
        + "; the schedule follows it; per-rank RNG reseeded" + ("; hard-miner window emptied" if trainer.miner else ""))
