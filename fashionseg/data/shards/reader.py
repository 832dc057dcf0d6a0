"""Read shard sets: the manifest, and samples streamed from a tar starting at any sample.

The manifest records the byte offset of each sample's first tar header, so a reader resuming
mid-shard seeks straight there and streams forward with `tarfile`'s stream mode: nothing
before the offset is read or decoded, and no shard is ever loaded whole.
"""
from __future__ import annotations

import json
import tarfile
import itertools
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from fashionseg.data.shards import manifest as manifest_lib
from fashionseg.data.shards.manifest import ManifestError


class ShardError(ValueError):
    """A shard that cannot be read as the manifest describes it (message names the file)."""


def read_manifest(shard_dir: str | Path) -> dict:
    """`shard_dir/manifest.json`, validated; ManifestError naming the path when missing or corrupt."""
    return manifest_lib.load(shard_dir)


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")
    return key, ext


def iter_shard(tar_path: str | Path, offset: int = 0, count: int | None = None) -> Iterator[tuple[str, bytes, dict]]:
    """Yield `(key, jpg_bytes, meta)` for consecutive samples, starting at the sample whose first
    header sits at byte `offset`, stopping after `count` samples (None: to the end of the tar)."""
    tar_path = Path(tar_path)
    if count is not None and count <= 0:
        return
    try:
        f = open(tar_path, "rb")
    except OSError as e:
        raise ShardError(f"{tar_path}: cannot open the shard ({e})") from e
    with f:
        f.seek(offset)
        done = 0
        key: str | None = None
        parts: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_name(member.name)
                    if key is not None and k != key:
                        raise ShardError(f"{tar_path}: sample '{key}' is incomplete (has {sorted(parts)}; needs jpg and json)")
                    key = k
                    data = tar.extractfile(member).read()
                    parts[ext] = data
                    if "jpg" in parts and "json" in parts:
                        try:
                            meta = json.loads(parts["json"])
                        except (UnicodeDecodeError, json.JSONDecodeError) as e:
                            raise ShardError(f"{tar_path}: sample '{key}': unreadable {key}.json ({e})") from e
                        yield key, parts["jpg"], meta
                        done += 1
                        key, parts = None, {}
                        if count is not None and done >= count:
                            return
        except tarfile.TarError as e:
            raise ShardError(f"{tar_path}: corrupt tar at or after byte {offset} ({e}); run `shard verify {tar_path.parent}`") from e
        if key is not None:
            raise ShardError(f"{tar_path}: sample '{key}' is incomplete at the end of the shard (has {sorted(parts)})")
        if count is not None and done < count:
            raise ShardError(f"{tar_path}: expected {count} samples from byte {offset}, found {done}")


def iter_split(shard_dir: str | Path, split: str) -> Iterator[tuple[str, bytes, dict]]:
    """Every sample of `split`, shard by shard in manifest order."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ManifestError(f"{shard_dir / manifest_lib.MANIFEST_NAME}: no split '{split}' (has {', '.join(manifest['splits'])})")
    for shard in manifest["splits"][split]["shards"]:
        yield from iter_shard(shard_dir / shard["name"])


class SampleTable(Protocol):
    """Where each sample of a split lies (plan.Pool is one): index i is in shard
    `shard_names[shard[i]]`, its first header at byte `offset[i]`, its key `keys[i]`."""

    shard_names: list[str]
    shard: Sequence[int]
    offset: Sequence[int]
    keys: list[str]


def iter_samples(shard_dir: str | Path, table: SampleTable, indices: Iterable[int], gap: int = 0) -> Iterator[tuple[int, tuple[str, bytes, dict]]]:
    """`(i, (key, jpg, meta))` for the given table indices, in index order (= shard order, then
    sample order): per shard, in runs of nearby samples, each run one seek plus a sequential
    read. Samples in a gap of <= `gap` between two wanted ones are read through (never decoded);
    gap=0 seeks to every wanted sample, so nothing else is read."""
    shard_dir = Path(shard_dir)
    todo = sorted(set(int(i) for i in indices))
    for _, group in itertools.groupby(todo, key=lambda i: int(table.shard[i])):
        group = list(group)
        runs, run = [], [group[0]]
        for i in group[1:]:
            if i - run[-1] <= max(gap, 1):  # neighbours always share a run
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        for run in runs:
            first, wanted = run[0], set(run)
            path = shard_dir / table.shard_names[int(table.shard[first])]
            for j, (key, jpg, meta) in enumerate(iter_shard(path, int(table.offset[first]), run[-1] - first + 1)):
                i = first + j
                if key != table.keys[i]:
                    raise ShardError(f"{path}: expected sample '{table.keys[i]}' at byte {int(table.offset[i])}, found '{key}': "
                                     f"the manifest does not describe this shard; run `shard verify {shard_dir}`")
                if i in wanted:
                    yield i, (key, jpg, meta)


def read_samples(shard_dir: str | Path, table: SampleTable, indices: Iterable[int], gap: int = 64) -> dict[int, tuple[str, bytes, dict]]:
    """`iter_samples` as a dict (the loader reads a window's samples at once)."""
    return dict(iter_samples(shard_dir, table, indices, gap))


__all__ = ["ManifestError", "ShardError", "SampleTable", "read_manifest", "iter_shard", "iter_split", "iter_samples", "read_samples"]
