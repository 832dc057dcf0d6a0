"""Epoch plan: which rank, worker and step reads which sample, as a pure function.

`build_plan(split, seed=, epoch=, batch_sizes=, workers=, train=, cfg=)` depends on nothing else
(no clock, no process state), so every rank and every worker computes the same plan on its own
and nobody has to broadcast it. This is where the usual webdataset multi-GPU failures are
designed out:

- equal step counts: the epoch's sample stream (N items) is cut into S = ceil(N / B) global
  steps, B = sum of the per-rank batch sizes; rank r takes b_r items per step, so a rank with a
  bigger GPU gets proportionally more work and every rank runs exactly S steps. The S*B - N
  items that even out the last steps are copies of the first items of the stream (`duplicates`,
  counted and logged); nothing else is seen twice, nothing is dropped.
- sequential reads: a shard is cut into chunks of `chunk_size` consecutive samples; the shuffle
  is a seeded chunk order plus a seeded permutation inside windows of `mix_chunks` chunks (a
  shuffle buffer of chunk_size x mix_chunks samples across shards). Each (rank, worker) consumer
  gets one contiguous segment of that stream, so it reads a few chunks front to back.
- workers: rank step s is produced by worker s % W (W = max(1, workers)); each worker owns the
  samples of its steps, so the batch sequence does not depend on worker timing.
- repeat-factor sampling (LVIS, Gupta et al. 2019) changes how many times a sample enters the
  stream (stochastic rounding, seeded per epoch) and aspect-ratio grouping (torchvision's
  GroupedBatchSampler) only reorders the items inside one consumer's segment: both happen before
  the stream is cut into steps, so equal step counts still hold.

Validation (`train=False`): the split in manifest order, no repeats, no duplicates, each sample
on exactly one rank (in proportion to the batch sizes); the last batch of a rank may be short
and ranks may differ by one step.

`shard plan OUT --world-size N ...` prints the plan of one epoch for a layout (module bottom).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


class PlanError(ValueError):
    """A layout that cannot work for this split (the message says why and what to change)."""


@dataclass(frozen=True)
class PlanConfig:
    chunk_size: int = 32  # consecutive samples of a shard that are read as one unit
    mix_chunks: int = 4  # chunks shuffled together: the shuffle buffer is chunk_size x mix_chunks
    repeat_factor_threshold: float = 0.0  # LVIS t (e.g. 0.001); 0 = off
    group_aspect_ratio: bool = True  # batches of portrait-only / landscape-only images
    subset: int | None = None  # only the first N samples of the split (debug runs)

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.mix_chunks < 1:
            raise PlanError("chunk_size and mix_chunks must be >= 1")
        if self.repeat_factor_threshold < 0:
            raise PlanError("repeat_factor_threshold must be >= 0 (0 turns repeat-factor sampling off)")
        if self.subset is not None and self.subset < 1:
            raise PlanError("subset must be >= 1 (or None for the whole split)")


@dataclass
class Pool:
    """The samples of a split (after `subset`), as flat arrays indexed by pool index."""

    shard_names: list[str]
    shard: np.ndarray  # int64 [P] index into shard_names
    index: np.ndarray  # int64 [P] index of the sample inside its shard
    offset: np.ndarray  # int64 [P] byte offset of the sample's first tar header
    keys: list[str]
    landscape: np.ndarray  # bool [P] width >= height
    categories: list[list[int]]

    def __len__(self) -> int:
        return len(self.keys)


def build_pool(split: dict, subset: int | None = None) -> Pool:
    names, shard, index, offset, keys, land, cats = [], [], [], [], [], [], []
    for si, sh in enumerate(split["shards"]):
        names.append(sh["name"])
        for i, s in enumerate(sh["samples"]):
            if subset is not None and len(keys) >= subset:
                break
            shard.append(si)
            index.append(i)
            offset.append(int(s["offset"]))
            keys.append(str(s["key"]))
            land.append(int(s.get("width", 1)) >= int(s.get("height", 1)))
            cats.append(list(s.get("categories", ())))
    return Pool(names, np.asarray(shard, np.int64), np.asarray(index, np.int64), np.asarray(offset, np.int64),
                keys, np.asarray(land, bool), cats)


def repeat_factors(categories: list[list[int]], threshold: float) -> np.ndarray:
    """LVIS repeat factor per image: max over its categories of max(1, sqrt(t / f(c))), where f(c)
    is the fraction of images that contain category c."""
    n = len(categories)
    out = np.ones(n, np.float64)
    if threshold <= 0 or n == 0:
        return out
    freq: dict[int, int] = {}
    for cs in categories:
        for c in set(cs):
            freq[c] = freq.get(c, 0) + 1
    rc = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in freq.items()}
    for i, cs in enumerate(categories):
        if cs:
            out[i] = max(rc[c] for c in cs)
    return out


def repeat_multiplicities(rf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of repeat factors with a total that is the same every epoch:
    floor(r_i) copies, plus K = round(sum of fractions) extra copies chosen by systematic sampling
    over a shuffled order (image i gets one with probability ~ frac(r_i)). A constant total keeps
    the steps per epoch constant, which schedules and `epoch = step // steps_per_epoch` rely on."""
    mult = np.floor(rf).astype(np.int64)
    frac = rf - mult
    total = float(frac.sum())
    k = int(round(total))
    if k > 0:
        order = rng.permutation(len(rf))
        cum = np.cumsum(frac[order])
        points = (rng.random() + np.arange(k)) * (total / k)
        picks = order[np.minimum(np.searchsorted(cum, points, side="right"), len(rf) - 1)]
        np.add.at(mult, picks, 1)
    return mult


