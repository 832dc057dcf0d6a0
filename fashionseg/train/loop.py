"""The trainer: builds a run's components, then the loop, which reads as a story:

    hooks.before_train; for each step: out = stepper(batches); count it; hooks.after_step(out);
    hooks.after_train; write the final weights

Everything with a policy (non-finite guard, hard-mining replay, freeze schedule, logging, samples
record, checkpoints, evaluation, stop signal, stall watchdog) is a hook (hooks.py) that owns its
state; the step itself is step.py; DDP/DeepSpeed differences are backend.py; a checkpoint is the
dict of stateful parts listed in `parts()` / `rank_parts()` (checkpoint.py). One code path for one
process, `accelerate launch` / torchrun (DDP) and DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fashionseg.io import atomic_write_json
from fashionseg.names import FINAL_WEIGHTS
from fashionseg.train import checkpoint as ckpt_lib
from fashionseg.train import hooks as H
from fashionseg.train.backend import build_backend
from fashionseg.train.config import Config
from fashionseg.train.data_source import EpochStream, FixedBatches
from fashionseg.train.distributed import Layout, available_trackers, build_accelerator, resolve_precision
from fashionseg.train.elastic import resume_on_new_layout
from fashionseg.train.evaluation import evaluate_during_training
from fashionseg.train.hooks import TrainingError
from fashionseg.train.logging import RunLogger, truncate_metrics
from fashionseg.train.run_info import run_info
from fashionseg.train.schedule import LRFactor, LRSchedule, build_optimizer, default_warmup_iters
from fashionseg.train.state import RNGState, TrainState
from fashionseg.train.step import Stepper

log = logging.getLogger(__name__)
DEBUG_SUBSET = 64  # samples per split in --debug when the config sets no subset

__all__ = ["RunOptions", "Trainer", "TrainingError", "train"]


@dataclass
class RunOptions:
    config: Config
    run_dir: Path
    shards: str
    resume: bool = False
    debug: bool = False
    overfit_batches: int = 0
    detect_anomaly: bool = False
    argv: list[str] = field(default_factory=lambda: list(sys.argv))


def params_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _set_determinism(opts: RunOptions) -> None:
    if opts.debug or opts.config.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # torchvision's roi_align backward on CUDA has no deterministic kernel: warn there, enforce on CPU
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    if opts.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)
    if torch.cuda.is_available():
        from fashionseg.model.gpu import check_gpus
        check_gpus()


class Trainer:
    """Owns the components of one run; `train()` runs it and returns the process exit code."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts, self.cfg = opts, opts.config
        t = self.cfg.train
        self.run_dir = Path(opts.run_dir)
        self.exit_code: int | None = None
        _set_determinism(opts)
        self.precision = resolve_precision(t.precision)
        if t.backend == "deepspeed" and self.precision.mixed_precision != "no":
            # DeepSpeed casts parameters to half but leaves buffers (FrozenBatchNorm) in fp32: the model
            # cannot run that way (issue 14 measures and fixes it on a GPU)
            raise TrainingError(f"train.backend=deepspeed runs in fp32 only for now (train.precision resolved to "
                                f"{self.precision.mixed_precision}): set train.precision=fp32, or use train.backend=ddp "
                                "for fp16/bf16")
        if t.backend == "deepspeed" and self.cfg.hard_mining.enabled and t.accumulate_steps > 1:
            raise TrainingError("hard_mining with train.backend=deepspeed needs train.accumulate_steps=1: DeepSpeed "
                                "counts micro-batches itself and a one-batch replay would not end its step")
        self.trackers, missing = available_trackers(list(self.cfg.log.log_with))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        freeze = self.cfg.model.freeze_backbone_steps > 0
        self.accelerator = acc = build_accelerator(t, self.trackers, str(self.run_dir), self.precision,
                                                   find_unused_parameters=freeze)
        self.layout = Layout.build(t, acc)
        if opts.debug and self.layout.world > 1:
            raise TrainingError("--debug runs in one process: launch it without accelerate/torchrun")
        self.device = acc.device
        for line in filter(None, [self.precision.note, *(f"log_with: '{m}' is not installed; not logging to it" for m in missing)]):
            self.say(line)

        self.loader = self._build_loader()
        self.vocab = self.loader.vocab
        self.steps_per_epoch = self.loader.steps_per_epoch // t.accumulate_steps
        if self.steps_per_epoch < 1:
            raise TrainingError(f"one epoch has {self.loader.steps_per_epoch} batches per rank, fewer than "
                                f"train.accumulate_steps={t.accumulate_steps}: lower it or use more data")
        self.data = (FixedBatches(self.loader, opts.overfit_batches, t.accumulate_steps) if opts.overfit_batches
                     else EpochStream(self.loader, t.accumulate_steps))
        self.max_steps = t.max_steps if t.max_steps is not None else t.epochs * self.steps_per_epoch
        self.warmup = warmup = default_warmup_iters(t, self.steps_per_epoch)
        self.peak_lr, lr_how = self.layout.lr(t)

        self.model, self.optimizer = self._build_model_and_optimizer()
        self.backend = build_backend(acc, self.model, self.optimizer, t)
        self.schedule = LRSchedule(self.optimizer, self.peak_lr, LRFactor(t, self.max_steps, warmup))
        self.state, self.rng = TrainState(), RNGState()
        from fashionseg.train.image_mining import build_miner
        self.miner = build_miner(self.cfg.hard_mining, warmup, self.layout.local_batch)
        self.stop = H.StopOnSignal()
        per_image = self.miner is not None and self.cfg.hard_mining.unit == "image"
        self.stepper = Stepper(self.model, self.backend, self.device, self.layout.loss_weight, self.layout.world,
                               self.stop.requested, image_losses=per_image)
        self.logger: RunLogger | None = None
        self.hooks: list[H.Hook] = []

        if opts.debug:
            self.say(f"debug: one process, deterministic algorithms, data.subset={self.cfg.data.subset or DEBUG_SUBSET}"
                     f", a log line every step{', anomaly detection' if opts.detect_anomaly else ''}")
        backend = t.backend if self.layout.world > 1 or t.backend == "deepspeed" else "single"
        self.say(f"layout: {self.layout.world} process(es) on {self.device}, backend={backend}, precision={acc.mixed_precision}")
        self.say(f"batch: global {self.layout.global_batch} = per-rank {self.layout.batch_sizes} x accumulate "
                 f"{t.accumulate_steps}; lr {self.peak_lr:.6g} ({lr_how}); warmup {warmup} steps; "
                 f"{self.steps_per_epoch} steps/epoch; max_steps {self.max_steps}")

    # .. building ...............................................................................
    def _build_loader(self):
        from fashionseg.data.loader import build_loader
        cfg = self.cfg.data
        if self.opts.debug and cfg.subset is None:
            cfg = dataclasses.replace(cfg, subset=DEBUG_SUBSET)
        return build_loader(cfg, self.opts.shards, "train", rank=self.layout.rank, world_size=self.layout.world,
                            batch_sizes=self.layout.batch_sizes, seed=self.cfg.train.seed)

    def _build_model_and_optimizer(self):
        from fashionseg.model.build import build_model, trainable_parameters
        t, acc = self.cfg.train, self.accelerator
        torch.manual_seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        model = build_model(self.cfg.model, self.vocab.num_classes, self.vocab.num_attributes)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(t, trainable_parameters(model), self.peak_lr)
        if t.backend == "deepspeed":
            ds = acc.state.deepspeed_plugin.deepspeed_config
            # DeepSpeed insists on one micro-batch size; it only does bookkeeping with it (the loader
            # sizes the batches), so each rank states its own and the global product it implies
            ds["train_micro_batch_size_per_gpu"] = self.layout.local_batch
            ds["train_batch_size"] = self.layout.local_batch * t.accumulate_steps * self.layout.world
        model, optimizer = acc.prepare(model, optimizer)
        model.train()
        # per-rank randomness (RPN / RoI sampling) differs between ranks, reproducibly
        torch.manual_seed(t.seed * 1000 + 17 + self.layout.rank)
        return model, optimizer

    def _hooks(self) -> list[H.Hook]:
        t, cfg = self.cfg.train, self.cfg
        from fashionseg.model.build import apply_freeze_schedule
        hooks: list[H.Hook] = [H.NonFiniteGuard()]
        extra_rows = []
        if self.miner is not None:
            replay = H.HardMiningReplay(self.miner, self.loader)
            hooks.append(replay)
            extra_rows.append(replay.row)
        hooks.append(H.FreezeSchedule(apply_freeze_schedule))
        hooks.append(H.MetricsLog(self.logger, 1 if self.opts.debug else cfg.log.every, extra_rows))
        if self.opts.overfit_batches:
            return [*hooks, self.stop]  # overfit runs are never checkpointed or evaluated
        if t.schedule == "cosine_restarts":  # before Checkpointing: a checkpoint past a cycle end has its snapshot
            hooks.append(H.Snapshots())
        records = H.SampleRecord(self.run_dir, self.layout.rank, self.layout.world) if t.record_samples else None
        hooks += [h for h in (records, H.Checkpointing(t.checkpoint_every, records),
                              H.Evaluation(cfg.eval.every_epochs, cfg.eval.at_end)) if h is not None]
        if t.stall_timeout_s:  # first: its clock restarts before this step's checkpoint/eval run
            hooks.insert(0, H.StallWatchdog(t.stall_timeout_s, self.run_dir, self.layout.rank))
        return [*hooks, self.stop]

    # .. helpers the hooks use ....................................................................
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def say(self, text: str) -> None:
        """A line for the user, from rank 0 (through the progress display when it is up)."""
        if self.logger is not None:
            self.logger.print(text)
        elif self.accelerator.is_main_process:
            print(text, flush=True)

    def parts(self) -> dict[str, Any]:
        """The shared stateful parts of a checkpoint (rank 0 writes them)."""
        return {**self.backend.parts(self.unwrapped), "schedule": self.schedule, "scaler": self.accelerator.scaler,
                "trainer": self.state}  # scaler: None (nothing saved) without fp16

    def rank_parts(self) -> dict[str, Any]:
        """Each rank's own stateful parts (gathered to rank 0)."""
        return {"loader": self.data, "miner": self.miner, "rng": self.rng}

    def save_checkpoint(self) -> None:
        meta = {"config": self.cfg.to_dict(), "world_size": self.layout.world, "batch_sizes": self.layout.batch_sizes,
                "vocab": {"categories": list(self.vocab.categories), "attributes": list(self.vocab.attributes)}}
        path = ckpt_lib.save(self.run_dir, self.state.step, self.accelerator, parts=self.parts(),
                             rank_parts=self.rank_parts(), meta=meta, keep=self.cfg.train.keep_checkpoints,
                             external=self.backend.external_save)
        if path is not None:
            self.say(f"checkpoint: {path} (step {self.state.step})")

    def restore(self, path: Path) -> None:
        """Every part back from checkpoint `path`. On another layout (world size, per-rank batch
        sizes) the data position is re-planned (the loader's state is layout-free, the same on every
        rank), the per-rank RNG and miner start afresh and the schedule is re-derived (elastic.py)."""
        state = ckpt_lib.read(path)
        meta, ranks = state["meta"], state["ranks"]
        same = meta["world_size"] == self.layout.world and meta["batch_sizes"] == self.layout.batch_sizes
        if not same and self.cfg.train.backend == "deepspeed":
            raise TrainingError(f"{path}: DeepSpeed keeps model and optimizer sharded per rank ({meta['world_size']} "
                                f"process(es)); resume it on {meta['world_size']} processes, or use train.backend=ddp")
        self.backend.external_load(Path(path) / ckpt_lib.DS_DIR)
        ckpt_lib.load_parts(self.parts(), state["parts"], str(path))
        mine = ranks[self.layout.rank] if same else {"loader": ranks[0]["loader"]}
        ckpt_lib.load_parts({"loader": self.data, **({"miner": self.miner, "rng": self.rng} if same else {})}, mine,
                            f"{path} (rank {self.layout.rank})")
        if not same:
            resume_on_new_layout(self, meta)
        elif self.loader.layout_change:  # same ranks, other loader workers
            self.say(self.loader.layout_change)
        self.say(f"resumed from {path} at step {self.state.step}")

    def measure_loss(self, batch) -> dict[str, float]:
        """This rank's loss on a batch with the current weights, for the replay log: a no-grad
        forward of the unwrapped model (no collectives), after which buffers (BatchNorm running
        stats) and RNG are restored, so the run continues exactly as if it had not been measured."""
        from fashionseg.train.step import to_device
        model = self.unwrapped
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        rng = self.rng.state_dict()
        try:
            with torch.no_grad():
                loss_dict = model(*to_device(*batch, self.device))
            return {k: float(v) for k, v in loss_dict.items()}
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            self.rng.load_state_dict(rng)

    def evaluate(self) -> dict[str, float]:
        """COCO bbox/segm AP and AP^{IoU+F1} on val with fashionseg.eval's evaluator (all ranks)."""
        return evaluate_during_training(self)

    # .. the run ..................................................................................
    def _resume_or_start(self) -> None:
        opts, acc = self.opts, self.accelerator
        existing = ckpt_lib.latest_checkpoint(self.run_dir)
        if acc.is_main_process and existing is not None and not opts.resume:
            raise TrainingError(f"{self.run_dir} already holds a run ({existing.name}): pass --resume to continue it "
                                "or choose another --out")
        acc.wait_for_everyone()
        resume_from = existing if opts.resume else None
        if self.layout.world > 1 and opts.resume:
            from accelerate.utils import gather_object
            found = gather_object([resume_from.name if resume_from is not None else None])
            if len(set(found)) > 1:
                raise TrainingError(
                    f"--resume: ranks see different latest checkpoints in {self.run_dir} ({found}, by rank): "
                    "put --out on storage every host shares, or copy the checkpoint to every host's --out")
        if opts.resume and resume_from is None:
            self.say(f"--resume: no checkpoint in {self.run_dir / ckpt_lib.CKPT_DIR}; starting from step 0")
        if resume_from is not None:
            if opts.overfit_batches:
                raise TrainingError("--overfit-batches runs cannot be resumed")
            self.restore(resume_from)
        if acc.is_main_process:
            self.cfg.save(self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "run_info.json", run_info(acc, opts.argv, self.layout.batch_sizes))
            truncate_metrics(self.run_dir, self.state.step)
        if self.trackers:
            acc.init_trackers(self.cfg.log.project, config=_flat_scalars(self.cfg.to_dict()))

    def train(self) -> int:
        """The loop. Returns the exit code (0, 1 for a failed overfit check, 128+signal)."""
        acc = self.accelerator
        self._resume_or_start()
        self.logger = RunLogger(self.run_dir, acc, self.max_steps, rich=self.cfg.log.rich, window=self.cfg.log.window)
        self.hooks = self._hooks()
        try:
            with self.logger:
                for h in self.hooks:
                    h.before_train(self)
                while self.state.step < self.max_steps and self.exit_code is None:
                    self.run_step()
                if self.exit_code is None:
                    for h in self.hooks:
                        h.after_train(self)
                    self.finish()
            # every rank leaves together: a rank that tears gloo down while rank 0 still writes the
            # final files aborts ("terminate called without an active exception", exit -6)
            acc.wait_for_everyone()
        finally:
            acc.end_training()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return self.exit_code or 0

    def run_step(self) -> None:
        """One optimizer step and the policies after it. A skipped step consumes its data but does
        not move the schedule."""
        out = self.stepper(self.data, self.cfg.train.accumulate_steps)
        self.state.step += 1
        if not out.skipped:
            self.schedule.step()
        self.data.end_step()
        for h in self.hooks:
            h.after_step(self, out)

    def finish(self) -> None:
        """model_final.pth, ranks.json (every rank's step count and weight digest), the overfit verdict."""
        from accelerate.utils import gather_object

        from fashionseg.model.weights_file import WeightsFile, save_weights
        acc = self.accelerator
        state = acc.get_state_dict(self.model)
        mine = {"rank": self.layout.rank, "step": self.state.step, "batch_size": self.layout.local_batch,
                "skipped_steps": self.state.skipped_steps, "replays": self.state.replays,
                "params_sha256": params_digest(self.unwrapped)}
        ranks = gather_object([mine]) if self.layout.world > 1 else [mine]
        if acc.is_main_process:
            save_weights(self.run_dir / FINAL_WEIGHTS, WeightsFile(state, self.cfg.to_dict(), list(self.vocab.categories),
                                                                  list(self.vocab.attributes)))
            atomic_write_json(self.run_dir / "ranks.json", ranks)
            same = len({r["params_sha256"] for r in ranks}) == 1
            self.say(f"done: {self.state.step} steps, {self.state.skipped_steps} skipped; weights {self.run_dir / FINAL_WEIGHTS}"
                     + ("" if same else "  WARNING: ranks ended with different weights"))
        if self.opts.overfit_batches:
            self.exit_code = self._overfit_verdict(next(h for h in self.hooks if isinstance(h, H.MetricsLog)).step_losses)

    def _overfit_verdict(self, step_losses: list[float]) -> int:
        k = max(1, min(len(step_losses) // 4, self.opts.overfit_batches * 2))
        if len(step_losses) < 2 * k:
            self.say(f"overfit: FAILED, only {len(step_losses)} finite steps; raise train.max_steps")
            return 1
        first, last = sum(step_losses[:k]) / k, sum(step_losses[-k:]) / k
        ok = last <= 0.5 * first
        self.say(f"overfit: loss {first:.4f} -> {last:.4f} (mean of the first/last {k} steps): "
                 + ("passed, fell by at least half" if ok else
                    "FAILED: it did not fall by half. Check labels/targets with `shard inspect`, the lr, the loss weights"))
        return 0 if ok else 1


def _flat_scalars(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a/b": scalar} for the trackers' hyper-parameter tables."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_scalars(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(opts: RunOptions) -> int:
    return Trainer(opts).train()
