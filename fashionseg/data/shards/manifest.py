"""The manifest of a shard set (`OUT/manifest.json`): its schema, validation and naming rules.

One place for the facts every reader and writer of shards shares: the format tag and version,
the split names, how shard files are named and how an ImageId becomes a tar-safe sample key.
The schema itself is written out in docs/formats.md ("Manifest").
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

FORMAT = "fashionseg-shards"
VERSION = 2  # 2: samples carry image_id (int) and source_id; version 1 sets still read (no ids)
READABLE = (1, 2)
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or not in the expected schema (message names the path)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_key(image_id: str) -> str:
    """ImageId -> a webdataset-safe key: no dots (webdataset splits key/extension at the first
    dot), no slashes, at most 80 characters (ustar names stay < 100 with the extension).

    Ids that had to change get a short hash of the original so two ids never map to one key.
    """
    key = _UNSAFE.sub("_", str(image_id))
    if key != str(image_id) or len(key) > 80 or not key:
        digest = hashlib.sha1(str(image_id).encode("utf-8")).hexdigest()[:10]
        key = f"{key[:69]}_{digest}"
    return key


_SAMPLE_FIELDS = (("key", str), ("offset", int), ("width", int), ("height", int), ("categories", list))
_ID_FIELDS = (("image_id", int), ("source_id", str))  # version >= 2


def _fail(path: Path, what: str) -> None:
    raise ManifestError(f"{path}: {what}; rebuild it with `shard build SRC {path.parent}`")


def validate(manifest: Any, path: str | Path = MANIFEST_NAME) -> dict:
    """Check the parts of the schema readers rely on; return the manifest unchanged."""
    path = Path(path)
    if not isinstance(manifest, dict):
        _fail(path, "not a JSON object")
    if manifest.get("format") != FORMAT:
        _fail(path, f"format is {manifest.get('format')!r}, expected {FORMAT!r} (not a fashionseg shard manifest)")
    if manifest.get("version") not in READABLE:
        _fail(path, f"version {manifest.get('version')!r} is not supported (this fashionseg reads versions "
                    f"{', '.join(map(str, READABLE))})")
    fields = _SAMPLE_FIELDS + (_ID_FIELDS if manifest["version"] >= 2 else ())
    if not isinstance(manifest.get("categories"), list) or not manifest["categories"]:
        _fail(path, "no 'categories' vocabulary")
    if not isinstance(manifest.get("attributes"), list):
        _fail(path, "no 'attributes' vocabulary")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        _fail(path, "no 'splits' object")
    for split, info in splits.items():
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            _fail(path, f"split '{split}' has no 'shards' list")
        total = 0
        for i, shard in enumerate(info["shards"]):
            if not isinstance(shard, dict):
                _fail(path, f"split '{split}' shard #{i} is not an object")
            for field, kind in (("name", str), ("num_samples", int), ("bytes", int), ("sha256", str), ("samples", list)):
                if not isinstance(shard.get(field), kind):
                    _fail(path, f"split '{split}' shard #{i} lacks '{field}'")
            if Path(shard["name"]).name != shard["name"] or shard["name"] in ("", ".", ".."):
                _fail(path, f"split '{split}' shard #{i}: name {shard['name']!r} must be a file name inside the shard folder")
            if len(shard["samples"]) != shard["num_samples"]:
                _fail(path, f"shard {shard['name']}: {len(shard['samples'])} samples listed, num_samples says {shard['num_samples']}")
            for j, sample in enumerate(shard["samples"]):
                if not isinstance(sample, dict) or any(not isinstance(sample.get(f), k) or isinstance(sample.get(f), bool)
                                                       for f, k in fields):
                    _fail(path, f"shard {shard['name']} sample #{j} needs {', '.join(f for f, _ in fields)} "
                                f"(has {sorted(sample) if isinstance(sample, dict) else type(sample).__name__})")
            total += shard["num_samples"]
        if info.get("num_samples") != total:
            _fail(path, f"split '{split}': num_samples {info.get('num_samples')} != sum over its shards {total}")
    return manifest


def require_ids(manifest: dict, path: str | Path) -> None:
    """Eval and predict need the source's image ids, which version-1 sets do not carry."""
    if manifest["version"] < 2:
        _fail(Path(path), "built by an older fashionseg, without the source's image ids (format version 1)")


def load(shard_dir: str | Path) -> dict:
    """Read and validate `shard_dir/manifest.json` (or a manifest path given directly)."""
    p = Path(shard_dir)
    path = p if p.suffix == ".json" else p / MANIFEST_NAME
    if not path.is_file():
        hint = "" if p.exists() else " (the folder does not exist)"
        raise ManifestError(f"{path}: no shard manifest here{hint}; build shards with `shard build SRC {p}`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e}); rebuild it with `shard build SRC {path.parent}`") from e
    return validate(manifest, path)
