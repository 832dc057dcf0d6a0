"""The training/validation loader: owns the rank split, equal steps, step-exact resume.

Contract with the trainer (keep stable):

    loader = build_loader(cfg: LoaderConfig, shard_dir, "train", rank=r, world_size=n, seed=s, train=True)
    loader.vocab                 # Vocab from the manifest (num_categories, num_attributes)
    loader.set_epoch(e)          # a new epoch resets the position; the current epoch keeps it
    len(loader)                  # steps this epoch: identical on every rank for train
    for images, targets in loader: ...     # docs/design.md "Training targets"; targets[i]["key"]
    loader.state_dict() / loader.load_state_dict(sd)   # epoch, batches consumed, fingerprints
    loader.plan_summary()        # dict for logging: duplicates, repeat-factor extras, per-rank steps
    loader.load_batch(keys, epoch)         # re-decode a past batch from its keys (hard mining)
    loader.read_raw(keys)                  # [(key, jpg_bytes, meta)]: the encoded samples
    loader.decode_samples(samples, epoch)  # decode stored (key, jpg_bytes, meta) like load_batch

- Position: iterating yields the steps not consumed yet in the current epoch; when an epoch's
  last batch has been taken and the iterator is exhausted, the loader moves to (epoch + 1, 0),
  so `set_epoch(e + 1)` afterwards is a no-op and a checkpoint taken after the epoch says so.
  Iterating an epoch whose batches are all consumed yields nothing and moves on the same way.
  `state_dict()` counts batches handed to the caller (not the ones prefetched by workers);
  `load_state_dict()` then makes the next iteration start at exactly that step, reading (and
  never decoding) only what the remaining steps need. A state whose layout fingerprint
  (seed, manifest, world size, batch sizes, workers, plan options) differs raises
  LoaderStateError saying what changed; at an epoch boundary only the data part has to match,
  so a run may resume on another number of GPUs from an epoch-end checkpoint.
- Split: the plan (fashionseg/data/plan.py) gives each (rank, worker) its own batches; workers
  tag each batch with its step and the main process yields them in step order, so the batch
  sequence does not depend on worker timing. `workers=0` decodes in the calling process.
- Do NOT pass this loader through `accelerator.prepare()`: it would shard the stream a second
  time (IterableDatasetShard) or broadcast rank 0's batches (dispatch_batches), and
  `accelerator.skip_first_batches` would decode what a resume skips. The loader is not a
  torch DataLoader, so prepare() has nothing to wrap anyway. Move batches to the device in the
  trainer (`images = [i.to(dev) for i in images]`, the tensors of each target dict likewise;
  `key` and `orig_size` stay on the host).
- Augmentation randomness comes from (seed, epoch, key) only (fashionseg/data/transforms.py),
  so `load_batch(keys, epoch)` returns the same tensors the epoch yielded for those keys.
- Masks are uint8 [N, H, W] views with column-major memory (see transforms.py). Workers send
  uint8 images and mask runs; the float images and painted masks are made in this process
  (`finish_sample`, ~2 ms per 0.85-Mpx image with 12 masks), which is cheaper than shipping them.
- Steps per epoch are constant across epochs, also with repeat-factor sampling (its total of
  repeats is fixed; which images get the fractional extra copy varies by epoch).
- Validation (`train=False`): each sample exactly once over all ranks, no augmentation, resize
  to `test_size` (default: the largest of `min_size`); ranks may differ by a step.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fashionseg.data.plan import EpochPlan, PlanConfig, PlanError, Pool, build_plan, build_pool, fingerprint
from fashionseg.data.shards.reader import ManifestError, ShardError, iter_shard, read_manifest
from fashionseg.data.transforms import SampleTransform, finish_sample
from fashionseg.data.vocab import Vocab


class LoaderStateError(ValueError):
    """A loader state that does not belong to this loader's layout (the message says what changed)."""


