"""Hard-example replay: remember the highest-loss batches, take an extra optimizer step on them.
(`unit: image`, mining images instead of batches, is image_mining.py's ImageMiner, a HardMiner.)

Online hard-example replay (the Kaggle Carvana winners' trick), made safe for DDP and for resume:

- Each rank keeps, on the CPU, the `top_k` batches with the highest loss it has seen since the
  last replay: sample keys and the batch's epoch, never decoded tensors, so memory is a few
  hundred bytes per batch.
  The replay re-decodes the batch with the loader's `load_batch(keys, epoch)`, which applies the
  same augmentation (it is seeded from (seed, epoch, key)).
- The trigger `should_replay(step)` is a pure function of the global optimizer step and the
  config, so every rank takes its extra step at exactly the same steps. A local loss never
  decides whether to replay: a rank that replays when the others do not runs an extra backward
  whose gradient all-reduce nobody matches, and the job hangs.
- A rank with nothing stored (every batch of the window above `max_loss`, or non-finite) still
  replays: its most recent batch under the ceiling (or, if it never saw one, its most recent
  batch), so the collectives stay matched. `stats()["fallback_replays"]` counts these.
- `max_loss` is a ceiling: batches above it are never stored. The very highest losses in a
  fashion dataset are mostly label noise (missed instances, wrong classes), and replaying
  them teaches the noise.
- Replays do not advance the LR schedule by default (`count_in_schedule=False`): the schedule
  (warmup, milestones) stays a function of data steps, identical with mining on or off, and
  replays begin only after warmup. See docs/hard_mining.md. The setting is stored in the
  miner's state and a resume that changes it is refused.

The loop's side (docs/design.md, "Trainer <-> hard miner")::

    miner = build_miner(cfg.hard_mining, warmup_steps, local_batch_size)  # image_mining.py: either unit
    ...  # after each optimizer step `step` (1-based count of data steps done):
    if miner is not None:
        miner.observe(step, [t["key"] for t in targets], epoch, {k: v.item() for k, v in losses.items()})
        if miner.should_replay(step):
            for _ in range(miner.replays_per_trigger):   # == top_k; 1 by default
                keys, replay_epoch, loss = miner.pop()
                images, targets = loader.load_batch(keys, replay_epoch)
                ...  # forward, backward, optimizer step (scheduler.step() only if miner.count_in_schedule)
                miner.record_replay(loss_before, loss_after)   # loss_after may be None
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

STATE_VERSION = 1
# Config fields that decide *when* replays happen or how they count in the LR schedule: a resume
# that changes one of them cannot continue the run step-exactly, so load_state_dict refuses it.
_SCHEDULE_FIELDS = ("every", "start_after", "count_in_schedule")


@dataclass
class HardMiningConfig:
    """Settings of batch replay (section `hard_mining` of the run config)."""

    enabled: bool = False
    every: int = 50                     # replay after every `every`-th data step (global step count)
    top_k: int = 1                      # batches kept per window and replayed at each trigger
    start_after: int | None = None      # first window starts after this step; None: after warmup
    loss: str = "total"                 # "total" or one loss term, e.g. "loss_mask"
    max_loss: float | None = None       # ceiling: batches above it are never stored (label noise)
    count_in_schedule: bool = False     # do replay steps advance the LR scheduler? (see module doc)
    unit: Literal["batch", "image"] = "batch"  # mine whole batches, or images (image_mining.py)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"hard_mining.every must be >= 1, got {self.every}")
        if self.top_k < 1:
            raise ValueError(f"hard_mining.top_k must be >= 1, got {self.top_k}")
        if self.start_after is not None and self.start_after < 0:
            raise ValueError(f"hard_mining.start_after must be >= 0 or null, got {self.start_after}")
        if self.max_loss is not None and not (self.max_loss > 0 and math.isfinite(self.max_loss)):
            raise ValueError(f"hard_mining.max_loss must be a positive finite number or null, got {self.max_loss}")
        if not self.loss:
            raise ValueError("hard_mining.loss must be 'total' or a loss term name such as 'loss_mask'")
        if self.unit not in ("batch", "image"):
            raise ValueError(f"hard_mining.unit must be 'batch' or 'image', got {self.unit!r}")


@dataclass
class Replay:
    """One batch to replay. Unpacks as `keys, epoch, loss = miner.pop()`."""

    keys: list[str]
    epoch: int
    loss: float                         # the loss it had when observed (nan for a fallback never scored)
    step: int                           # the data step at which it was observed
    fallback: bool = False              # True: not a mined batch, replayed only to keep ranks in step
    epochs: list[int] | None = None     # unit=image: each key's own epoch (None: all `epoch`)

    def key_epochs(self) -> list[int]:
        """The epoch of each key (`loader.load_batch` takes one epoch per call)."""
        return list(self.epochs) if self.epochs is not None else [self.epoch] * len(self.keys)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.keys, self.epoch, self.loss))


@dataclass
class _Batch:
    step: int
    keys: list[str]
    epoch: int
    loss: float

    @property
    def nbytes(self) -> int:
        return sum(len(k.encode("utf-8")) for k in self.keys)

    def to_plain(self) -> dict[str, Any]:
        loss = self.loss if math.isfinite(self.loss) else repr(self.loss)  # JSON has no nan/inf
        return {"step": self.step, "keys": list(self.keys), "epoch": self.epoch, "loss": loss}

    @classmethod
    def from_plain(cls, d: Mapping[str, Any]) -> "_Batch":
        return cls(int(d["step"]), [str(k) for k in d["keys"]], int(d["epoch"]), float(d["loss"]))


class HardMiner:
    """Rank-local store of the hardest recent batches with a rank-independent replay trigger."""

    def __init__(self, cfg: HardMiningConfig, start_after: int) -> None:
        self.cfg = cfg
        self.start_after = int(start_after)
        self._window: list[_Batch] = []        # top_k hardest since the last replay, hardest first
        self._recent: _Batch | None = None     # most recent batch observed (any loss)
        self._recent_ok: _Batch | None = None  # most recent batch with a finite loss under the ceiling
        self._pops_since_observe = 0
        self._stats: dict[str, Any] = {
            "observed": 0, "skipped_above_max": 0, "skipped_nonfinite": 0,
            "replays": 0, "fallback_replays": 0,
            "last_replay_step": None, "last_mined_loss": None, "last_loss_before": None, "last_loss_after": None,
            "mean_loss_drop": None, "_sum_drop": 0.0, "_n_drop": 0,
        }

    # -- schedule ------------------------------------------------------------------------------
    @property
    def count_in_schedule(self) -> bool:
        """Whether the loop calls scheduler.step() after a replay step."""
        return self.cfg.count_in_schedule

    @property
    def replays_per_trigger(self) -> int:
        """How many times the loop calls pop() (and steps) at each trigger; equal on every rank."""
        return self.cfg.top_k

    def should_replay(self, step: int) -> bool:
        """True after data step `step` when a replay is due: a function of `step` and the config
        only, so every rank gets the same answer at the same step."""
        return step > self.start_after and (step - self.start_after) % self.cfg.every == 0

    # -- mining --------------------------------------------------------------------------------
    def score(self, losses: Mapping[str, Any]) -> float:
        """The configured loss of a step's loss dict ("total": `losses["total"]` or `losses["loss"]`
        when present, else the sum of the terms, which the model returns already weighted)."""
        name = self.cfg.loss
        if name == "total":
            for total_key in ("total", "loss"):
                if total_key in losses:
                    return float(losses[total_key])
            return float(sum(float(v) for v in losses.values()))
        if name not in losses:
            raise KeyError(f"hard_mining.loss={name!r} is not a loss term of this model "
                           f"(terms: {', '.join(sorted(losses))}); set hard_mining.loss to one of them or 'total'")
        return float(losses[name])

    def observe(self, step: int, keys: Sequence[str], epoch: int, losses: Mapping[str, Any],
                image_losses: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Record the batch of data step `step` (its sample keys, epoch and loss terms), after its
        optimizer step. `image_losses` (per image) is for ImageMiner; a batch is scored by `losses`."""
        if self._pops_since_observe:  # the last trigger is over: a new window starts
            self._window.clear()
            self._pops_since_observe = 0
        loss = self.score(losses)
        batch = _Batch(int(step), [str(k) for k in keys], int(epoch), loss)
        self._stats["observed"] += 1
        self._recent = batch
        if not math.isfinite(loss):
            self._stats["skipped_nonfinite"] += 1
            return
        if self.cfg.max_loss is not None and loss > self.cfg.max_loss:
            self._stats["skipped_above_max"] += 1
            return
        self._recent_ok = batch
        if step <= self.start_after:
            return
        self._window.append(batch)
        # hardest first; ties go to the later step, so the order never depends on insertion
        self._window.sort(key=lambda b: (b.loss, b.step), reverse=True)
        del self._window[self.cfg.top_k:]

    def pop(self) -> Replay:
        """This rank's hardest batch of the window (removed from it). With nothing left, the most
        recent batch under the ceiling (else the most recent batch) with `fallback=True`: every
        rank must step when the others do."""
        if self._recent is None:
            raise RuntimeError("HardMiner.pop() before any observe(): the loop must call observe() after "
                               "every optimizer step, and restore the miner's state on resume")
        self._pops_since_observe += 1
        self._stats["replays"] += 1
        if self._window:
            b = self._window.pop(0)
            fallback = False
        else:
            b = self._recent_ok if self._recent_ok is not None else self._recent
            fallback = True
            self._stats["fallback_replays"] += 1
        self._stats["last_replay_step"] = self._recent.step
        self._stats["last_mined_loss"] = b.loss
        return Replay(list(b.keys), b.epoch, b.loss, b.step, fallback)

    def record_replay(self, loss_before: float | Mapping[str, Any], loss_after: float | Mapping[str, Any] | None = None) -> None:
        """Log the replayed batch's loss in the replay step's forward (before its update) and, when
        the loop measured it, after the update. Loss dicts are scored like observe()'s. (The loss
        it had when it was mined is `Replay.loss`, logged as `last_mined_loss`.)"""
        before = self.score(loss_before) if isinstance(loss_before, Mapping) else float(loss_before)
        after = None
        if loss_after is not None:
            after = self.score(loss_after) if isinstance(loss_after, Mapping) else float(loss_after)
        s = self._stats
        s["last_loss_before"], s["last_loss_after"] = before, after
        if after is not None and math.isfinite(before) and math.isfinite(after):
            s["_sum_drop"] += before - after
            s["_n_drop"] += 1
            s["mean_loss_drop"] = s["_sum_drop"] / s["_n_drop"]

    # -- reporting and state -------------------------------------------------------------------
    def _held(self) -> list[_Batch]:
        # identity by content, not id(): after load_state_dict `recent` and a window entry that were
        # one object are two equal copies, and the report must not change across a resume
        held = {(b.step, tuple(b.keys)): b for b in (*self._window, self._recent, self._recent_ok) if b is not None}
        return list(held.values())

    def stats(self) -> dict[str, Any]:
        """Plain numbers for the logs (rank-local): replays, loss before/after, memory held."""
        held = self._held()
        out = {k: v for k, v in self._stats.items() if not k.startswith("_")}
        out.update(batches_held=len(held), bytes_held=sum(b.nbytes for b in held),
                   window_size=len(self._window), window_max_loss=self._window[0].loss if self._window else None)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain types only (JSON- and `torch.load(weights_only=True)`-safe). Rank-local: the
        checkpoint must keep one per rank, as it does for RNG states."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.cfg),
            "start_after": self.start_after,
            "window": [b.to_plain() for b in self._window],
            "recent": None if self._recent is None else self._recent.to_plain(),
            "recent_ok": None if self._recent_ok is None else self._recent_ok.to_plain(),
            "pops_since_observe": self._pops_since_observe,
            "stats": dict(self._stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_resumable(state)
        self._window = [_Batch.from_plain(d) for d in state["window"]][: self.cfg.top_k]
        self._recent = None if state["recent"] is None else _Batch.from_plain(state["recent"])
        self._recent_ok = None if state["recent_ok"] is None else _Batch.from_plain(state["recent_ok"])
        self._pops_since_observe = int(state["pops_since_observe"])
        self._stats = dict(state["stats"])

    def check_resumable(self, state: Mapping[str, Any]) -> None:
        """Refuse a state this run cannot continue step-exactly (version, unit, schedule fields)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"hard-miner state version {state.get('version')!r} is not supported "
                             f"(this fashionseg writes version {STATE_VERSION})")
        saved = dict(state["config"], start_after=state["start_after"])
        now = dict(asdict(self.cfg), start_after=self.start_after)
        if saved.get("unit", "batch") != self.cfg.unit:
            raise ValueError(f"cannot resume: hard_mining.unit was {saved.get('unit', 'batch')!r} in the checkpoint and is "
                             f"{self.cfg.unit!r} now; the miner's state differs. Resume with hard_mining.unit="
                             f"{saved.get('unit', 'batch')!r} or start a new run")
        for key in _SCHEDULE_FIELDS:
            if saved[key] != now[key]:
                raise ValueError(
                    f"cannot resume: hard_mining.{key} was {saved[key]!r} in the checkpoint and is {now[key]!r} now; "
                    f"it decides when replays happen and how they count in the LR schedule, so the run would not "
                    f"continue step-exactly. Resume with hard_mining.{key}={saved[key]!r} or start a new run")


def resolve_start(cfg: HardMiningConfig, warmup_steps: int) -> int:
    """`start_after=None` means the first window opens after the LR warmup (`warmup_steps` data steps)."""
    return cfg.start_after if cfg.start_after is not None else max(0, int(warmup_steps))



__all__ = ["HardMiningConfig", "HardMiner", "Replay", "resolve_start"]
