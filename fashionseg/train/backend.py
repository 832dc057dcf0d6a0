"""Where DDP and DeepSpeed differ, in one place: backward, the optimizer step or its skip, and the
parts a checkpoint holds.

Both backends get the loss already divided by the number of micro-batches of the step (the step
owns gradient accumulation, so a one-batch replay needs no correction). A skipped step means the
same everywhere: weights, optimizer state (momentum) and schedule do not move. DDP simply does
not step. DeepSpeed steps inside its engine, so the step makes the gradients non-finite and lets
ZeRO's own overflow check skip the update (switched on here also for fp32, where DeepSpeed leaves
it off).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from fashionseg.train.config import TrainConfig


class DDPBackend:
    """One process or DistributedDataParallel (gloo on CPU, NCCL on GPU) through accelerate."""

    name = "ddp"

    def __init__(self, accelerator, model, optimizer, cfg: TrainConfig) -> None:
        self.accelerator, self.model, self.optimizer, self.cfg = accelerator, model, optimizer, cfg

    def micro(self, last: bool):
        """Context for one micro-batch's forward+backward: DDP syncs gradients on the last only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, last: bool) -> None:  # noqa: ARG002 - same signature as DeepSpeed's
        self.accelerator.backward(loss)

    def step(self, skip: bool) -> bool:
        """The optimizer step (or not, when `skip`); True when the weights moved (GradScaler may
        still skip an fp16 step whose gradients overflowed)."""
        applied = False
        if not skip:
            if self.cfg.clip_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.optimizer.step()
            applied = not self.accelerator.optimizer_step_was_skipped
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def parts(self, unwrapped: torch.nn.Module) -> dict[str, Any]:
        return {"model": unwrapped, "optimizer": self.optimizer}

    external_save = None

    def external_load(self, folder: Path) -> None:  # noqa: ARG002 - nothing kept outside trainer.pth
        return None


class DeepSpeedBackend(DDPBackend):
    """DeepSpeed ZeRO-1/2 through accelerate: the engine does backward, clipping and the step;
    model and optimizer states are sharded, saved by accelerate's save_state beside trainer.pth."""

    name = "deepspeed"

    def __init__(self, accelerator, model, optimizer, cfg: TrainConfig) -> None:
        super().__init__(accelerator, model, optimizer, cfg)
        self.engine = accelerator.deepspeed_engine_wrapped.engine
        self.engine.optimizer.check_grad_overflow = True  # fp32 ZeRO would otherwise step on NaN gradients

    def micro(self, last: bool):  # noqa: ARG002 - the engine knows its boundary from backward()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(is_boundary=last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the step already divided by its micro-batches

    def step(self, skip: bool) -> bool:  # noqa: ARG002 - a skip arrives as non-finite gradients
        self.engine.step()
        return bool(self.engine.was_step_applied())

    def parts(self, unwrapped: torch.nn.Module) -> dict[str, Any]:  # noqa: ARG002
        return {}

    def external_save(self, folder: Path) -> None:
        self.accelerator.save_state(str(folder))

    def external_load(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))


def build_backend(accelerator, model, optimizer, cfg: TrainConfig) -> DDPBackend:
    return (DeepSpeedBackend if cfg.backend == "deepspeed" else DDPBackend)(accelerator, model, optimizer, cfg)
