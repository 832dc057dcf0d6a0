"""Hard mining per image (`hard_mining.unit: image`): a pool of the hardest images, replayed in batches.

A batch's loss is the mean over its images, so one hard image among easy ones hides, and a batch
miner replays the easy ones with it. Here every image brings its own loss (the model's per-image
losses, model/per_image_loss.py, fetched in the step's one host sync), and each rank keeps a pool
of the `top_k x batch_size` hardest images (key, epoch, loss) seen since the last replay. At a
trigger it replays `top_k` batches of its own per-rank batch size, hardest images first.

Everything the batch miner guarantees holds (it is a HardMiner: same trigger, same config checks):
- the trigger is the global step's, and every rank runs `top_k` replay steps of `batch_size`
  images, whatever its pool holds: a rank with fewer pooled images than a batch needs tops the
  batch up with its most recent images under the ceiling (else its most recent images), as the
  batch miner falls back to its most recent batch (`Replay.fallback`, `fallback_images`);
- `max_loss` is a ceiling per image: an image above it never enters the pool;
- memory is bounded: at most `(top_k + 2) x batch_size` images (pool, recent, recent under the
  ceiling), keys only;
- `state_dict()` holds plain types and a resume continues exactly.
Stats count images (`observed`, `skipped_above_max`, `skipped_nonfinite`), replays count steps.
A replay batch may mix epochs: `Replay.epochs` gives each key's own, for its augmentation.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from fashionseg.train.hard_mining import STATE_VERSION, HardMiner, HardMiningConfig, Replay, resolve_start


@dataclass
class _Image:
    step: int
    key: str
    epoch: int
    loss: float

    def to_plain(self) -> dict[str, Any]:
        loss = self.loss if math.isfinite(self.loss) else repr(self.loss)  # JSON has no nan/inf
        return {"step": self.step, "key": self.key, "epoch": self.epoch, "loss": loss}

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> "_Image":
        return cls(int(d["step"]), str(d["key"]), int(d["epoch"]), float(d["loss"]))


class ImageMiner(HardMiner):
    """Rank-local pool of the hardest recent images, replayed as batches of `batch_size`."""

    def __init__(self, cfg: HardMiningConfig, start_after: int, batch_size: int) -> None:
        super().__init__(cfg, start_after)
        if batch_size < 1:
            raise ValueError(f"per-image mining needs this rank's batch size >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._pool: list[_Image] = []       # hardest since the last replay, hardest first
        self._last: list[_Image] = []       # the most recent `batch_size` images (any loss)
        self._last_ok: list[_Image] = []    # the most recent `batch_size` images under the ceiling
        self._stats["fallback_images"] = 0

    @property
    def capacity(self) -> int:
        return self.cfg.top_k * self.batch_size

    def observe(self, step: int, keys: Sequence[str], epoch: int, losses: Mapping[str, Any],
                image_losses: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Record data step `step`'s images with their own loss terms (`image_losses[i]` is
        `keys[i]`'s); `losses` (the batch's) is not used."""
        if image_losses is None or len(image_losses) != len(keys):
            raise ValueError(f"hard_mining.unit=image needs one loss dict per image: {len(keys)} keys, "
                             f"{'none' if image_losses is None else len(image_losses)} per-image losses "
                             "(the Stepper computes them with image_losses=True)")
        if self._pops_since_observe:  # the last trigger is over: a new window starts
            self._pool.clear()
            self._pops_since_observe = 0
        for key, terms in zip(keys, image_losses):
            img = _Image(int(step), str(key), int(epoch), self.score(terms))
            self._stats["observed"] += 1
            self._last.append(img)
            if not math.isfinite(img.loss):
                self._stats["skipped_nonfinite"] += 1
                continue
            if self.cfg.max_loss is not None and img.loss > self.cfg.max_loss:
                self._stats["skipped_above_max"] += 1
                continue
            self._last_ok.append(img)
            if step > self.start_after:
                self._pool.append(img)
        del self._last[: -self.batch_size], self._last_ok[: -self.batch_size]
        # hardest first; ties: the later step, then the key, so the order never depends on insertion
        self._pool.sort(key=lambda i: (i.loss, i.step, i.key), reverse=True)
        del self._pool[self.capacity:]

    def pop(self) -> Replay:
        """This rank's next replay batch: the `batch_size` hardest pooled images (removed from the
        pool), topped up with its most recent images when the pool runs short (`fallback=True`)."""
        if not self._last:
            raise RuntimeError("HardMiner.pop() before any observe(): the loop must call observe() after "
                               "every optimizer step, and restore the miner's state on resume")
        self._pops_since_observe += 1
        self._stats["replays"] += 1
        chosen = self._pool[: self.batch_size]
        del self._pool[: self.batch_size]
        mined = len(chosen)
        taken = {i.key for i in chosen}
        fillers = [*reversed(self._last_ok), *reversed(self._last)]  # most recent, under the ceiling first
        for img in fillers:
            if len(chosen) < self.batch_size and img.key not in taken:
                chosen.append(img)
                taken.add(img.key)
        repeats = itertools.cycle(fillers)  # fewer distinct images than a batch (tiny data): repeat
        while len(chosen) < self.batch_size:
            chosen.append(next(repeats))
        if mined < self.batch_size:
            self._stats["fallback_replays"] += 1
            self._stats["fallback_images"] += self.batch_size - mined
        finite = [i.loss for i in chosen if math.isfinite(i.loss)]
        loss = sum(finite) / len(finite) if finite else float("nan")
        self._stats["last_replay_step"] = self._last[-1].step
        self._stats["last_mined_loss"] = loss
        return Replay([i.key for i in chosen], chosen[0].epoch, loss, chosen[0].step, mined < self.batch_size,
                      [i.epoch for i in chosen])

    # -- reporting and state -------------------------------------------------------------------
    def _held(self) -> list[_Image]:
        held = {(i.step, i.key): i for i in (*self._pool, *self._last, *self._last_ok)}
        return list(held.values())

    def stats(self) -> dict[str, Any]:
        held = self._held()
        out = {k: v for k, v in self._stats.items() if not k.startswith("_")}
        out.update(images_held=len(held), bytes_held=sum(len(i.key.encode("utf-8")) for i in held),
                   window_size=len(self._pool), window_max_loss=self._pool[0].loss if self._pool else None)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": asdict(self.cfg),
            "start_after": self.start_after,
            "batch_size": self.batch_size,
            "pool": [i.to_plain() for i in self._pool],
            "last": [i.to_plain() for i in self._last],
            "last_ok": [i.to_plain() for i in self._last_ok],
            "pops_since_observe": self._pops_since_observe,
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_resumable(state)
        self._pool = [_Image.from_plain(d) for d in state["pool"]][: self.capacity]
        self._last = [_Image.from_plain(d) for d in state["last"]][-self.batch_size:]
        self._last_ok = [_Image.from_plain(d) for d in state["last_ok"]][-self.batch_size:]
        self._pops_since_observe = int(state["pops_since_observe"])
        self._stats = dict(state["stats"])


