"""The training loader: owns the rank split, equal steps, step-exact and elastic resume.

Contract with the trainer (keep stable):

    loader = build_loader(cfg: LoaderConfig, shard_dir, "train", rank=r, world_size=n,
                          batch_sizes=[b_0, ..., b_{n-1}], seed=s)
    loader.vocab                 # Vocab from the manifest (num_categories, num_attributes)
    loader.set_epoch(e)          # a new epoch resets the position; the current epoch keeps it
    len(loader)                  # = loader.steps_per_epoch: steps of a full epoch on this layout
    loader.steps_left()          # steps this rank still yields in the current epoch (all ranks equal)
    loader.samples_per_epoch, loader.samples_consumed()   # stream items per epoch / used this epoch
    for images, targets in loader: ...     # docs/design.md "Training targets"; targets[i]["key"]
    loader.state_dict() / loader.load_state_dict(sd)   # layout-free data position (below)
    loader.layout_change         # after load_state_dict: None (same layout) or one line to print
    loader.load_batch(keys, epoch)         # re-decode a past batch from its keys (hard mining)

- Position: iterating yields the steps not consumed yet in the current epoch; when an epoch's
  last batch has been taken and the iterator is exhausted, the loader moves to (epoch + 1, 0),
  so `set_epoch(e + 1)` afterwards is a no-op and a checkpoint taken after the epoch says so.
  `state_dict()` counts batches handed to the caller (not the ones prefetched by workers).
- Layout-free state: the epoch, the set of epoch-stream positions consumed in it (a bitmap over
  the layout-free stream of fashionseg/data/plan.py) and the duplicates consumed, plus how the
  current plan was made. Every rank's state is the same (ranks step together), so any rank's
  state resumes any rank of any layout. `load_state_dict` on the same world size, batch sizes,
  workers and aspect grouping continues the same plan at the same step: bit-exact, reading (and
  never decoding) only what the remaining steps need. On another layout it plans the rest of the
  epoch over what was not consumed (every sample still once, equal steps, the duplicates that
  needs counted) and says so in `layout_change`. Refused with LoaderStateError, naming what
  changed: other shards, split, seed or subset; mid-epoch also other stream options (chunk size,
  mix chunks, repeat-factor threshold), which are free at an epoch end.
- Split: the plan gives each (rank, worker) its own batches; workers tag each batch with its step
  and the main process yields them in step order, so the batch sequence does not depend on worker
  timing. `workers=0` decodes in the calling process.
- Do NOT pass this loader through `accelerator.prepare()`: it would shard the stream a second
  time (IterableDatasetShard) or broadcast rank 0's batches (dispatch_batches), and
  `accelerator.skip_first_batches` would decode what a resume skips. The loader is not a
  torch DataLoader, so prepare() has nothing to wrap anyway. Move batches to the device in the
  trainer (`images = [i.to(dev) for i in images]`, the tensors of each target dict likewise;
  `key` and `orig_size` stay on the host).
- Augmentation randomness comes from (seed, epoch, key) only (fashionseg/data/transforms.py; the
  copy-paste partner too, fashionseg/data/copy_paste.py),
  so `load_batch(keys, epoch)` returns the same tensors the epoch yielded for those keys, and a
  re-planned epoch gives a sample the augmentation it would have had on the old layout.
- Workers send what `SampleTransform.decode` makes (uint8 images, mask runs); `finish_sample`
  makes the training pair in this process, which is cheaper than shipping painted masks.
- Steps per epoch are constant across epochs, also with repeat-factor sampling (its total of
  repeats is fixed; which images get the fractional extra copy varies by epoch).
- Evaluation does not read through this loader: see fashionseg/data/eval_source.py.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fashionseg.data.copy_paste import CopyPaste
from fashionseg.data.plan import EpochPlan, PlanConfig, PlanError, Pool, build_plan, build_pool
from fashionseg.data.shards.reader import ManifestError, read_manifest, read_samples
from fashionseg.data.transforms import SampleTransform, finish_sample
from fashionseg.data.vocab import Vocab


class LoaderStateError(ValueError):
    """A loader state this loader cannot continue (the message says what changed)."""


@dataclass
class LoaderConfig:
    """The `data:` section (batch sizes belong to the trainer: `train.batch_size(s)`)."""

    workers: int = 2  # decode processes per rank; 0 = decode in the training process
    min_size: list[int] = field(default_factory=lambda: [800])  # shorter-side choices (multi-scale)
    max_size: int = 1333  # longer side cap
    test_size: int | None = None  # eval shorter side; None = max(min_size) (read by eval, not here)
    hflip: float = 0.5  # probability
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    repeat_factor_threshold: float = 0.0  # LVIS repeat-factor sampling t; 0 = off
    group_aspect_ratio: bool = True  # portrait-only / landscape-only batches
    chunk_size: int = 32  # consecutive samples of a shard read as one unit
    mix_chunks: int = 4  # chunks shuffled together (shuffle buffer = chunk_size * mix_chunks)
    subset: int | None = None  # only the first N samples of the split (debug)
    prefetch_factor: int = 2  # batches in flight per worker
    pin_memory: bool = False
    tune_malloc: bool = True  # glibc keeps big freed buffers for reuse, in workers and this process (tune_malloc)
    copy_paste: float = 0.0  # probability of pasting another sample's instances on a sample (data/copy_paste.py); 0 = off
    copy_paste_min_area: int = 16  # pixels (output grid): an occluded instance left smaller is dropped

    def __post_init__(self) -> None:
        if not self.min_size or any(s < 1 for s in self.min_size) or self.max_size < 1:
            raise ValueError(f"data.min_size must be a non-empty list of sizes >= 1 and data.max_size >= 1 (got {self.min_size}, {self.max_size})")
        if not 0.0 <= self.hflip <= 1.0 or self.color_jitter < 0:
            raise ValueError("data.hflip must be in [0, 1] and data.color_jitter >= 0")
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ValueError(f"data.copy_paste is a probability: it must be in [0, 1] (got {self.copy_paste}; 0 turns it off)")
        if self.copy_paste_min_area < 1:
            raise ValueError(f"data.copy_paste_min_area must be >= 1 pixel (got {self.copy_paste_min_area})")

    def plan_config(self) -> PlanConfig:
        return PlanConfig(self.chunk_size, self.mix_chunks, self.repeat_factor_threshold, self.group_aspect_ratio,
                          self.subset)


# -- reading --------------------------------------------------------------------------------------
def iter_raw_batches(shard_dir: Path, plan: EpochPlan, batches: list[list[int]]) -> Iterator[list[tuple[int, tuple]]]:
    """Raw samples of `batches` (stream positions), batch by batch, reading the stream window by
    window (each window's samples once, nearby ones in one sequential read) and holding raw bytes
    only until the batch that needs them is complete."""
    need = sorted(p for b in batches for p in b)
    have: dict[int, tuple] = {}
    nxt = 0
    for _, positions in itertools.groupby(need, key=lambda p: int(plan.stream_window[p])):
        positions = list(positions)
        raw = read_samples(shard_dir, plan.pool, [plan.stream_pool[p] for p in positions])
        for p in positions:
            have[p] = raw[int(plan.stream_pool[p])]
        while nxt < len(batches) and all(p in have for p in batches[nxt]):
            yield [(int(plan.stream_pool[p]), have.pop(p)) for p in batches[nxt]]
            nxt += 1
    assert nxt == len(batches), "every planned batch was read"


class _RankStream(IterableDataset):
    """One rank's remaining steps of one epoch; in a DataLoader worker, only that worker's steps."""

    def __init__(self, shard_dir: Path, plan: EpochPlan, rank: int, start: int, transform: SampleTransform,
                 copy_paste: CopyPaste | None):
        self.shard_dir, self.plan, self.rank, self.start, self.transform = shard_dir, plan, rank, start, transform
        self.copy_paste = copy_paste

    def __iter__(self):
        info = get_worker_info()
        c = self.plan.consumers[(self.rank, info.id if info is not None else 0)]
        k0 = bisect.bisect_left(c.steps, self.start)
        raw = iter_raw_batches(self.shard_dir, self.plan, c.batches[k0:])
        for step, batch in zip(c.steps[k0:], raw):
            yield step, _decode(self.transform, self.copy_paste, batch, self.plan.epoch)


def _decode(transform: SampleTransform, copy_paste: CopyPaste | None, batch, epoch: int) -> list[tuple[np.ndarray, dict]]:
    out = [transform.decode(key, jpg, meta, epoch=epoch, image_id=image_id) for image_id, (key, jpg, meta) in batch]
    return out if copy_paste is None else [copy_paste(d, epoch) for d in out]


def _finish(decoded: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """In the consuming process: the training pairs of what workers sent (transforms.finish_sample):
    uint8 images (the model converts on its device) and painted masks."""
    pairs = [finish_sample(img, wire) for img, wire in decoded]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _identity(x):
    return x


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Let glibc reuse large freed buffers instead of unmapping them (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD to 1 GiB). Every decoded image, mask and float tensor is a fresh multi-MB
    allocation; by default glibc mmaps each and the kernel zero-fills it page by page, which
    measured 5x the cost of the arithmetic on them (19 ms -> 3 ms for one 0.5-Mpx colour jitter
    on a VM). Process-wide; False where this is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1)
    except (OSError, AttributeError):
        return False


def _worker_init(_: int) -> None:
    tune_malloc()


# -- the position -------------------------------------------------------------------------------
def _pack(mask: np.ndarray | None) -> str | None:
    return None if mask is None else base64.b64encode(np.packbits(mask).tobytes()).decode("ascii")


def _unpack(text: str | None, n: int) -> np.ndarray | None:
    if text is None:
        return None
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).astype(bool)


def _layout_text(batch_sizes: Sequence[int], workers: int) -> str:
    n = len(batch_sizes)
    return f"{n} rank{'s' if n > 1 else ''} x batch {','.join(map(str, batch_sizes))}, {workers} worker{'s' if workers != 1 else ''}"


STATE_FORMAT, STATE_VERSION = "fashionseg-loader-position", 2


# -- the loader -----------------------------------------------------------------------------------
class ShardLoader:
    def __init__(self, cfg: LoaderConfig, shard_dir: str | Path, split: str, *, rank: int, world_size: int,
                 batch_sizes: Sequence[int], seed: int):
        self.cfg, self.shard_dir, self.split_name = cfg, Path(shard_dir), split
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is outside world size {world_size}")
        if len(batch_sizes) != world_size:
            raise PlanError(f"{len(batch_sizes)} per-rank batch sizes for {world_size} ranks: give one per rank")
        self.batch_sizes = [int(b) for b in batch_sizes]
        manifest = read_manifest(self.shard_dir)
        if split not in manifest["splits"]:
            raise ManifestError(f"{self.shard_dir}: no split '{split}' (has {', '.join(manifest['splits'])})")
        self.split = manifest["splits"][split]
        self.vocab = Vocab.from_dict(manifest, str(self.shard_dir / "manifest.json"))
        self.plan_cfg = cfg.plan_config()
        self.pool = build_pool(self.split, self.plan_cfg.subset)
        self.transform = SampleTransform(self.vocab, list(cfg.min_size), cfg.max_size, hflip=cfg.hflip,
                                         color_jitter=cfg.color_jitter, seed=self.seed)
        self.copy_paste = (CopyPaste(cfg.copy_paste, cfg.copy_paste_min_area, self.shard_dir, self.pool, self.transform)
                           if cfg.copy_paste > 0 else None)
        # position: the epoch, what was consumed in it before the current plan, steps of that plan taken
        self.epoch, self.consumed = 0, 0
        self._before: np.ndarray | None = None  # None: nothing (the plan of the full epoch)
        self._dups_before = 0
        self.layout_change: str | None = None
        self._plan: EpochPlan | None = None
        self._key_index: dict[str, int] | None = None
        self.plan()  # fail now, not at the first step, when the layout cannot work

    # -- plan and position ---------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of the current epoch from the current plan's start; of another epoch, in full."""
        if epoch is not None and epoch != self.epoch:
            return build_plan(self.split, seed=self.seed, epoch=epoch, batch_sizes=self.batch_sizes,
                              workers=self.cfg.workers, cfg=self.plan_cfg, pool=self.pool)
        if self._plan is None or self._plan.epoch != self.epoch:
            self._plan = build_plan(self.split, seed=self.seed, epoch=self.epoch, batch_sizes=self.batch_sizes,
                                    workers=self.cfg.workers, cfg=self.plan_cfg, pool=self.pool, consumed=self._before)
        return self._plan

    def _move_to(self, epoch: int, before: np.ndarray | None = None, dups: int = 0, steps: int = 0) -> None:
        self.epoch, self._before, self._dups_before, self.consumed = int(epoch), before, int(dups), int(steps)
        self._plan = None

    @property
    def steps_per_epoch(self) -> int:
        """Steps of a full epoch on this layout: ceil(stream items / global batch), every epoch."""
        return -(-self.plan().stream_len // sum(self.batch_sizes))

    def __len__(self) -> int:
        return self.steps_per_epoch

    def steps_left(self) -> int:
        """Steps this rank (every rank) still yields in the current epoch."""
        return self.plan().rank_steps[self.rank] - self.consumed

    @property
    def samples_per_epoch(self) -> int:
        """Items in an epoch's stream: the samples plus repeat-factor copies (duplicates not counted)."""
        return self.plan().stream_len

    def samples_consumed(self) -> int:
        """Stream items of the current epoch already yielded, on this layout and any before it."""
        return int(self.position()[0].sum())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._move_to(epoch)

    def position(self) -> tuple[np.ndarray, int]:
        """(epoch-stream positions consumed in the current epoch, duplicates consumed in it)."""
        mask, dups = self.plan().consumed_after(self.consumed)
        return mask, self._dups_before + dups

    def _data(self) -> dict:
        """What the epoch stream is made of and a resume can never change."""
        h = hashlib.sha256(json.dumps([[s["name"], s.get("sha256", ""), s["num_samples"]] for s in self.split["shards"]]).encode())
        return {"split": self.split_name, "seed": self.seed, "subset": self.plan_cfg.subset, "num_samples": len(self.pool),
                "shards": len(self.split["shards"]), "shard_files": h.hexdigest()[:16]}

    def _stream_options(self) -> dict:
        c = self.plan_cfg
        return {"chunk_size": c.chunk_size, "mix_chunks": c.mix_chunks, "repeat_factor_threshold": c.repeat_factor_threshold}

    def _layout(self) -> dict:
        return {"batch_sizes": self.batch_sizes, "workers": self.cfg.workers, "group_aspect_ratio": self.plan_cfg.group_aspect_ratio}

    def state_dict(self) -> dict:
        mask, dups = self.position()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": self.epoch,
                "stream_len": len(mask), "samples_consumed": int(mask.sum()), "duplicates_consumed": dups,
                "consumed": _pack(mask),  # the layout-free position: bit i = stream position i used this epoch
                # how the current plan was made, for a bit-exact continuation on the same layout
                "plan": {**self._layout(), "consumed_before": _pack(self._before), "duplicates_before": self._dups_before,
                         "steps": self.consumed},
                "data": self._data(), "stream": self._stream_options()}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != STATE_FORMAT or sd.get("version") != STATE_VERSION:
            raise LoaderStateError(
                f"this loader state is not a {STATE_FORMAT} v{STATE_VERSION} (found format {sd.get('format')!r}, "
                f"version {sd.get('version')!r}; states with 'batches_consumed' come from fashionseg before elastic resume "
                "and record no consumed set): resume with the version that wrote it, or start the run again")
        _refuse_changes("the data", sd["data"], self._data(), "Resume with the same shards, split, seed and data.subset")
        mid_epoch = sd["samples_consumed"] > 0 or sd["duplicates_consumed"] > 0
        if mid_epoch:
            _refuse_changes("mid-epoch, the epoch's sample stream", sd["stream"], self._stream_options(),
                            "Change data.chunk_size, data.mix_chunks and data.repeat_factor_threshold only at an epoch end")
        n = self.samples_per_epoch  # the same every epoch (plan.repeat_multiplicities)
        if not mid_epoch:  # an epoch end: the stream options and the layout may change freely
            sd = {**sd, "plan": {**sd["plan"], "consumed_before": None, "duplicates_before": 0, "steps": 0}}
        elif sd["stream_len"] != n:
            raise LoaderStateError(f"the checkpoint's epoch {sd['epoch']} has {sd['stream_len']} stream items, this loader's {n}")
        old = sd["plan"]
        if {k: old[k] for k in self._layout()} == self._layout():
            self.layout_change = None
            self._move_to(sd["epoch"], _unpack(old["consumed_before"], n), old["duplicates_before"], old["steps"])
            if not 0 <= self.consumed <= self.plan().rank_steps[self.rank]:
                raise LoaderStateError(f"the checkpoint's position (step {self.consumed}) is past its plan's end")
            return
        full_before = self.steps_per_epoch
        self._move_to(sd["epoch"], _unpack(sd["consumed"], n) if mid_epoch else None, sd["duplicates_consumed"])
        plan = self.plan()
        was = _layout_text(old["batch_sizes"], old["workers"])
        now = _layout_text(self.batch_sizes, self.cfg.workers)
        steps = f"{plan.rank_steps[self.rank]} steps per rank, {plan.duplicates} duplicates added"
        epoch_len = f"a full epoch is {full_before} steps on this layout (was {-(-n // sum(old['batch_sizes']))})"
        if mid_epoch:
            self.layout_change = (
                f"data position: epoch {self.epoch}, {sd['samples_consumed']} of {n} samples consumed "
                f"(+{sd['duplicates_consumed']} duplicates) on {was}; the remaining {plan.originals} re-planned "
                f"on {now}: {steps}; {epoch_len}")
        else:
            self.layout_change = f"data position: epoch {self.epoch} starts on {now} (was {was}): {steps}; {epoch_len}"

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        if self.cfg.tune_malloc:
            tune_malloc()  # this process paints masks (finish_sample)
        plan, start = self.plan(), self.consumed
        total = plan.rank_steps[self.rank]
        if start < total:
            stream = _RankStream(self.shard_dir, plan, self.rank, start, self.transform, self.copy_paste)
            if self.cfg.workers == 0:
                source: Iterator = iter(stream)
            else:
                source = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.workers, collate_fn=_identity,
                                         prefetch_factor=self.cfg.prefetch_factor, pin_memory=self.cfg.pin_memory,
                                         persistent_workers=False,
                                         # its own generator: creating the iterator must not draw from the
                                         # global torch RNG, or a resumed run's RNG would be one draw ahead
                                         generator=torch.Generator().manual_seed(0),
                                         worker_init_fn=_worker_init if self.cfg.tune_malloc else None))
            pending: dict[int, tuple] = {}
            expected = start
            for step, decoded in source:
                pending[step] = decoded
                while expected in pending:
                    batch = _finish(pending.pop(expected))
                    self.consumed = expected = expected + 1
                    yield batch
            if expected != total:
                raise RuntimeError(f"loader rank {self.rank}: epoch {plan.epoch} ended after step {expected} of {total}")
        self._move_to(plan.epoch + 1)

    # -- replay --------------------------------------------------------------------------------
    def _index_of(self, key: str) -> int:
        if self._key_index is None:
            self._key_index = {k: i for i, k in enumerate(self.pool.keys)}
        try:
            return self._key_index[key]
        except KeyError:
            raise KeyError(f"sample '{key}' is not in split '{self.split_name}' of {self.shard_dir}") from None

    def load_batch(self, keys: Sequence[str], epoch: int) -> tuple[list[torch.Tensor], list[dict]]:
        """Re-read and re-decode samples by key with the augmentation they had in `epoch`."""
        idx = [self._index_of(k) for k in keys]
        raw = read_samples(self.shard_dir, self.pool, idx)
        return _finish(_decode(self.transform, self.copy_paste, [(i, raw[i]) for i in idx], epoch))


def _refuse_changes(what: str, old: dict, new: dict, advice: str) -> None:
    diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diff:
        raise LoaderStateError(f"the checkpoint's loader position cannot continue here: {what} changed "
                               f"({'; '.join(diff)}). {advice}")


def build_loader(cfg: LoaderConfig, shard_dir: str | Path, split: str, *, rank: int, world_size: int,
                 batch_sizes: Sequence[int], seed: int, train: bool = True) -> ShardLoader:
    """The training loader of `split` for one rank of a layout (`batch_sizes`: one per rank)."""
    if not train:
        raise ValueError("the shard loader only trains; evaluation reads through fashionseg.data.eval_source")
    return ShardLoader(cfg, shard_dir, split, rank=rank, world_size=world_size, batch_sizes=batch_sizes, seed=seed)
