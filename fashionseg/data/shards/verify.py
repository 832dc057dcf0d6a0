"""`shard verify`: re-check a shard set against its manifest.

For every shard: size and sha256; every sample where the manifest says (key, byte offset, image
size, categories); every image decodes as RGB JPEG of its stated size; every mask decodes on
that grid with the stated area and bbox; original-grid masks sit on the original grid and are
not empty; counts per shard and split match. Reads with plain
`tarfile`, independent of the builder's writer.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data.shards.manifest import ManifestError
from fashionseg.data.shards.reader import read_manifest
from fashionseg.io import sha256_file


@dataclass
class ShardResult:
    split: str
    name: str
    samples: int = 0
    instances: int = 0
    errors: list[str] = field(default_factory=list)


def _check_sample(key: str, jpg: bytes, meta: dict, listed: dict) -> tuple[int, list[str]]:
    errs = []
    try:
        im = Image.open(io.BytesIO(jpg))
        fmt = im.format
        im.load()
        if fmt != "JPEG" or im.mode != "RGB":
            errs.append(f"image is {fmt} {im.mode}, not an RGB JPEG")
        if (im.height, im.width) != (meta.get("height"), meta.get("width")):
            errs.append(f"image is {im.height}x{im.width}, its json says {meta.get('height')}x{meta.get('width')}")
    except Exception as e:  # any decode failure is a finding, not a crash
        errs.append(f"image does not decode ({type(e).__name__}: {e})")
    if (meta.get("height"), meta.get("width")) != (listed.get("height"), listed.get("width")):
        errs.append(f"json size {meta.get('height')}x{meta.get('width')} != manifest {listed.get('height')}x{listed.get('width')}")
    instances = meta.get("instances") or []
    if not instances:
        errs.append("no instances")
    cats = sorted({i.get("category_id") for i in instances})
    if cats != listed.get("categories"):
        errs.append(f"categories {cats} != manifest {listed.get('categories')}")
    for j, inst in enumerate(instances):
        seg = inst.get("segmentation") or {}
        try:
            if list(seg["size"]) != [meta["height"], meta["width"]]:
                errs.append(f"instance {j}: mask size {seg['size']} != image {meta['height']}x{meta['width']}")
                continue
            rle = {"size": seg["size"], "counts": seg["counts"].encode("ascii")}
            m = mask_util.decode(rle)
            area = int(m.sum())
        except Exception as e:
            errs.append(f"instance {j}: mask does not decode ({type(e).__name__}: {e})")
            continue
        if area == 0 or area != inst.get("area"):
            errs.append(f"instance {j}: mask area {area} != stated {inst.get('area')}")
        bbox = [int(round(v)) for v in mask_util.toBbox(rle).tolist()]
        if bbox != inst.get("bbox"):
            errs.append(f"instance {j}: bbox {inst.get('bbox')} != mask bbox {bbox}")
    errs += _check_original_grid(meta)
    return len(instances), errs


def _check_original_grid(meta: dict) -> list[str]:
    """Original-grid masks (--max-size builds): on the original grid and not empty. pycocotools'
    area reads the RLE string without painting the mask, so this costs little."""
    grid = [meta.get("orig_height"), meta.get("orig_width")]
    segs = [(f"instance {j}", i["orig_segmentation"]) for j, i in enumerate(meta.get("instances") or []) if "orig_segmentation" in i]
    segs += [(f"orig_only {j}", i.get("orig_segmentation") or {}) for j, i in enumerate(meta.get("orig_only") or [])]
    errs = []
    for where, seg in segs:
        try:
            if list(seg["size"]) != grid:
                errs.append(f"{where}: original-grid mask size {seg['size']} != original {grid[0]}x{grid[1]}")
            elif not mask_util.area({"size": seg["size"], "counts": seg["counts"].encode("ascii")}):
                errs.append(f"{where}: original-grid mask is empty")
        except Exception as e:
            errs.append(f"{where}: original-grid mask does not decode ({type(e).__name__}: {e})")
    return errs


def verify_shard(shard_dir: Path, split: str, shard: dict) -> ShardResult:
    res = ShardResult(split, shard["name"])
    path = shard_dir / shard["name"]
    if not path.is_file():
        res.errors.append("file is missing")
        return res
    size = path.stat().st_size
    if size != shard["bytes"]:
        res.errors.append(f"{size} bytes, manifest says {shard['bytes']}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        res.errors.append(f"sha256 {digest[:12]}... != manifest {shard['sha256'][:12]}...")
    listed = shard["samples"]
    try:
        with tarfile.open(path, "r:") as tar:
            pending: dict[str, tuple[int, dict]] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                entry = pending.setdefault(key, (member.offset, {}))
                entry[1][ext] = tar.extractfile(member).read()
                if "jpg" not in entry[1] or "json" not in entry[1]:
                    continue
                offset, parts = pending.pop(key)
                i = res.samples
                res.samples += 1
                where = f"sample {i} '{key}'"
                if i >= len(listed):
                    res.errors.append(f"{where}: not in the manifest")
                    continue
                want = listed[i]
                if want["key"] != key:
                    res.errors.append(f"{where}: manifest lists '{want['key']}' here")
                if want["offset"] != offset:
                    res.errors.append(f"{where}: header at byte {offset}, manifest offset {want['offset']}")
                try:
                    meta = json.loads(parts["json"])
                except ValueError as e:
                    res.errors.append(f"{where}: {key}.json unreadable ({e})")
                    continue
                n, errs = _check_sample(key, parts["jpg"], meta, want)
                res.instances += n
                res.errors.extend(f"{where}: {e}" for e in errs)
            for key in pending:
                res.errors.append(f"sample '{key}': incomplete (needs .jpg and .json)")
    except (tarfile.TarError, OSError, EOFError) as e:
        res.errors.append(f"not a readable tar ({e})")
    if res.samples != shard["num_samples"]:
        res.errors.append(f"{res.samples} samples, manifest says {shard['num_samples']}")
    if "num_instances" in shard and res.instances != shard["num_instances"] and not res.errors:
        res.errors.append(f"{res.instances} instances, manifest says {shard['num_instances']}")
    return res


def verify(shard_dir: str | Path) -> list[ShardResult]:
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    return [verify_shard(shard_dir, split, shard) for split, info in manifest["splits"].items() for shard in info["shards"]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="shard folder (holds manifest.json)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    try:
        results = verify(args.out)
    except ManifestError as e:
        print(f"shard verify: error: {e}", file=sys.stderr)
        return 2
    table = Table(title=f"shard verify {args.out}")
    for col in ("split", "shard", "samples", "instances", "status"):
        table.add_column(col, justify="right" if col in ("samples", "instances") else "left")
    for r in results:
        table.add_row(r.split, r.name, str(r.samples), str(r.instances), "[green]ok[/]" if not r.errors else f"[red]{len(r.errors)} problem(s)[/]")
    console = Console(stderr=True)
    console.print(table)
    bad = [r for r in results if r.errors]
    for r in bad:
        for e in r.errors[:20]:
            print(f"{Path(args.out) / r.name}: {e}", file=sys.stderr)
        if len(r.errors) > 20:
            print(f"{Path(args.out) / r.name}: ... and {len(r.errors) - 20} more", file=sys.stderr)
    if bad:
        print(f"shard verify: {len(bad)} of {len(results)} shards are damaged; rebuild with `shard build SRC {args.out}` "
              "(intact shards are kept)", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(results)} shards, {sum(r.samples for r in results)} samples, "
          f"{sum(r.instances for r in results)} instances: intact")
    return 0
