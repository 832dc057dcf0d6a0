"""The training loop: one code path for one process, `accelerate launch` (DDP) and DeepSpeed.

What each step does, in order (every rank, in lockstep):
1. `accumulate_steps` micro-batches: forward, one all-reduce of [loss terms x b_r, non-finite
   flag, stop flag, b_r] (the logged loss is then the exact global-batch mean, and every rank
   agrees on skipping and stopping), backward of `loss x b_r W / sum(b)` (see distributed.py).
   A non-finite loss on any rank makes every rank back-propagate a zero loss instead (the DDP
   hooks still fire, nothing hangs) and the optimizer step is skipped and counted;
   `train.max_nonfinite` in a row abort the run before any further checkpoint is written.
2. optimizer step (GradScaler with fp16, clipping), scheduler step, freeze schedule.
3. hard-miner observe / replay (the trigger is the global step, identical on all ranks).
4. logging (rank 0), checkpoint every `train.checkpoint_every` steps and at epoch end, and a
   checkpoint then exit on SIGTERM/SIGINT.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fashionseg.io import atomic_open, atomic_write_json
from fashionseg.train import checkpoint as ckpt_lib
from fashionseg.train.config import Config, ConfigError
from fashionseg.train.distributed import (
    available_trackers, build_accelerator, gather_ints, local_batch_size, loss_weight, resolve_precision, resolved_lr,
)
from fashionseg.train.logging import RunLogger, truncate_metrics
from fashionseg.train.schedule import LRFactor, build_optimizer, build_scheduler, default_warmup_iters

CHECKPOINT_FORMAT = "fashionseg-checkpoint"
DEBUG_SUBSET = 64  # samples per split in --debug when the config sets no subset


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


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


# -- small helpers ------------------------------------------------------------------------------
def to_device(images: list[torch.Tensor], targets: list[dict], device: torch.device):
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter: backward through it
    keeps DDP's gradient hooks (and so the collectives) matched on a skipped step."""
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def params_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests = identical weights."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(accelerator, opts: RunOptions, batch_sizes: list[int]) -> dict[str, Any]:
    from importlib import metadata
    versions = {}
    for pkg in ("torch", "torchvision", "accelerate", "webdataset", "pycocotools", "numpy", "deepspeed",
                "transformers", "fashionseg"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_commit": _git_commit(), "versions": versions, "python": platform.python_version(),
        "hostname": socket.gethostname(), "command": opts.argv, "cwd": os.getcwd(),
        "world_size": accelerator.num_processes, "batch_sizes": batch_sizes,
        "distributed_type": str(accelerator.distributed_type), "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keys joined with '/'."""
    return {k: float(v) for k, v in _flat_numbers_any(d, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _loader_config(data_cfg: Any, local_batch: int, batch_sizes: list[int], debug: bool) -> Any:
    """The loader's own config with this run's batch layout (and the debug subset) filled in."""
    names = {f.name for f in dataclasses.fields(data_cfg)}
    changes: dict[str, Any] = {}
    if "batch_sizes" in names:
        changes["batch_sizes"] = list(batch_sizes)
    if "batch_size" in names:
        changes["batch_size"] = local_batch
    if debug and "subset" in names and getattr(data_cfg, "subset") is None:
        changes["subset"] = DEBUG_SUBSET
    return dataclasses.replace(data_cfg, **changes) if changes else data_cfg


# -- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Owns the components of one run; `fit()` runs it and returns the process exit code."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.cfg = opts.config
        self.tcfg = self.cfg.train
        self.run_dir = Path(opts.run_dir)
        self.stop_signal: int | None = None
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.replay_count = 0

    # .. set-up ..................................................................................
    def setup(self) -> None:
        t, cfg, opts = self.tcfg, self.cfg, self.opts
        if opts.debug or t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # torchvision's roi_align backward on CUDA has no deterministic kernel: warn there, enforce on CPU
            torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        if opts.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        if torch.cuda.is_available():
            from fashionseg.model.gpu import check_gpus
            check_gpus()
        if cfg.hard_mining.enabled and getattr(cfg.hard_mining, "store", "keys") != "keys":
            raise ConfigError("hard_mining.store='keys+bytes' is not supported by the trainer: the loader re-decodes "
                              "replayed batches from their keys (set hard_mining.store=keys)")

        self.precision = resolve_precision(t.precision)
        if t.backend == "deepspeed" and self.precision.mixed_precision != "no":
            # DeepSpeed casts parameters to half but leaves buffers (FrozenBatchNorm) in fp32: the model
            # cannot run that way (found in review, not yet solved on a GPU)
            raise ConfigError(f"train.backend=deepspeed runs in fp32 only for now (train.precision resolved to "
                              f"{self.precision.mixed_precision}): set train.precision=fp32, or use train.backend=ddp "
                              "for fp16/bf16")
        trackers, missing = available_trackers(list(cfg.log.log_with))
        self.trackers = trackers
        self.run_dir.mkdir(parents=True, exist_ok=True)
        freeze = getattr(cfg.model, "freeze_backbone_steps", 0) > 0
        self.accelerator = acc = build_accelerator(t, trackers, str(self.run_dir), self.precision,
                                                   find_unused_parameters=freeze)
        self.rank, self.world = acc.process_index, acc.num_processes
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != self.world:
            raise TrainingError(f"the launcher started {env_world} processes (WORLD_SIZE) but Accelerate formed a group of "
                                f"{self.world}: every rank would train its own model. Check ACCELERATE_USE_CPU / the "
                                "accelerate config on this host")
        self.device = acc.device
        if opts.debug and self.world > 1:
            raise TrainingError("--debug runs in one process: launch it without accelerate/torchrun")
        self.log = print if acc.is_main_process else (lambda *a, **k: None)
        if opts.debug:
            self.log(f"debug: one process, deterministic algorithms, data.subset={getattr(cfg.data, 'subset', None) or DEBUG_SUBSET}"
                     f", a log line every step{', anomaly detection' if opts.detect_anomaly else ''}")
        if self.precision.note:
            self.log(self.precision.note)
        for m in missing:
            self.log(f"log_with: '{m}' is not installed; not logging to it")

        # batch layout and learning rate
        local_rank = acc.local_process_index
        self.local_batch = local_batch_size(t, self.rank, self.world, local_rank)
        self.batch_sizes = gather_ints(self.local_batch, self.world)
        self.weight = loss_weight(self.batch_sizes, self.rank)
        self.global_batch = sum(self.batch_sizes) * t.accumulate_steps
        self.lr, lr_how = resolved_lr(t, self.global_batch)

        # data, model, optimizer, schedule
        from fashionseg.data.loader import build_loader
        from fashionseg.model.build import apply_freeze_schedule, build_model, trainable_parameters
        self._apply_freeze = apply_freeze_schedule
        shards = opts.shards
        loader_cfg = _loader_config(cfg.data, self.local_batch, self.batch_sizes, opts.debug)
        self.loader = build_loader(loader_cfg, shards, "train", rank=self.rank, world_size=self.world,
                                   seed=t.seed, train=True)
        self.vocab = self.loader.vocab
        micro_per_epoch = len(self.loader)
        self.steps_per_epoch = micro_per_epoch // t.accumulate_steps
        if self.steps_per_epoch < 1:
            raise TrainingError(f"one epoch has {micro_per_epoch} batches per rank, fewer than "
                                f"train.accumulate_steps={t.accumulate_steps}: lower it or use more data")
        self.max_steps = t.max_steps if t.max_steps is not None else t.epochs * self.steps_per_epoch
        self.warmup_iters = default_warmup_iters(t, self.steps_per_epoch)

        torch.manual_seed(t.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        # the loader resizes training images (multi-scale, data.min_size/max_size): the model's own
        # transform keeps them as they are and resizes only at test time (model.min_size/max_size)
        model_cfg = dataclasses.replace(cfg.model, resize_in_train=False)
        self.model = build_model(model_cfg, self.vocab.num_classes, self.vocab.num_attributes)
        self.optimizer = build_optimizer(t, trainable_parameters(self.model), self.lr)
        self.scheduler = build_scheduler(t, self.optimizer, self.max_steps, self.warmup_iters)
        from fashionseg.train.hard_mining import build_hard_miner
        self.miner = build_hard_miner(cfg.hard_mining, self.warmup_iters)

        if t.backend == "deepspeed":
            ds = acc.state.deepspeed_plugin.deepspeed_config
            # DeepSpeed insists on one micro-batch size; it only does bookkeeping with it (the loader
            # sizes the batches), so each rank states its own and the global product it implies
            ds["train_micro_batch_size_per_gpu"] = self.local_batch
            ds["train_batch_size"] = self.local_batch * t.accumulate_steps * self.world
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        # freeze only after DDP has registered every parameter that will ever train (it wraps with
        # find_unused_parameters=True while a freeze schedule is active)
        apply_freeze_schedule(self.model, 0)
        self.model.train()
        # per-rank randomness (RPN / RoI sampling) differs between ranks, reproducibly
        torch.manual_seed(t.seed * 1000 + 17 + self.rank)

        self.log(f"layout: {self.world} process(es) on {self.device}, backend={t.backend if self.world > 1 or t.backend == 'deepspeed' else 'single'}, "
                 f"precision={acc.mixed_precision}")
        self.log(f"batch: global {self.global_batch} = per-rank {self.batch_sizes} x accumulate {t.accumulate_steps}; "
                 f"lr {self.lr:.6g} ({lr_how}); warmup {self.warmup_iters} steps; "
                 f"{self.steps_per_epoch} steps/epoch; max_steps {self.max_steps}")

    # .. state ....................................................................................
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _rank_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "rng": ckpt_lib.rng_state(), "loader": self.loader.state_dict(),
                "miner": self.miner.state_dict() if self.miner is not None else None}

    def save_checkpoint(self) -> None:
        from accelerate.utils import gather_object
        ranks = gather_object([self._rank_state()]) if self.world > 1 else [self._rank_state()]
        ds = self.tcfg.backend == "deepspeed"
        state: dict[str, Any] = {}
        if self.accelerator.is_main_process:
            state = {
                "format": CHECKPOINT_FORMAT, "version": 1, "step": self.step,
                "skipped_steps": self.skipped_steps, "consecutive_nonfinite": self.consecutive_nonfinite,
                "replay_count": self.replay_count,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
                "world_size": self.world, "batch_sizes": self.batch_sizes,
                "config": self.cfg.to_dict(), "ranks": ranks,
                "vocab": {"categories": list(self.vocab.categories), "attributes": list(self.vocab.attributes)},
            }
            if not ds:
                state["model"] = {k: v.detach().cpu() for k, v in self.unwrapped.state_dict().items()}
                state["optimizer"] = self.optimizer.state_dict()
        path = ckpt_lib.save_checkpoint(self.run_dir, self.step, state, self.accelerator,
                                        keep=self.tcfg.keep_checkpoints, deepspeed=ds)
        if path is not None:
            self.log(f"checkpoint: {path} (step {self.step})")

    def restore(self, path: Path) -> None:
        state = ckpt_lib.load_trainer_state(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path}: not a fashionseg checkpoint")
        if state["world_size"] != self.world or state["batch_sizes"] != self.batch_sizes:
            raise TrainingError(
                f"{path}: saved with {state['world_size']} process(es), batch sizes {state['batch_sizes']}; "
                f"this job has {self.world}, {self.batch_sizes}. A step-exact resume needs the same layout "
                "(the loader's split and every rank's RNG depend on it)")
        if self.tcfg.backend == "deepspeed":
            self.accelerator.load_state(str(Path(path) / ckpt_lib.DS_DIR))
        else:
            self.unwrapped.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the schedule's shape follows this run's config (e.g. `--resume train.max_steps=<more>`),
        # not the one saved: LambdaLR.load_state_dict overwrites its function's attributes
        factor = LRFactor(self.tcfg, self.max_steps, self.warmup_iters)
        self.scheduler.lr_lambdas = [factor] * len(self.scheduler.lr_lambdas)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])
        self.replay_count = int(state.get("replay_count", 0))
        mine = state["ranks"][self.rank]
        self.loader.load_state_dict(mine["loader"])
        if self.miner is not None and mine["miner"] is not None:
            self.miner.load_state_dict(mine["miner"])
        self._apply_freeze(self.model, self.step)
        ckpt_lib.set_rng_state(mine["rng"])
        self.log(f"resumed from {path} at step {self.step}")

    # .. one step .................................................................................
    def _forward(self, images, targets, poison: bool):
        """Forward one micro-batch; returns (loss to back-propagate, reduced stats, n terms)."""
        loss_dict = self.model(images, targets)
        names = sorted(loss_dict)
        terms = torch.stack([loss_dict[k].detach().float() for k in names])
        total = sum(loss_dict.values())
        if poison:
            total = total * float("nan")
        b = float(len(images))
        nonfinite = 0.0 if bool(torch.isfinite(total.detach())) else 1.0
        stats = torch.cat([terms * b, total.detach().float().reshape(1) * b,
                           torch.tensor([nonfinite, float(self.stop_signal is not None), b], device=terms.device)])
        if self.world > 1:
            torch.distributed.all_reduce(stats)
        stats = stats.tolist()
        return total, loss_dict, names, stats

    def _micro(self, images, targets, poison: bool, in_accumulate: bool = True):
        total, loss_dict, names, stats = self._forward(images, targets, poison)
        n = len(names)
        any_nonfinite = stats[n + 1] > 0
        stop = stats[n + 2] > 0
        bsum = stats[n + 3]
        if any_nonfinite:
            loss = zero_loss(self.model).to(total.device)
        else:
            loss = total * self.weight
        if not in_accumulate:  # accelerator.backward divides by accumulate_steps: undo it for a replay
            loss = loss * self.tcfg.accumulate_steps
        self.accelerator.backward(loss)
        losses = None if any_nonfinite else dict({k: stats[i] / bsum for i, k in enumerate(names)}, loss=stats[n] / bsum)
        local = {k: float(v.detach()) for k, v in loss_dict.items()} if self.miner is not None else None
        return losses, any_nonfinite, stop, local

    def _optimizer_step(self) -> None:
        if self.tcfg.clip_grad_norm and self.tcfg.backend != "deepspeed":
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.tcfg.clip_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, batches) -> tuple[dict | None, bool, float, int, list]:
        """One optimizer step over `accumulate_steps` micro-batches from `batches` (an iterator).
        Returns (global mean losses or None when skipped, stop requested, data seconds, images, micro info)."""
        t = self.tcfg
        data_time = 0.0
        bad = False
        stop = False
        sums: dict[str, float] = {}
        micro_info = []
        poison = (self.step + 1) in t.debug_nan_steps
        for _ in range(t.accumulate_steps):
            t0 = time.perf_counter()
            images, targets = next(batches)
            data_time += time.perf_counter() - t0
            keys = [tg.get("key") for tg in targets]
            images, targets = to_device(images, targets, self.device)
            with self.accelerator.accumulate(self.model):
                losses, nonfinite, stop_flag, local = self._micro(images, targets, poison)
                bad |= nonfinite
                stop |= stop_flag
                if losses is not None:
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v / t.accumulate_steps
                if self.accelerator.sync_gradients:
                    if bad and t.backend != "deepspeed":
                        self.optimizer.zero_grad(set_to_none=True)
                    else:
                        self._optimizer_step()
            micro_info.append((keys, local))
        self.step += 1
        if bad:
            self.skipped_steps += 1
            self.consecutive_nonfinite += 1
        else:
            self.consecutive_nonfinite = 0
            self.scheduler.step()
        if self._apply_freeze(self.model, self.step) and self.world > 1:
            self.log(f"freeze schedule changed trainable parameters at step {self.step}")
        return (None if bad else sums), stop, data_time, sum(self.batch_sizes) * t.accumulate_steps, micro_info

    def replay(self, epoch: int) -> None:
        """The hard miner's extra optimizer step(s), taken by every rank at the same global step."""
        for _ in range(self.miner.replays_per_trigger):
            keys, replay_epoch, _mined_loss = self.miner.pop()
            images, targets = self.loader.load_batch(keys, replay_epoch)
            images, targets = to_device(images, targets, self.device)
            losses, nonfinite, _, before = self._micro(images, targets, False, in_accumulate=False)
            after = None
            if nonfinite:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self._optimizer_step()
                if self.miner.count_in_schedule:
                    self.scheduler.step()
                after = self._loss_without_side_effects(images, targets)
            self.replay_count += 1
            self.miner.record_replay(before if before is not None else float("nan"), after)

    def _loss_without_side_effects(self, images, targets) -> dict[str, float]:
        """This rank's loss on a batch with the current weights, for the replay log: a no-grad
        forward of the unwrapped model (no collectives), after which buffers (BatchNorm running
        stats) and RNG are restored, so the run continues exactly as if it had not been measured."""
        model = self.unwrapped
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        rng = ckpt_lib.rng_state()
        try:
            with torch.no_grad():
                loss_dict = model(images, targets)
            return {k: float(v) for k, v in loss_dict.items()}
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(buffers[n])
            ckpt_lib.set_rng_state(rng)

    # .. the run ..................................................................................
    def _install_signals(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C ends the process at once
            # a repeated SIGTERM (launcher + torchrun both forward one) or a hang-up still lets the
            # step finish and the checkpoint be written
            self.stop_signal = self.stop_signal or signum
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, handler)

    def evaluate(self, logger: RunLogger, epoch: int) -> dict[str, float]:
        """COCO bbox/segm AP and AP^{IoU+F1} on val with fashionseg.eval's evaluator (all ranks)."""
        from fashionseg.eval.evaluate import evaluate_model, headline
        e = self.cfg.eval
        model = self.unwrapped
        model.eval()
        try:
            result = evaluate_model(model, self.opts.shards, e.split, self.vocab, mask_thresh=self.cfg.model.mask_thresh,
                                    batch_size=e.batch_size, device=self.device, accelerator=self.accelerator,
                                    max_images=e.max_images, progress=self.accelerator.is_main_process and sys.stdout.isatty())
        finally:
            model.train()
        result = result or {}
        head = headline(result)
        summary = {k: v for k, v in result.items() if k in ("bbox", "segm", "iou_f1")}
        summary = {sec: {k: v for k, v in d.items() if k != "per_category"} for sec, d in summary.items() if d}
        flat = {f"eval/{k}": v for k, v in {**head, **_flat_numbers(summary)}.items()}
        logger.write_row({"step": self.step, "epoch": epoch, **flat}, self.step)
        logger.print(f"eval ({e.split}, step {self.step}): " + "  ".join(f"{k}={v:.4f}" for k, v in head.items()))
        return flat

    def fit(self) -> int:
        opts, t = self.opts, self.tcfg
        self.setup()
        acc = self.accelerator
        if acc.is_main_process:
            existing = ckpt_lib.latest_checkpoint(self.run_dir)
            if existing is not None and not opts.resume:
                raise TrainingError(f"{self.run_dir} already holds a run ({existing.name}): pass --resume to continue it "
                                    "or choose another --out")
        resume_from = ckpt_lib.latest_checkpoint(self.run_dir) if opts.resume else None
        acc.wait_for_everyone()
        if self.world > 1 and opts.resume:
            from accelerate.utils import gather_object
            found = gather_object([resume_from.name if resume_from is not None else None])
            if len(set(found)) > 1:
                raise TrainingError(
                    f"--resume: ranks see different latest checkpoints in {self.run_dir} ({found}, by rank): "
                    "put --out on storage every host shares, or copy the checkpoint to every host's --out")
        if opts.resume and resume_from is None:
            self.log(f"--resume: no checkpoint in {self.run_dir / ckpt_lib.CKPT_DIR}; starting from step 0")
        if resume_from is not None:
            if opts.overfit_batches:
                raise TrainingError("--overfit-batches runs cannot be resumed")
            self.restore(resume_from)
        if acc.is_main_process:
            self.cfg.save(self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "run_info.json", run_info(acc, opts, self.batch_sizes))
            truncate_metrics(self.run_dir, self.step)
        if self.trackers:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                    for k, v in _flat_numbers_any(self.cfg.to_dict()).items()}
            acc.init_trackers(self.cfg.log.project, config=flat)
        self._install_signals()
        logger = RunLogger(self.run_dir, acc, self.max_steps, rich=self.cfg.log.rich, window=self.cfg.log.window)
        try:
            with logger:
                code = self._loop(logger)
            # every rank leaves together: a rank that tears gloo down while rank 0 still writes the
            # final files aborts ("terminate called without an active exception", exit -6)
            acc.wait_for_everyone()
        finally:
            acc.end_training()
            if torch.distributed.is_initialized():
                # an explicit teardown: gloo aborts the process ("terminate called...") when left to exit
                torch.distributed.destroy_process_group()
        return code

    def _batches(self, epoch: int, fresh: bool):
        if fresh:
            self.loader.set_epoch(epoch)
        return iter(self.loader)

    def _loop(self, logger: RunLogger) -> int:
        t, acc, opts = self.tcfg, self.accelerator, self.opts
        log_every = 1 if opts.debug else self.cfg.log.every
        eval_every = self.cfg.eval.every_epochs
        ml = logger.metric_logger
        step_losses: list[float] = []
        fixed = None
        if opts.overfit_batches:
            self.loader.set_epoch(0)
            it = iter(self.loader)
            fixed = [next(it) for _ in range(opts.overfit_batches * t.accumulate_steps)]
            self.log(f"overfit: training on {len(fixed)} fixed batch(es) for {self.max_steps} steps")
        last_ckpt = self.step
        resumed_mid_epoch = self.step % self.steps_per_epoch != 0
        while self.step < self.max_steps:
            epoch = self.step // self.steps_per_epoch
            if fixed is not None:
                batches = (fixed[i % len(fixed)] for i in range(10**12))
            else:
                batches = self._batches(epoch, fresh=not resumed_mid_epoch)
            resumed_mid_epoch = False
            end = time.perf_counter()
            epoch_done = False
            while self.step < self.max_steps:
                losses, stop, data_time, images, micro = self.train_step(batches)
                if self.miner is not None:
                    for keys, local in micro:
                        self.miner.observe(self.step, keys, epoch, local if losses is not None else {"loss": float("nan")})
                    if self.miner.should_replay(self.step):
                        self.replay(epoch)
                now = time.perf_counter()
                step_time, end = now - end, now
                if losses is not None:
                    ml.update(**losses)
                    step_losses.append(losses["loss"])
                ml.lr.update(self.optimizer.param_groups[0]["lr"])
                ml.iter_time.update(step_time)
                ml.data_time.update(data_time)
                logger.interval.add(losses, step_time, data_time, images)
                logger.advance(self.step)
                i = self.step - epoch * self.steps_per_epoch
                if self.consecutive_nonfinite >= t.max_nonfinite:
                    last = ckpt_lib.latest_checkpoint(self.run_dir)
                    raise TrainingError(
                        f"{self.consecutive_nonfinite} non-finite losses in a row (step {self.step}): stopping. "
                        f"The last good checkpoint is {last if last else 'none (no checkpoint was written yet)'}; "
                        "lower train.lr, check the data with `shard verify`, or run --debug --detect-anomaly")
                if self.step % log_every == 0 or self.step == self.max_steps or i == self.steps_per_epoch:
                    self._log_row(logger, epoch, i)
                if i == self.steps_per_epoch:
                    epoch_done = True
                if stop or (self.step % t.checkpoint_every == 0) or epoch_done:
                    # never during a run of non-finite losses: the latest checkpoint stays a good one
                    if fixed is None and self.step != last_ckpt and (self.consecutive_nonfinite == 0 or stop):
                        self.save_checkpoint()
                        last_ckpt = self.step
                if stop:
                    sig = self.stop_signal or signal.SIGTERM
                    self.log(f"stopped by signal {signal.Signals(sig).name} at step {self.step}; "
                             f"checkpoint written, continue with --resume")
                    return 128 + int(sig)
                if epoch_done:
                    break
            if epoch_done and fixed is None and eval_every and (epoch + 1) % eval_every == 0 \
                    and not (self.step >= self.max_steps and self.cfg.eval.at_end):
                self.evaluate(logger, epoch)
        if fixed is None and self.step != last_ckpt:
            self.save_checkpoint()  # the run can be extended later: --resume train.max_steps=<more>
        self._finish(logger, step_losses)
        if opts.overfit_batches:
            return self._overfit_verdict(step_losses)
        return 0

    def _log_row(self, logger: RunLogger, epoch: int, i: int) -> None:
        ml = logger.metric_logger
        row: dict[str, Any] = {"step": self.step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update(logger.interval.row())
        row["skipped_steps"] = self.skipped_steps
        if self.miner is not None:
            row.update({f"hard_mining/{k}": v for k, v in self.miner.stats().items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if torch.cuda.is_available():
            row["max_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        logger.interval.reset()
        logger.write_row(row, self.step)
        logger.print(ml.line(epoch, i, self.steps_per_epoch)
                     + (f"  skipped: {self.skipped_steps}" if self.skipped_steps else "")
                     + f"  data_wait: {row['data_wait_frac']:.0%}")

    def _finish(self, logger: RunLogger, step_losses: list[float]) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.opts.overfit_batches == 0 and self.cfg.eval.at_end:
            self.evaluate(logger, self.step // self.steps_per_epoch)
        state = acc.get_state_dict(self.model)
        # every rank reports its step count and a digest of its weights: equal digests = in sync
        from accelerate.utils import gather_object
        mine = {"rank": self.rank, "step": self.step, "batch_size": self.local_batch,
                "skipped_steps": self.skipped_steps, "replays": self.replay_count,
                "params_sha256": params_digest(self.unwrapped)}
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        if acc.is_main_process:
            final = {"model": {k: v.detach().cpu() for k, v in state.items()}, "config": self.cfg.to_dict(),
                     "categories": list(self.vocab.categories), "attributes": list(self.vocab.attributes)}
            with atomic_open(self.run_dir / "model_final.pth", "wb") as f:
                torch.save(final, f)
            atomic_write_json(self.run_dir / "ranks.json", ranks)
            digests = {r["params_sha256"] for r in ranks}
            self.log(f"done: {self.step} steps, {self.skipped_steps} skipped; weights {self.run_dir / 'model_final.pth'}"
                     + ("" if len(digests) == 1 else "  WARNING: ranks ended with different weights"))

    def _overfit_verdict(self, step_losses: list[float]) -> int:
        k = max(1, min(len(step_losses) // 4, self.opts.overfit_batches * 2))
        if len(step_losses) < 2 * k:
            self.log(f"overfit: FAILED, only {len(step_losses)} finite steps; raise train.max_steps")
            return 1
        first = sum(step_losses[:k]) / k
        last = sum(step_losses[-k:]) / k
        ok = last <= 0.5 * first
        self.log(f"overfit: loss {first:.4f} -> {last:.4f} (mean of the first/last {k} steps): "
                 + ("passed, fell by at least half" if ok else
                    "FAILED: it did not fall by half. Check labels/targets with `shard inspect`, the lr, the loss weights"))
        return 0 if ok else 1


def _flat_numbers_any(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers_any(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(opts: RunOptions) -> int:
    return Trainer(opts).fit()
