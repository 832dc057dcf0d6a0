"""The training policies, one hook each (detectron2's HookBase): each owns its state and decides
for itself when to act. The loop (loop.py) only calls them in order around every step.

Order matters and is the trainer's list: counters and the non-finite guard first (they decide
whether a checkpoint may be written), then replay, freeze, logging, samples record, checkpoint,
evaluation, and the stop signal last (it ends the run after the checkpoint was written).
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from fashionseg.io import atomic_write_text
from fashionseg.train import checkpoint as ckpt_lib
from fashionseg.train.evaluation import split_size
from fashionseg.train.image_mining import load_replay
from fashionseg.train.step import StepOutput

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class Hook:
    """Called by the Trainer (loop.py), which it receives as `trainer`."""

    def before_train(self, trainer) -> None: ...
    def after_step(self, trainer, out: StepOutput) -> None: ...
    def after_train(self, trainer) -> None: ...


class NonFiniteGuard(Hook):
    """Counts skipped steps; `train.max_nonfinite` in a row abort the run, naming the last good
    checkpoint (no checkpoint is written during such a streak, see Checkpointing)."""

    def after_step(self, trainer, out):
        s = trainer.state
        if out.skipped:
            s.skipped_steps += 1
            s.consecutive_nonfinite += 1
        else:
            s.consecutive_nonfinite = 0
        if s.consecutive_nonfinite >= trainer.cfg.train.max_nonfinite:
            last = ckpt_lib.latest_checkpoint(trainer.run_dir)
            raise TrainingError(
                f"{s.consecutive_nonfinite} non-finite losses in a row (step {s.step}): stopping. "
                f"The last good checkpoint is {last if last else 'none (no checkpoint was written yet)'}; "
                "lower train.lr, check the data with `shard verify`, or run --debug --detect-anomaly")


class HardMiningReplay(Hook):
    """After each step the miner sees this rank's batch (and, unit=image, each image's losses); at
    the steps its trigger names (the same on every rank) each rank takes an extra optimizer step on
    its hardest stored batch, or on a batch of its hardest pooled images."""

    def __init__(self, miner, loader) -> None:
        self.miner, self.loader = miner, loader

    def after_step(self, trainer, out):
        # a skipped step is never mined: every term non-finite, whichever term the miner ranks by
        nan = {k: float("nan") for k in out.local_losses} or {"loss": float("nan")}
        loss = out.local_losses if not out.skipped else nan
        images = out.image_losses if not out.skipped else [nan] * len(out.keys)
        self.miner.observe(trainer.state.step, out.keys, trainer.data.epoch, loss, images)
        if not self.miner.should_replay(trainer.state.step):
            return
        for _ in range(self.miner.replays_per_trigger):
            batch = load_replay(self.loader, self.miner.pop())
            replay = trainer.stepper(iter([batch]), 1)
            if not replay.skipped and self.miner.count_in_schedule:
                trainer.schedule.step()
            after = None if replay.skipped else trainer.measure_loss(batch)
            trainer.state.replays += 1
            self.miner.record_replay(replay.local_losses.get("loss", float("nan")), after)

    def row(self) -> dict[str, float]:
        return {f"hard_mining/{k}": v for k, v in self.miner.stats().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


class FreezeSchedule(Hook):
    """The model's freeze-then-unfreeze schedule (model.freeze_backbone_steps)."""

    def __init__(self, apply) -> None:
        self.apply = apply

    def before_train(self, trainer):
        self.apply(trainer.model, trainer.state.step)

    def after_step(self, trainer, out):
        self.apply(trainer.model, trainer.state.step)


