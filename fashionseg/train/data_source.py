"""Where the loop's batches come from: the loader across epochs, or K fixed batches (overfit).

The loop asks only for the next micro-batch and, after each optimizer step, whether an epoch just
ended. An epoch ends when fewer micro-batches remain than one step needs (with
`train.accumulate_steps` not dividing the epoch, the remainder is left out, so a step never spans
two epochs); the loader is then moved to the next epoch at once, so a checkpoint taken at the end
of an epoch records a clean epoch boundary.
"""
from __future__ import annotations

from typing import Any


class EpochStream:
    def __init__(self, loader, accumulate_steps: int) -> None:
        self.loader, self.accumulate = loader, accumulate_steps
        self._it = None
        self.epoch_ended = False
        self.last_epoch = loader.epoch      # epoch of the batches of the last step
        self.step_in_epoch = 0              # steps taken in that epoch (for the log line)

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self.loader.set_epoch(self.loader.epoch)
            self._it = iter(self.loader)
        return next(self._it)

    def end_step(self) -> None:
        """Called once after every optimizer step."""
        self.last_epoch = self.loader.epoch
        left = self.loader.steps_left()
        self.step_in_epoch = max(0, self.loader.steps_per_epoch - left) // self.accumulate
        self.epoch_ended = left < self.accumulate
        if self.epoch_ended:
            self._it = None  # close the finished epoch's iterator (and its workers)
            self.loader.set_epoch(self.loader.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None
        self.last_epoch = self.loader.epoch
        self.step_in_epoch = max(0, self.loader.steps_per_epoch - self.loader.steps_left()) // self.accumulate


class FixedBatches:
    """--overfit-batches K: the first K steps' batches of epoch 0, cycled (never checkpointed)."""

    epoch = last_epoch = 0
    epoch_ended = False

    def __init__(self, loader, steps: int, accumulate_steps: int) -> None:
        loader.set_epoch(0)
        it = iter(loader)
        self.batches = [next(it) for _ in range(steps * accumulate_steps)]
        self.accumulate = accumulate_steps
        self._i = 0
        self.step_in_epoch = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batches[self._i % len(self.batches)]
        self._i += 1
        return batch

    def end_step(self) -> None:
        self.step_in_epoch = (self._i // self.accumulate) % max(1, len(self.batches) // self.accumulate) or len(self.batches) // self.accumulate
