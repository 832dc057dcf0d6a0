"""Write one shard: webdataset's own `TarWriter`, under a temporary name until it is complete.

    with ShardWriter(path) as w:
        w.add(key, jpg_bytes, meta)      # members <key>.jpg, <key>.json
    w.sha256, w.bytes, w.samples         # set on a clean exit, when the tar has its final name

Headers are fixed (mtime 0, mode 0644, no user/group names), so a shard is a pure function of
its samples: a rebuild gives the same bytes. The sha256 is computed while writing and each
sample's byte offset (its first header) is recorded for the manifest, so nothing reads the
tar back. An exception inside the block leaves no file behind (fashionseg/io.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from webdataset import TarWriter

from fashionseg.io import atomic_open


class _HashingFile:
    """Write-through wrapper computing the sha256 and size of what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)


class ShardWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.samples: list[dict] = []  # manifest entries: key, offset, size, categories, ids
        self.num_instances = 0
        self.sha256, self.bytes = "", 0

    def __enter__(self) -> "ShardWriter":
        self._atomic = atomic_open(self.path, "wb")
        self._file = _HashingFile(self._atomic.__enter__())
        self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0, encoder=False, compress=False)
        return self

    def add(self, key: str, jpg: bytes, meta: dict) -> None:
        offset = self._tar.tarstream.offset
        self._tar.write({"__key__": key, "jpg": jpg, "json": json.dumps(meta, separators=(",", ":")).encode("utf-8")})
        self.samples.append({"key": key, "offset": offset, "width": meta["width"], "height": meta["height"],
                             "categories": sorted({i["category_id"] for i in meta["instances"]}),
                             "image_id": meta["image_id"], "source_id": meta["source_id"]})
        self.num_instances += len(meta["instances"])

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._tar.close()  # end-of-archive blocks, padded to a full record
            self.sha256, self.bytes = self._file.sha.hexdigest(), self._file.n
        self._atomic.__exit__(exc_type, exc, tb)  # rename onto path, or remove the temp file