@dataclass
class LoaderConfig:
    batch_size: int = 2  # per rank
    batch_sizes: list[int] | None = None  # one per rank (mixed GPUs); overrides batch_size
    workers: int = 2  # decode processes per rank; 0 = decode in the training process
    min_size: list[int] = field(default_factory=lambda: [800])  # shorter-side choices (multi-scale)
    max_size: int = 1333  # longer side cap
    test_size: int | None = None  # eval shorter side; None = max(min_size)
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1 (got {self.batch_size})")
        if not self.min_size or any(s < 1 for s in self.min_size) or self.max_size < 1:
            raise ValueError(f"loader.min_size must be a non-empty list of sizes >= 1 and max_size >= 1 (got {self.min_size}, {self.max_size})")
        if not 0.0 <= self.hflip <= 1.0 or self.color_jitter < 0:
            raise ValueError("loader.hflip must be in [0, 1] and loader.color_jitter >= 0")

    def rank_batch_sizes(self, world_size: int) -> list[int]:
        if self.batch_sizes is None:
            return [self.batch_size] * world_size
        if len(self.batch_sizes) != world_size:
            raise PlanError(f"loader.batch_sizes lists {len(self.batch_sizes)} sizes for {world_size} ranks: give one per rank")
        return [int(b) for b in self.batch_sizes]

    def plan_config(self, train: bool) -> PlanConfig:
        return PlanConfig(self.chunk_size, self.mix_chunks, self.repeat_factor_threshold if train else 0.0,
                          self.group_aspect_ratio, self.subset)


# -- reading --------------------------------------------------------------------------------------
def read_samples(shard_dir: Path, pool: Pool, indices, gap: int = 64) -> dict[int, tuple[str, bytes, dict]]:
    """Raw samples of the given pool indices: per shard, in runs of nearby samples, each run one
    seek plus a sequential read (samples in a gap of <= `gap` are read through, not decoded)."""
    out: dict[int, tuple[str, bytes, dict]] = {}
    todo = sorted(set(int(i) for i in indices))  # pool order = shard order, then sample order
    for _, group in itertools.groupby(todo, key=lambda i: int(pool.shard[i])):
        group = list(group)
        runs, run = [], [group[0]]
        for i in group[1:]:
            if i - run[-1] <= gap:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        for run in runs:
            first, wanted = run[0], set(run)
            path = shard_dir / pool.shard_names[int(pool.shard[first])]
            for j, (key, jpg, meta) in enumerate(iter_shard(path, int(pool.offset[first]), run[-1] - first + 1)):
                i = first + j
                if key != pool.keys[i]:
                    raise ShardError(f"{path}: expected sample '{pool.keys[i]}' at byte {int(pool.offset[i])}, found '{key}': "
                                     f"the manifest does not describe this shard; run `shard verify {shard_dir}`")
                if i in wanted:
                    out[i] = (key, jpg, meta)
    return out


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

    def __init__(self, shard_dir: Path, plan: EpochPlan, rank: int, start: int, transform: SampleTransform):
        self.shard_dir, self.plan, self.rank, self.start, self.transform = shard_dir, plan, rank, start, transform

    def __iter__(self):
        info = get_worker_info()
        c = self.plan.consumers[(self.rank, info.id if info is not None else 0)]
        k0 = bisect.bisect_left(c.steps, self.start)
        raw = iter_raw_batches(self.shard_dir, self.plan, c.batches[k0:])
        for step, batch in zip(c.steps[k0:], raw):
            yield step, _decode(self.transform, batch, self.plan.epoch)


def _decode(transform: SampleTransform, batch, epoch: int) -> list[tuple[torch.Tensor, dict]]:
    return [transform.decode(key, jpg, meta, epoch=epoch, image_id=image_id) for image_id, (key, jpg, meta) in batch]


