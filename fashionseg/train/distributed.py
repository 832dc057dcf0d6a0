"""Process layout facts the loop needs: per-rank batch sizes, loss weights, precision, Accelerator.

Per-rank batch sizes may differ (mixed rigs, docs/design.md "Trainer <-> launcher"). DDP averages
gradients over ranks with equal weight, so rank r scales its loss by b_r * W / sum(b): the average
of the scaled gradients is then sum_r b_r * g_r / sum(b), the gradient of the mean over the global
batch whenever each rank's loss is a mean over its own samples (see docs/training.md for which of
Mask R-CNN's terms are exactly such means).
"""
from __future__ import annotations

import datetime
import importlib.util
import os
from dataclasses import dataclass

import torch

from fashionseg.names import LOCAL_BATCH_ENV
from fashionseg.train.config import ConfigError, TrainConfig


def local_batch_size(cfg: TrainConfig, rank: int, world_size: int, local_rank: int) -> int:
    """This rank's batch size: `train.batch_sizes[rank]`, else the launcher's per-host environment
    list indexed by LOCAL_RANK, else `train.batch_size`."""
    if cfg.batch_sizes is not None:
        if len(cfg.batch_sizes) != world_size:
            raise ConfigError(
                f"'train.batch_sizes' has {len(cfg.batch_sizes)} entries but the job has {world_size} processes: "
                "give one batch size per rank in global rank order")
        return int(cfg.batch_sizes[rank])
    env = os.environ.get(LOCAL_BATCH_ENV)
    if env:
        try:
            sizes = [int(x) for x in env.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{LOCAL_BATCH_ENV}={env!r}: expected comma-separated integers such as 2,2,4") from None
        if local_rank >= len(sizes) or min(sizes) < 1:
            raise ConfigError(f"{LOCAL_BATCH_ENV}={env!r} has no positive entry for LOCAL_RANK={local_rank}")
        return sizes[local_rank]
    return int(cfg.batch_size)


def gather_ints(value: int, world_size: int) -> list[int]:
    """All ranks' `value` in global rank order (one small collective, done once at start)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [int(value)]
    out: list[object] = [None] * world_size
    torch.distributed.all_gather_object(out, int(value))
    return [int(v) for v in out]  # type: ignore[arg-type]


def loss_weight(batch_sizes: list[int], rank: int) -> float:
    """Factor on rank `rank`'s mean loss so that DDP's equal-weight average of gradients equals
    the gradient of the mean over the global batch: b_r * W / sum(b)."""
    return batch_sizes[rank] * len(batch_sizes) / float(sum(batch_sizes))


def resolved_lr(cfg: TrainConfig, global_batch: int) -> tuple[float, str]:
    """(learning rate, how it was obtained). `auto` is the linear scaling rule (Goyal et al.):
    base_lr x global_batch / base_batch, as torchvision's reference recipe 0.02 x batch / 16."""
    if cfg.lr == "auto":
        lr = cfg.base_lr * global_batch / cfg.base_batch
        return lr, f"auto: {cfg.base_lr:g} x {global_batch}/{cfg.base_batch}"
    return float(cfg.lr), "fixed"


@dataclass
class Layout:
    """This process's place in the job: rank, world size and every rank's batch size."""

    rank: int
    world: int
    local_batch: int
    batch_sizes: list[int]
    accumulate_steps: int

    @classmethod
    def build(cls, cfg: TrainConfig, accelerator) -> "Layout":
        rank, world = accelerator.process_index, accelerator.num_processes
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != world:
            raise ConfigError(f"the launcher started {env_world} processes (WORLD_SIZE) but Accelerate formed a group of "
                              f"{world}: every rank would train its own model. Check ACCELERATE_USE_CPU / the "
                              "accelerate config on this host")
        local = local_batch_size(cfg, rank, world, accelerator.local_process_index)
        return cls(rank, world, local, gather_ints(local, world), cfg.accumulate_steps)

    @property
    def global_batch(self) -> int:
        return sum(self.batch_sizes) * self.accumulate_steps

    @property
    def loss_weight(self) -> float:
        return loss_weight(self.batch_sizes, self.rank)

    def lr(self, cfg: TrainConfig) -> tuple[float, str]:
        return resolved_lr(cfg, self.global_batch)


@dataclass
class Precision:
    mixed_precision: str   # accelerate's value: "no" | "fp16" | "bf16"
    note: str | None       # one line to print when the request could not be honoured as asked


def resolve_precision(requested: str, cuda: bool | None = None) -> Precision:
    """auto: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU. fp16 without CUDA falls
    back to fp32 (autocast to fp16 on CPU is slow and GradScaler is CUDA-only)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if requested == "auto":
        if not cuda:
            return Precision("no", None)
        return Precision("bf16" if torch.cuda.is_bf16_supported() else "fp16", None)
    if requested == "fp32":
        return Precision("no", None)
    if requested == "fp16" and not cuda:
        return Precision("no", "precision: fp16 asked for but no CUDA device is visible; training in fp32 on the CPU")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        return Precision("fp16", "precision: bf16 asked for but this GPU has no bf16 support; using fp16 + GradScaler")
    return Precision(requested, None)


def available_trackers(names: list[str]) -> tuple[list[str], list[str]]:
    """(usable tracker names, the ones asked for whose package is not installed)."""
    pkg = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    ok, missing = [], []
    for n in names:
        if n not in pkg:
            raise ConfigError(f"'log.log_with': unknown tracker '{n}' (choose from {', '.join(pkg)})")
        (ok if importlib.util.find_spec(pkg[n]) is not None else missing).append(n)
    return ok, missing


def build_accelerator(cfg: TrainConfig, log_with: list[str], project_dir: str, precision: Precision, *,
                      find_unused_parameters: bool = False):
    """The Accelerator for this run: DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO-1/2."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    plugin = None
    if cfg.backend == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin
        plugin = DeepSpeedPlugin(
            zero_stage=cfg.zero_stage,
            gradient_accumulation_steps=cfg.accumulate_steps,  # the engine's bookkeeping; step.py divides the loss
            gradient_clipping=cfg.clip_grad_norm if cfg.clip_grad_norm else 0.0,
        )
    from accelerate.utils import InitProcessGroupKwargs

    # a dead peer inside a collective ends the run after collective_timeout_s instead of never
    timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    # DeepSpeed on CPU: accelerate has no backend for it (its CPU path disables DeepSpeed) and
    # DeepSpeed's CPU default is oneCCL, not installed here; gloo works for ZeRO-1/2's collectives
    backend = "gloo" if plugin is not None and not torch.cuda.is_available() else None
    handlers: list = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
                      InitProcessGroupKwargs(backend=backend, timeout=timeout)]
    return Accelerator(
        # `--multi_gpu`/torchrun without a GPU: DDP over gloo, one process per rank (accelerate disables
        # DeepSpeed when cpu=True, so DeepSpeed runs go through its own CPU accelerator)
        cpu=not torch.cuda.is_available() and cfg.backend != "deepspeed",
        mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=1,  # the step accumulates itself (step.py), replays included
        log_with=log_with or None,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=project_dir),
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
