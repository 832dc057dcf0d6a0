"""Read shard sets: the manifest, and samples streamed from a tar starting at any sample.

The manifest records the byte offset of each sample's first tar header, so a reader resuming
mid-shard seeks straight there and streams forward with `tarfile`'s stream mode: nothing
before the offset is read or decoded, and no shard is ever loaded whole.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

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


__all__ = ["ManifestError", "ShardError", "read_manifest", "iter_shard", "iter_split"]