class MetricsLog(Hook):
    """torchvision's MetricLogger line and one metrics.jsonl row every `log.every` steps, at the end
    of an epoch and at the last step (means over the steps since the previous row)."""

    def __init__(self, logger, every: int, extra_rows=()) -> None:
        self.logger, self.every, self.extra_rows = logger, every, list(extra_rows)
        self.step_losses: list[float] = []  # finite total losses, for the overfit verdict
        self._end = None

    def before_train(self, trainer):
        self._end = time.perf_counter()

    def after_step(self, trainer, out):
        now = time.perf_counter()
        step_time, self._end = now - self._end, now
        ml, lr = self.logger.metric_logger, trainer.schedule.lr()
        if out.losses is not None:
            ml.update(**out.losses)
            self.step_losses.append(out.losses["loss"])
        ml.lr.update(lr)
        ml.iter_time.update(step_time)
        ml.data_time.update(out.data_time)
        self.logger.interval.add(out.losses, step_time, out.data_time, out.images)
        self.logger.advance(trainer.state.step)
        step = trainer.state.step
        if step % self.every and step != trainer.max_steps and not trainer.data.epoch_ended:
            return
        row: dict[str, Any] = {"step": step, "epoch": trainer.data.last_epoch, "lr": lr, **self.logger.interval.row(),
                               "skipped_steps": trainer.state.skipped_steps}
        for extra in self.extra_rows:
            row.update(extra())
        if torch.cuda.is_available():
            row["max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.logger.interval.reset()
        self.logger.write_row(row, step)
        i = trainer.data.step_in_epoch
        self.logger.print(ml.line(trainer.data.last_epoch, i, trainer.steps_per_epoch)
                          + (f"  skipped: {trainer.state.skipped_steps}" if trainer.state.skipped_steps else "")
                          + f"  data_wait: {row['data_wait_frac']:.0%}")


class SampleRecord(Hook):
    """`samples.jsonl` (train.record_samples): one row per rank and step with the sample keys it
    trained on. Each rank appends to its own part file; rank 0 merges the rows kept from before a
    resume (`.samples.base.jsonl`, rows up to the checkpoint's step, any layout) and the current
    ranks' parts at every checkpoint and at the end, so the file is what the run trained on."""

    FILE, BASE = "samples.jsonl", ".samples.base.jsonl"

    def __init__(self, run_dir: Path, rank: int, world: int) -> None:
        self.run_dir, self.rank, self.world = Path(run_dir), rank, world
        self._f = None

    def _part(self, rank: int) -> Path:
        return self.run_dir / f".samples.rank{rank}.jsonl"

    def before_train(self, trainer):
        if self.rank == 0:
            keep = [r for r in _read_jsonl(self.run_dir / self.FILE) if r["step"] <= trainer.state.step]
            atomic_write_text(self.run_dir / self.BASE, "".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(self._part(self.rank), "w", buffering=1)
        trainer.accelerator.wait_for_everyone()

    def after_step(self, trainer, out):
        self._f.write(json.dumps({"step": trainer.state.step, "epoch": trainer.data.last_epoch, "rank": self.rank,
                                  "keys": out.keys, "skipped": out.skipped}) + "\n")

    def merge(self, trainer) -> None:
        """Collective: the kept rows and every current rank's part -> samples.jsonl (rank 0, atomic)."""
        if not self._f.closed:
            self._f.flush()
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            rows = _read_jsonl(self.run_dir / self.BASE)
            rows += [r for k in range(self.world) for r in _read_jsonl(self._part(k))]
            rows.sort(key=lambda r: (r["step"], r["rank"]))
            atomic_write_text(self.run_dir / self.FILE, "".join(json.dumps(r) + "\n" for r in rows))
        trainer.accelerator.wait_for_everyone()

    def after_train(self, trainer):
        self.merge(trainer)
        self._f.close()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return rows


class Snapshots(Hook):
    """`train.schedule=cosine_restarts`: the weights at the end of every LR cycle, as
    RUN_DIR/snapshots/cycle_<k>.pth (a weights file like model_final.pth, for the snapshot ensemble
    `fashionseg eval|predict --weights A B C`). Cycle k ends when the schedule position reaches
    `LRFactor.cycle_ends()[k-1]`; the last cycle also ends with the run (skipped steps may leave the
    position short of it).

    No checkpoint state: which snapshots exist follows from the position. This hook runs before
    Checkpointing, so a checkpoint past a cycle end always has that snapshot on disk, and a resume
    writes only the cycle ends it crosses (one resumed from before an end writes that snapshot again:
    the same step, the same weights, replaced atomically)."""

    DIR = "snapshots"

    def __init__(self) -> None:
        self.position = 0

    @staticmethod
    def path(run_dir: Path, cycle: int) -> Path:
        return Path(run_dir) / Snapshots.DIR / f"cycle_{cycle}.pth"

    def before_train(self, trainer):
        self.position = trainer.schedule.position

    def after_step(self, trainer, out):
        now = trainer.schedule.position
        for k, end in enumerate(trainer.schedule.factor.cycle_ends(), 1):
            if self.position < end <= now:
                self._save(trainer, k)
        self.position = now

    def after_train(self, trainer):
        ends = trainer.schedule.factor.cycle_ends()
        if self.position < ends[-1]:
            self._save(trainer, len(ends))

    def _save(self, trainer, cycle: int) -> None:
        """Collective (every rank gathers the state dict, rank 0 writes)."""
        from fashionseg.model.weights_file import WeightsFile, save_weights
        state = trainer.accelerator.get_state_dict(trainer.model)
        if not trainer.accelerator.is_main_process:
            return
        cycles, step = len(trainer.schedule.factor.cycle_ends()), trainer.state.step
        info = {"cycle": cycle, "cycles": cycles, "step": step, "position": trainer.schedule.position}
        path = self.path(trainer.run_dir, cycle)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path, WeightsFile(state, trainer.cfg.to_dict(), list(trainer.vocab.categories),
                                       list(trainer.vocab.attributes), {"snapshot": info}))
        trainer.say(f"snapshot: {path} (cycle {cycle}/{cycles}, step {step})")


class Checkpointing(Hook):
    """A checkpoint every `train.checkpoint_every` steps, at the end of each epoch, on a stop signal
    and at the end of the run (so it can be extended with `--resume train.max_steps=<more>`), never
    during a run of non-finite losses (the latest checkpoint stays a good one)."""

    def __init__(self, every: int, records: SampleRecord | None = None) -> None:
        self.every, self.records = every, records
        self.last = None

    def before_train(self, trainer):
        self.last = trainer.state.step

    def _save(self, trainer) -> None:
        if self.records is not None:
            self.records.merge(trainer)
        trainer.save_checkpoint()
        self.last = trainer.state.step

    def after_step(self, trainer, out):
        step = trainer.state.step
        due = out.stop or step % self.every == 0 or trainer.data.epoch_ended
        if due and step != self.last and (trainer.state.consecutive_nonfinite == 0 or out.stop):
            self._save(trainer)

    def after_train(self, trainer):
        if trainer.state.step != self.last:
            self._save(trainer)


class Evaluation(Hook):
    """COCO AP and AP^{IoU+F1} on the val split every `eval.every_epochs` epochs and at the end."""

    def __init__(self, every_epochs: int, at_end: bool) -> None:
        self.every_epochs, self.at_end = every_epochs, at_end

    def before_train(self, trainer):
        split = trainer.cfg.eval.split
        if (self.every_epochs or self.at_end) and split_size(trainer.opts.shards, split) == 0:
            self.every_epochs, self.at_end = 0, False
            trainer.say(f"eval: split '{split}' of {trainer.opts.shards} has no images; skipping evaluation for this run "
                        "(rebuild the shards with a --val-fraction that leaves images in it)")

    def after_step(self, trainer, out):
        if not (self.every_epochs and trainer.data.epoch_ended):
            return
        if (trainer.data.last_epoch + 1) % self.every_epochs == 0 and not (trainer.state.step >= trainer.max_steps and self.at_end):
            trainer.evaluate()

    def after_train(self, trainer):
        if self.at_end:
            trainer.evaluate()


class StopOnSignal(Hook):
    """SIGTERM/SIGINT/SIGHUP finish the current step, write a checkpoint (Checkpointing runs first)
    and end the run with 128 + signal. The request reaches every rank through the step's all-reduce,
    so all ranks stop at the same step. A second Ctrl-C ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def before_train(self, trainer):
        def handler(signum, frame):  # noqa: ARG001
            if self.signum is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            # a repeated SIGTERM (launcher + torchrun both forward one) or a hang-up still lets the
            # step finish and the checkpoint be written
            self.signum = self.signum or signum
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, handler)

    def after_step(self, trainer, out):
        if out.stop:
            sig = signal.Signals(self.signum or signal.SIGTERM)
            trainer.say(f"stopped by signal {sig.name} at step {trainer.state.step}; checkpoint written, continue with --resume")
            trainer.exit_code = 128 + int(sig)


class StallWatchdog(Hook):
    """No step for `train.stall_timeout_s` (a dead peer inside a collective, a stuck driver): dump
    every thread's stack to RUN/stall_rank<r>.txt and exit non-zero, so a launcher sees a failure."""

    EXIT_CODE = 3

    def __init__(self, timeout_s: float, run_dir: Path, rank: int) -> None:
        self.timeout_s, self.path = timeout_s, Path(run_dir) / f"stall_rank{rank}.txt"
        self._beat = time.monotonic()
        self._stop = threading.Event()

    def before_train(self, trainer):
        self._beat = time.monotonic()
        threading.Thread(target=self._watch, name="fashionseg-stall-watchdog", daemon=True).start()

    def after_step(self, trainer, out):
        self._beat = time.monotonic()

    def after_train(self, trainer):
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._beat
            if idle > self.timeout_s:
                with open(self.path, "w") as f:
                    f.write(f"no training step completed for {idle:.0f} s (train.stall_timeout_s={self.timeout_s:g}); "
                            f"stacks of every thread of pid {os.getpid()}:\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
                log.error("stalled: no step for %.0f s; stacks in %s; exiting with %d", idle, self.path, self.EXIT_CODE)
                os._exit(self.EXIT_CODE)  # a thread cannot interrupt a blocked collective; the launcher restarts