def _finish(decoded: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """In the consuming process: uint8 -> float32 images, numpy -> tensors (transforms.finish_sample)."""
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


# -- the loader -----------------------------------------------------------------------------------
class ShardLoader:
    def __init__(self, cfg: LoaderConfig, shard_dir: str | Path, split: str, *, rank: int, world_size: int,
                 seed: int, train: bool):
        self.cfg, self.shard_dir, self.split_name = cfg, Path(shard_dir), split
        self.rank, self.world_size, self.seed, self.train = rank, world_size, int(seed), train
        if not 0 <= rank < world_size:
            raise PlanError(f"rank {rank} is outside world size {world_size}")
        manifest = read_manifest(self.shard_dir)
        if split not in manifest["splits"]:
            raise ManifestError(f"{self.shard_dir}: no split '{split}' (has {', '.join(manifest['splits'])})")
        self.split = manifest["splits"][split]
        self.vocab = Vocab.from_dict(manifest, str(self.shard_dir / "manifest.json"))
        self.batch_sizes = cfg.rank_batch_sizes(world_size)
        self.plan_cfg = cfg.plan_config(train)
        self.pool = build_pool(self.split, self.plan_cfg.subset)
        self.transform = SampleTransform(self.vocab, list(cfg.min_size), cfg.max_size, cfg.hflip, cfg.color_jitter,
                                         train, self.seed, cfg.test_size)
        fp = dict(split=self.split, seed=self.seed, train=train, cfg=self.plan_cfg)
        self.fingerprint = fingerprint(**fp, batch_sizes=self.batch_sizes, workers=cfg.workers)
        self.data_fingerprint = fingerprint(**fp, batch_sizes=None, workers=None)
        self.epoch, self.consumed = 0, 0
        self._plan: EpochPlan | None = None
        self._key_index: dict[str, int] | None = None
        self.plan(0)  # fail now, not at the first step, when the layout cannot work

    # -- plan and position ---------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = build_plan(self.split, seed=self.seed, epoch=epoch, batch_sizes=self.batch_sizes,
                                    workers=self.cfg.workers, train=self.train, cfg=self.plan_cfg, pool=self.pool)
        return self._plan

    def __len__(self) -> int:
        return self.plan().rank_steps[self.rank]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def plan_summary(self) -> dict:
        s = self.plan().summary()
        s["rank"] = self.rank
        s["steps"] = s["ranks"][self.rank]["steps"]
        return s

    def _layout(self) -> dict:
        return {"seed": self.seed, "split": self.split_name, "num_samples": len(self.pool), "world_size": self.world_size,
                "batch_sizes": self.batch_sizes, "workers": self.cfg.workers, "plan": asdict(self.plan_cfg)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_consumed": self.consumed, "fingerprint": self.fingerprint,
                "data_fingerprint": self.data_fingerprint, "layout": self._layout()}

    def load_state_dict(self, sd: dict) -> None:
        same = sd.get("fingerprint") == self.fingerprint
        boundary = sd.get("batches_consumed") == 0 and sd.get("data_fingerprint") == self.data_fingerprint
        if not (same or boundary):
            old, new = sd.get("layout", {}), self._layout()
            diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
            what = "; ".join(diff) or "the shard set itself (same sizes, different files)"
            raise LoaderStateError(
                f"the checkpoint's loader position belongs to another layout ({what}). Resume with the same "
                f"shards, seed, world size, batch sizes and workers, or from a checkpoint taken at an epoch end")
        self.epoch, self.consumed = int(sd["epoch"]), int(sd["batches_consumed"])

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        if self.cfg.tune_malloc:
            tune_malloc()  # this process paints masks and makes float images (finish_sample)
        plan, start = self.plan(), self.consumed
        total = plan.rank_steps[self.rank]
        if start < total:
            stream = _RankStream(self.shard_dir, plan, self.rank, start, self.transform)
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
        self.epoch, self.consumed = plan.epoch + 1, 0

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
        return _finish(_decode(self.transform, [(i, raw[i]) for i in idx], epoch))

    def read_raw(self, keys: Sequence[str]) -> list[tuple[str, bytes, dict]]:
        """The encoded samples (key, jpg bytes, meta) of `keys`, read from the shards."""
        idx = [self._index_of(k) for k in keys]
        raw = read_samples(self.shard_dir, self.pool, idx)
        return [raw[i] for i in idx]

    def decode_samples(self, samples: Sequence[tuple[str, bytes, dict]], epoch: int) -> tuple[list[torch.Tensor], list[dict]]:
        """Decode stored raw samples (key, jpg bytes, meta) exactly as the epoch did."""
        return _finish(_decode(self.transform, [(self._index_of(k), (k, jpg, meta)) for k, jpg, meta in samples], epoch))


def build_loader(cfg: LoaderConfig, shard_dir: str | Path, split: str, *, rank: int, world_size: int, seed: int,
                 train: bool) -> ShardLoader:
    return ShardLoader(cfg, shard_dir, split, rank=rank, world_size=world_size, seed=seed, train=train)