@dataclass
class Consumer:
    """What one (rank, worker) produces: its batches (lists of stream positions) in the order it
    yields them, and the rank step each batch is."""

    rank: int
    worker: int
    steps: list[int]
    batches: list[list[int]]


@dataclass
class EpochPlan:
    epoch: int
    train: bool
    batch_sizes: list[int]
    workers: int
    pool: Pool
    stream_pool: np.ndarray  # int64 [N + duplicates] pool index at each stream position
    stream_window: np.ndarray  # int64 [...] window (read unit) of each position, non-decreasing
    rank_steps: list[int]  # steps per rank (all equal for train)
    consumers: dict[tuple[int, int], Consumer]
    duplicates: int  # stream items added to even out the last steps
    rfs_repeats: int  # extra items from repeat-factor sampling
    mixed_batches: int  # aspect-ratio leftovers batched across groups
    stats: dict = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return len(self.batch_sizes)

    @property
    def num_workers(self) -> int:
        return max(1, self.workers)

    def rank_batches(self, rank: int) -> list[list[int]]:
        """Pool indices of every step of `rank`, in step order."""
        out: list[list[int] | None] = [None] * self.rank_steps[rank]
        for w in range(self.num_workers):
            c = self.consumers[(rank, w)]
            for s, b in zip(c.steps, c.batches):
                out[s] = [int(self.stream_pool[p]) for p in b]
        return out  # type: ignore[return-value]

    def rank_samples(self, rank: int) -> int:
        return sum(len(b) for w in range(self.num_workers) for b in self.consumers[(rank, w)].batches)

    def summary(self) -> dict:
        """The facts worth logging at the start of an epoch."""
        return {
            "epoch": self.epoch,
            "train": self.train,
            "num_samples": len(self.pool),
            "stream": int(len(self.stream_pool)),
            "duplicates": self.duplicates,
            "rfs_repeats": self.rfs_repeats,
            "mixed_batches": self.mixed_batches,
            "ranks": [
                {"rank": r, "batch_size": b, "steps": self.rank_steps[r], "samples": self.rank_samples(r)}
                for r, b in enumerate(self.batch_sizes)
            ],
        }


def check_layout(batch_sizes: Sequence[int], workers: int) -> list[int]:
    bs = [int(b) for b in batch_sizes]
    if not bs:
        raise PlanError("world size must be >= 1")
    if any(b < 1 for b in bs):
        raise PlanError(f"every per-rank batch size must be >= 1 (got {','.join(map(str, bs))})")
    if workers < 0:
        raise PlanError(f"workers must be >= 0 (got {workers})")
    return bs


