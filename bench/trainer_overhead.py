"""Step time of fashionseg's training loop vs a bare torchvision-reference loop, same model and batches.

Both loops run the same model (built from the same config and seed) on the same decoded batches
held in memory, so the difference is the trainer's own work per step: the stats all-reduce/sync,
loss weighting, non-finite check, schedule, the hooks (MetricLogger, metrics.jsonl, checkpoint
cadence, ...). Rounds alternate (bare, trainer, bare, trainer, ...) so machine noise hits both.

    python bench/trainer_overhead.py --shards shards/demo [--config configs/debug.yaml] [--steps 20] [--rounds 3]

The last line: `trainer_overhead=X.X% (bare S.SSSs/step, trainer T.TTTs/step)`; target <= 3%.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import os

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionseg.model.build import build_model, trainable_parameters  # noqa: E402
from fashionseg.train import config as config_lib  # noqa: E402
from fashionseg.train.data_source import FixedBatches  # noqa: E402
from fashionseg.train.logging import RunLogger  # noqa: E402
from fashionseg.train.loop import RunOptions, Trainer  # noqa: E402
from fashionseg.train.schedule import LRFactor, LRSchedule, build_optimizer  # noqa: E402


def bare_steps(model, optimizer, scheduler: LRSchedule, batches, clip: float | None) -> float:
    """torchvision references/detection/engine.py train_one_epoch, minus its logging (plus the
    same gradient clipping as the trainer when the config asks for it, so both do the same math)."""
    t0 = time.perf_counter()
    for images, targets in batches:
        loss_dict = model(images, targets)
        losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not torch.isfinite(torch.tensor(loss_value)):
            sys.exit(f"bare loop: loss is {loss_value}, stopping training (lower the lr or set train.clip_grad_norm)")
        optimizer.zero_grad()
        losses.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "debug.yaml"))
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    total = args.steps * (args.rounds + 1)
    cfg = config_lib.load(args.config, [f"data.shards={args.shards}", "train.deterministic=false", "log.log_with=[]",
                                        "eval.every_epochs=0", "eval.at_end=false", f"train.max_steps={total}",
                                        f"train.checkpoint_every={10**6}", "log.every=20", "log.rich=false",
                                        # lr 0: the weights never change, so both loops do exactly the
                                        # same detector work every step (proposal counts, positives, ...)
                                        # and only the loops' own overhead differs
                                        "train.lr=0.0",
                                        *args.overrides])
    run_dir = Path(tempfile.mkdtemp(prefix="trainer_overhead_"))
    trainer = Trainer(RunOptions(config=cfg, run_dir=run_dir, shards=args.shards))
    trainer.data = FixedBatches(trainer.loader, min(args.batches, len(trainer.loader)), 1)
    cached = trainer.data.batches
    trainer.logger = RunLogger(run_dir, trainer.accelerator, total, rich=False, window=20)
    trainer.logger.print = lambda text: None  # measure the work, not the terminal
    trainer.hooks = trainer._hooks()
    for h in trainer.hooks:
        h.before_train(trainer)

    torch.manual_seed(cfg.train.seed)
    bare = build_model(cfg.model, trainer.vocab.num_classes, trainer.vocab.num_attributes)
    bare.train()
    opt = build_optimizer(cfg.train, trainable_parameters(bare), trainer.peak_lr)
    sched = LRSchedule(opt, trainer.peak_lr, trainer.schedule.factor)

    def bare_round(n: int) -> float:
        return bare_steps(bare, opt, sched, itertools.islice(itertools.cycle(cached), n), cfg.train.clip_grad_norm) / n

    def trainer_round(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.run_step()
        return (time.perf_counter() - t0) / n

    print(f"model {cfg.model.backbone} at {cfg.data.min_size}px, batch {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} threads, device {trainer.device}")
    bare_round(3), trainer_round(3)  # warm-up (allocator, first-call overheads)
    b, t = [], []
    for r in range(args.rounds):
        b.append(bare_round(args.steps))
        t.append(trainer_round(args.steps))
        print(f"round {r}: bare {b[-1]:.4f}s/step  trainer {t[-1]:.4f}s/step")
    mb, mt = statistics.median(b), statistics.median(t)
    print(f"trainer_overhead={100 * (mt - mb) / mb:.1f}% (bare {mb:.4f}s/step, trainer {mt:.4f}s/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