def build_miner(cfg: HardMiningConfig, warmup_steps: int, batch_size: int) -> HardMiner | None:
    """The run's miner for `hard_mining.unit` (None when off); `batch_size`: this rank's per-rank
    batch size, the size of its replay batches with unit=image. `start_after=None` opens the first
    window after the LR warmup (`warmup_steps` data steps)."""
    if not cfg.enabled:
        return None
    start = resolve_start(cfg, warmup_steps)
    return ImageMiner(cfg, start, batch_size) if cfg.unit == "image" else HardMiner(cfg, start)


def load_replay(loader, replay: Replay):
    """The replay batch `(images, targets)` in `replay.keys` order, each sample with the augmentation
    of its own epoch (`loader.load_batch` decodes one epoch per call)."""
    epochs = replay.key_epochs()
    if len(set(epochs)) == 1:
        return loader.load_batch(replay.keys, epochs[0])
    parts = {}
    for e in dict.fromkeys(epochs):
        images, targets = loader.load_batch([k for k, x in zip(replay.keys, epochs) if x == e], e)
        parts[e] = iter(list(zip(images, targets)))
    pairs = [next(parts[e]) for e in epochs]
    return [p[0] for p in pairs], [p[1] for p in pairs]


__all__ = ["ImageMiner", "build_miner", "load_replay"]