def _seed_words(seed: int, epoch: int, stream: int) -> list[int]:
    return [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, stream]


def _group_batches(positions: list[int], size: int, groups: np.ndarray | None) -> tuple[list[list[int]], int]:
    """Cut a consumer's positions (a multiple of `size` for train) into batches; with `groups`
    (group id per position) batch like torchvision's GroupedBatchSampler: a batch is emitted as
    soon as one group has `size` items; the leftovers are batched together at the end."""
    if groups is None:
        return [positions[i : i + size] for i in range(0, len(positions), size)], 0
    buckets: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for p, g in zip(positions, groups.tolist()):
        b = buckets.setdefault(g, [])
        b.append(p)
        if len(b) == size:
            out.append(b)
            buckets[g] = []
    rest = sorted(p for b in buckets.values() for p in b)
    mixed = [rest[i : i + size] for i in range(0, len(rest), size)]
    return out + mixed, len(mixed)


def build_plan(split: dict, *, seed: int, epoch: int, batch_sizes: Sequence[int], workers: int, train: bool,
               cfg: PlanConfig = PlanConfig(), pool: Pool | None = None) -> EpochPlan:
    """The plan of one epoch; a pure function of its arguments (`pool` is only a cache of
    `build_pool(split, cfg.subset)`)."""
    bs = check_layout(batch_sizes, workers)
    world, W = len(bs), max(1, workers)
    pool = pool if pool is not None else build_pool(split, cfg.subset)
    P = len(pool)
    # chunks: consecutive samples of one shard
    chunks: list[np.ndarray] = []
    if P:
        bounds = np.flatnonzero(np.diff(pool.shard)) + 1
        for part in np.split(np.arange(P), bounds):
            chunks.extend(part[i : i + cfg.chunk_size] for i in range(0, len(part), cfg.chunk_size))
    rfs_repeats = 0
    if train:
        if P == 0:
            raise PlanError("the training split has no samples")
        rng = np.random.default_rng(_seed_words(seed, epoch, 1))
        mult = repeat_multiplicities(repeat_factors(pool.categories, cfg.repeat_factor_threshold), rng)
        rfs_repeats = int(mult.sum() - P)
        order = rng.permutation(len(chunks))
        pieces, windows = [], []
        for wi, start in enumerate(range(0, len(order), cfg.mix_chunks)):
            members = np.concatenate([chunks[c] for c in order[start : start + cfg.mix_chunks]])
            items = rng.permutation(np.repeat(members, mult[members]))
            pieces.append(items)
            windows.append(np.full(len(items), wi, np.int64))
        stream = np.concatenate(pieces)
        window = np.concatenate(windows)
        n, B = len(stream), sum(bs)
        if n < B:
            raise PlanError(f"the split has {n} samples per epoch, fewer than one global batch "
                            f"({'+'.join(map(str, bs))} = {B}); use smaller batches or fewer ranks")
        steps = -(-n // B)
        dup = steps * B - n
        stream = np.concatenate([stream, stream[:dup]])
        window = np.concatenate([window, np.full(dup, window[-1] + 1, np.int64)])
        rank_steps = [steps] * world
        step_sizes = [[b] * steps for b in bs]
    else:
        stream = np.arange(P, dtype=np.int64)
        window = np.zeros(P, np.int64)
        for ci, c in enumerate(chunks):
            window[c] = ci
        dup, B = 0, sum(bs)
        share = [P * b // B for b in bs]
        for r in range(P - sum(share)):
            share[r % world] += 1
        rank_steps = [-(-n // b) for n, b in zip(share, bs)]
        step_sizes = [[min(b, n - i * b) for i in range(k)] for n, b, k in zip(share, bs, rank_steps)]
    landscape = pool.landscape[stream] if (train and cfg.group_aspect_ratio) else None
    consumers: dict[tuple[int, int], Consumer] = {}
    mixed_total, pos = 0, 0
    for r in range(world):
        for w in range(W):
            my_steps = list(range(w, rank_steps[r], W))
            n_items = sum(step_sizes[r][s] for s in my_steps)
            positions = list(range(pos, pos + n_items))
            pos += n_items
            if train:
                groups = None if landscape is None else landscape[pos - n_items : pos].astype(np.int64)
                batches, mixed = _group_batches(positions, bs[r], groups)
                mixed_total += mixed
            else:
                batches, i = [], 0
                for s in my_steps:
                    batches.append(positions[i : i + step_sizes[r][s]])
                    i += step_sizes[r][s]
            consumers[(r, w)] = Consumer(r, w, my_steps, batches)
    assert pos == len(stream)
    return EpochPlan(epoch, train, bs, workers, pool, stream, window, rank_steps, consumers, int(dup),
                     rfs_repeats, mixed_total)


def fingerprint(split: dict, *, seed: int, batch_sizes: Sequence[int] | None, workers: int | None, train: bool,
                cfg: PlanConfig) -> str:
    """Short hash of everything the batch sequence depends on. `batch_sizes`/`workers` None gives
    the data-only part (what must match to resume at an epoch boundary with another layout)."""
    h = hashlib.sha256()
    h.update(json.dumps({"seed": int(seed), "train": train, "cfg": asdict(cfg),
                         "batch_sizes": None if batch_sizes is None else [int(b) for b in batch_sizes],
                         "workers": workers}, sort_keys=True).encode())
    for sh in split["shards"]:
        h.update(f"{sh['name']}:{sh.get('sha256', '')}:{sh['num_samples']};".encode())
    return h.hexdigest()[:16]


# -- `shard plan` -------------------------------------------------------------------------------
def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes wants comma-separated integers like 2,2,4 (got {text!r})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="shard folder (holds manifest.json)")
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                   help="per-rank batch sizes, comma-separated, one per rank (default: --batch-size on every rank)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size of every rank when --batch-sizes is not given (default 2)")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank (default 2)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="train (default) or val")
    p.add_argument("--repeat-factor-threshold", type=float, default=0.0, help="LVIS repeat-factor sampling t; 0 = off")
    p.add_argument("--no-group-aspect-ratio", action="store_true")
    p.add_argument("--subset", type=int, default=None, help="only the first N samples")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import sys

    from fashionseg.data.shards.reader import ManifestError, read_manifest

    def fail(msg: str) -> int:
        print(f"shard plan: {msg}", file=sys.stderr)
        return 2

    if args.world_size < 1:
        return fail(f"--world-size must be >= 1 (got {args.world_size})")
    bs = args.batch_sizes if args.batch_sizes is not None else [args.batch_size] * args.world_size
    if len(bs) != args.world_size:
        return fail(f"--batch-sizes lists {len(bs)} sizes but --world-size is {args.world_size}: give one per rank")
    try:
        manifest = read_manifest(args.out)
        if args.split not in manifest["splits"]:
            return fail(f"{args.out}: no split '{args.split}' (has {', '.join(manifest['splits'])})")
        cfg = PlanConfig(repeat_factor_threshold=args.repeat_factor_threshold,
                         group_aspect_ratio=not args.no_group_aspect_ratio, subset=args.subset)
        plan = build_plan(manifest["splits"][args.split], seed=args.seed, epoch=args.epoch, batch_sizes=bs,
                          workers=args.workers, train=args.split == "train", cfg=cfg)
    except (ManifestError, PlanError) as e:
        return fail(str(e))
    s = plan.summary()
    if args.json:
        print(json.dumps({"ranks": s["ranks"], "duplicates": s["duplicates"]}))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.out} {args.split}: epoch {args.epoch}, {args.world_size} ranks x {max(1, args.workers)} workers")
    for col in ("rank", "batch size", "steps", "samples"):
        t.add_column(col, justify="right")
    for r in s["ranks"]:
        t.add_row(str(r["rank"]), str(r["batch_size"]), str(r["steps"]), str(r["samples"]))
    con = Console()
    con.print(t)
    con.print(f"samples {s['num_samples']}, stream {s['stream']} (repeat-factor extra {s['rfs_repeats']}), "
              f"duplicates {s['duplicates']}, mixed aspect batches {s['mixed_batches']}")
    return 0
