"""Epoch plan: which rank, worker and step reads which sample, as a pure function.

`build_plan(split, seed=, epoch=, batch_sizes=, workers=, cfg=, consumed=)` depends on nothing
else (no clock, no process state), so every rank and every worker computes the same plan on its
own and nobody has to broadcast it. This is where the usual webdataset multi-GPU failures are
designed out:

- one layout-free stream per epoch: a seeded chunk order plus a seeded permutation inside
  windows of `mix_chunks` chunks (a shuffle buffer of chunk_size x mix_chunks samples across
  shards), with repeat-factor copies (`epoch_stream`). It depends on the data, the seed, the epoch
  and the stream options only, never on world size, batch sizes or workers, so "what has been
  consumed this epoch" is a set of stream positions that any layout can read.
- equal step counts: the stream items not consumed yet (R; all N at the start of an epoch) are
  cut into S = ceil(R / B) global steps, B = sum of the per-rank batch sizes; rank r takes b_r
  items per step, so a bigger GPU gets proportionally more work and every rank runs exactly S
  steps. The S*B - R items that even out the last steps are copies of the first remaining items
  (`duplicates`, counted); nothing else is seen twice, nothing is dropped.
- elastic resume: a run stopped after k steps on layout A continues on layout B by planning
  B over the positions A had not consumed (`consumed=`, `EpochPlan.consumed_after(k)`); over the
  whole epoch every stream item is still used once, plus the duplicates each plan counted.
  A plan with nothing consumed is the plan of the full epoch.
- sequential reads: each (rank, worker) consumer gets one contiguous segment of the stream, so
  it reads a few chunks of `chunk_size` consecutive samples front to back.
- workers: rank step s is produced by worker s % W (W = max(1, workers)); each worker owns the
  samples of its steps, so the batch sequence does not depend on worker timing.
- repeat-factor sampling (LVIS, Gupta et al. 2019) changes how many times a sample enters the
  stream (stochastic rounding, seeded per epoch, a constant total) and aspect-ratio grouping
  (torchvision's GroupedBatchSampler) only reorders the items inside one consumer's segment:
  both happen before the stream is cut into steps, so equal step counts still hold.

`shard plan OUT --world-size N ...` prints the plan of one epoch for a layout (module bottom).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
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
    """What one (rank, worker) produces: its batches (lists of plan positions) in the order it
    yields them, and the rank step each batch is."""

    rank: int
    worker: int
    steps: list[int]
    batches: list[list[int]]


@dataclass
class EpochPlan:
    """The plan of the rest of an epoch (all of it when nothing was consumed). Plan position p
    reads stream position `stream_base[p]`; positions >= `originals` are the duplicates."""

    epoch: int
    batch_sizes: list[int]
    workers: int
    pool: Pool
    stream_base: np.ndarray  # int64 [R + duplicates] epoch-stream position at each plan position
    stream_pool: np.ndarray  # int64 [R + duplicates] pool index at each plan position
    stream_window: np.ndarray  # int64 [...] window (read unit) of each position, non-decreasing
    rank_steps: list[int]  # steps per rank (all equal)
    consumers: dict[tuple[int, int], Consumer]
    duplicates: int  # plan positions added to even out the last steps
    rfs_repeats: int  # extra stream items from repeat-factor sampling
    mixed_batches: int  # aspect-ratio leftovers batched across groups
    consumed_before: np.ndarray  # bool [N]: epoch-stream positions consumed before this plan

    @property
    def world_size(self) -> int:
        return len(self.batch_sizes)

    @property
    def num_workers(self) -> int:
        return max(1, self.workers)

    @property
    def stream_len(self) -> int:
        """N: items in the epoch's stream (samples plus repeat-factor extras), whatever the layout."""
        return len(self.consumed_before)

    @property
    def originals(self) -> int:
        return len(self.stream_base) - self.duplicates

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

    def consumed_after(self, steps: int) -> tuple[np.ndarray, int]:
        """(stream positions consumed, duplicates consumed by this plan) once every rank has taken
        its first `steps` steps: the layout-free position a checkpoint stores."""
        mask = self.consumed_before.copy()
        taken = [p for c in self.consumers.values() for s, b in zip(c.steps, c.batches) if s < steps for p in b]
        taken_arr = np.asarray(taken, np.int64)
        originals = taken_arr[taken_arr < self.originals]
        mask[self.stream_base[originals]] = True
        return mask, int(len(taken_arr) - len(originals))

    def summary(self) -> dict:
        """The facts worth logging at the start of an epoch."""
        return {
            "epoch": self.epoch,
            "num_samples": len(self.pool),
            "stream": self.stream_len,
            "consumed_before": int(self.consumed_before.sum()),
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
    """Cut a consumer's positions (a multiple of `size`) into batches; with `groups` (group id per
    position) batch like torchvision's GroupedBatchSampler: a batch is emitted as soon as one
    group has `size` items; the leftovers are batched together at the end."""
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


def epoch_stream(pool: Pool, *, seed: int, epoch: int, cfg: PlanConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """The epoch's layout-free stream: (pool index, window) per position, and the number of
    repeat-factor extras in it. Windows are the read units, in stream order."""
    P = len(pool)
    if P == 0:
        raise PlanError("the training split has no samples")
    chunks: list[np.ndarray] = []  # consecutive samples of one shard
    bounds = np.flatnonzero(np.diff(pool.shard)) + 1
    for part in np.split(np.arange(P), bounds):
        chunks.extend(part[i : i + cfg.chunk_size] for i in range(0, len(part), cfg.chunk_size))
    rng = np.random.default_rng(_seed_words(seed, epoch, 1))
    mult = repeat_multiplicities(repeat_factors(pool.categories, cfg.repeat_factor_threshold), rng)
    order = rng.permutation(len(chunks))
    pieces, windows = [], []
    for wi, start in enumerate(range(0, len(order), cfg.mix_chunks)):
        members = np.concatenate([chunks[c] for c in order[start : start + cfg.mix_chunks]])
        items = rng.permutation(np.repeat(members, mult[members]))
        pieces.append(items)
        windows.append(np.full(len(items), wi, np.int64))
    return np.concatenate(pieces), np.concatenate(windows), int(mult.sum() - P)


def build_plan(split: dict, *, seed: int, epoch: int, batch_sizes: Sequence[int], workers: int,
               cfg: PlanConfig = PlanConfig(), pool: Pool | None = None, consumed: np.ndarray | None = None) -> EpochPlan:
    """The plan of one epoch, or of its rest when `consumed` (bool per epoch-stream position)
    marks what earlier steps, on any layout, already used; a pure function of its arguments
    (`pool` is only a cache of `build_pool(split, cfg.subset)`)."""
    bs = check_layout(batch_sizes, workers)
    world, W, B = len(bs), max(1, workers), sum(bs)
    pool = pool if pool is not None else build_pool(split, cfg.subset)
    base_pool, base_window, rfs_repeats = epoch_stream(pool, seed=seed, epoch=epoch, cfg=cfg)
    n = len(base_pool)
    if consumed is None:
        consumed = np.zeros(n, bool)
    elif consumed.shape != (n,):
        raise PlanError(f"the consumed set covers {len(consumed)} stream positions, the epoch has {n}")
    if n < B:
        raise PlanError(f"the split has {n} samples per epoch, fewer than one global batch "
                        f"({'+'.join(map(str, bs))} = {B}); use smaller batches or fewer ranks")
    remaining = np.flatnonzero(~consumed)
    R = len(remaining)
    steps = -(-R // B)
    dup = steps * B - R  # < B; may exceed R near the end of an epoch: the copies then cycle
    base = np.concatenate([remaining, remaining[np.arange(dup) % max(R, 1)]]) if R else remaining
    stream = base_pool[base]
    window = np.concatenate([base_window[remaining], np.full(dup, (base_window[remaining[-1]] + 1) if R else 0, np.int64)])
    landscape = pool.landscape[stream] if cfg.group_aspect_ratio else None
    consumers: dict[tuple[int, int], Consumer] = {}
    mixed_total, pos = 0, 0
    for r in range(world):
        for w in range(W):
            my_steps = list(range(w, steps, W))
            n_items = len(my_steps) * bs[r]
            groups = None if landscape is None else landscape[pos : pos + n_items].astype(np.int64)
            batches, mixed = _group_batches(list(range(pos, pos + n_items)), bs[r], groups)
            pos += n_items
            mixed_total += mixed
            consumers[(r, w)] = Consumer(r, w, my_steps, batches)
    assert pos == len(stream)
    return EpochPlan(epoch, bs, workers, pool, base, stream, window, [steps] * world, consumers, int(dup),
                     rfs_repeats, mixed_total, consumed.copy())


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
    p.add_argument("--split", default="train", help="the split to plan as a training split (default train)")
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
                          workers=args.workers, cfg=cfg)
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
