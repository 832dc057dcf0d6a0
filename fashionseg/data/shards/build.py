"""`shard build`: pack a Kaggle or COCO dataset into verified webdataset shards.

Pipeline: read the source into records (cheap row checks) -> split images into train/val,
stratified by category -> cut each split into shards of a fixed list of source images -> decode
images and masks in worker processes -> write each shard to a temporary name, rename it, and
record its checksum in OUT/.build/<shard>.json -> write manifest.json and report.json.

Every shard is a pure function of its source images and the settings (fixed tar headers, fixed
JPEG settings), and its sidecar holds a fingerprint of both, so a re-run after a crash keeps
every finished shard whose fingerprint and sha256 still match and rebuilds only the rest,
producing byte-identical shards.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards import manifest as manifest_lib
from fashionseg.data.sources import coco as coco_source
from fashionseg.data.sources import kaggle as kaggle_source
from fashionseg.data.sources.records import (
    DROP_IMAGE, DROP_INSTANCE, REPAIRED, RawImage, RawInstance, Source, SourceError, problem,
)
from fashionseg.io import atomic_open, atomic_write_json, sha256_file

BUILDER_VERSION = 3  # bump when the bytes a shard holds change for the same input (2: 16-bit/float images scaled;
# 3: integer image_id + source_id, original-grid masks when resized)
JPEG_QUALITY = 95  # used only when an image must be re-encoded (resize, repair)
SIDECAR_DIR = ".build"
POLYGON_MARGIN = 8  # polygon coordinates beyond this many image sizes are corrupt, not annotations
EXIT_FATAL, EXIT_TOO_BAD = 2, 1


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    src: str
    out: str
    format: str = "auto"
    val_fraction: float = 0.1
    max_size: int | None = None
    samples_per_shard: int = 256
    workers: int = 0  # 0: os.cpu_count()
    seed: int = 0
    images: str | None = None
    max_bad_fraction: float = 0.05
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# one image: decode, check, repair, convert masks (runs in worker processes)

def _decode_mask(inst: RawInstance, h: int, w: int) -> tuple[dict | None, str | None, bool]:
    """-> (COCO compressed RLE on the h x w grid, error reason, repaired)."""
    if inst.kaggle_rle is not None:
        try:
            coco, repaired = rle.kaggle_to_coco(inst.kaggle_rle, h, w)
        except rle.RLEError as e:
            return None, f"bad EncodedPixels: {e}", False
        return coco, None, repaired
    seg = inst.segmentation
    try:
        if isinstance(seg, list):
            polys = [[float(v) for v in p] for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                return None, "no polygon with >= 3 points", False
            # pycocotools' rasteriser segfaults on NaN/inf and runs out of memory on huge
            # coordinates (it walks every edge pixel by pixel): refuse those before calling it
            if not all(np.isfinite(p).all() for p in polys):
                return None, "polygon has a NaN or infinite coordinate", False
            limit = POLYGON_MARGIN * max(h, w)
            if any(np.abs(p).max() > limit for p in polys):
                return None, f"polygon coordinate beyond +-{limit} for a {h}x{w} image", False
            r = mask_util.merge(mask_util.frPyObjects(polys, h, w))
            return {"size": [h, w], "counts": r["counts"].decode("ascii")}, None, len(polys) != len(seg)
        if isinstance(seg, dict) and "counts" in seg and "size" in seg:
            sh, sw = (int(v) for v in seg["size"])
            if (sh, sw) != (h, w):
                return None, f"RLE size {sh}x{sw} != image size {h}x{w}", False
            counts = seg["counts"]
            if isinstance(counts, list):
                if sum(int(c) for c in counts) != h * w or any(int(c) < 0 for c in counts):
                    return None, f"uncompressed RLE counts do not sum to {h}*{w}", False
                r = mask_util.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
            else:
                r = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            m = mask_util.decode(r)  # normalise to the canonical encoding
            return rle.encode_coco(m), None, False
    except (ValueError, TypeError, OverflowError) as e:
        return None, f"unreadable segmentation ({e})", False
    return None, f"unsupported segmentation of type {type(seg).__name__}", False


def _to_rgb(pil: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. PIL's own convert clips 16/32-bit and float greyscale to 0..255 (a 16-bit
    PNG turns white, a 0..1 float image black), so those are scaled to 8 bits first."""
    if pil.mode == "RGB":
        return pil
    if pil.mode.startswith("I;16") or pil.mode in ("I", "F"):
        a = np.asarray(pil).astype(np.float64)
        if pil.mode.startswith("I;16"):
            a = a / 257.0
        elif pil.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif pil.mode == "I" and a.size and a.max() > 255:
            a = a / (257.0 if a.max() <= 65535 else a.max() / 255.0)
        pil = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return pil.convert("RGB")


def _resize_mask(coco: dict, size: tuple[int, int]) -> dict:
    # pycocotools decodes column-major: resize the transpose (no copy; nearest is per-axis) and
    # hand the transposed result back, already in the column-major order encode wants
    mt = rle.decode_coco(coco).T
    small_t = Image.fromarray(mt, "L").resize((size[1], size[0]), Image.Resampling.NEAREST)
    return rle.encode_coco(np.asarray(small_t).T)


def process_image(key: str, img: RawImage, max_size: int | None) -> dict:
    """Decode and check one image with its instances -> {key, jpg, meta, problems}.

    Never raises on bad data: every problem becomes a report entry; jpg is None when the image
    is dropped.
    """
    problems: list[dict] = []
    out: dict[str, Any] = {"key": key, "jpg": None, "meta": None, "problems": problems}
    n_inst = len(img.instances)
    lost = lambda reason: problems.append({**problem(DROP_IMAGE, reason, img.source_id, img.path), "instances": n_inst})  # noqa: E731
    if not img.instances:
        problems.append({**problem(DROP_IMAGE, "no valid instances in the source", img.source_id, img.path, bad=False), "instances": 0})
        return out
    try:
        data = Path(img.path).read_bytes()
    except OSError as e:
        lost(f"missing or unreadable image file ({e.strerror or e})")
        return out
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        pil = Image.open(io.BytesIO(data))
        fmt = pil.format
        pil.load()
    except Exception as e:  # PIL raises many types for corrupt data; all mean "unreadable"
        lost(f"cannot decode image ({type(e).__name__}: {e})")
        return out

    reencode = False
    if fmt != "JPEG":
        suffix = Path(img.path).suffix
        what = f"{fmt} bytes behind a {suffix} name" if suffix.lower() in (".jpg", ".jpeg") else f"{fmt} image"
        problems.append(problem(REPAIRED, f"{what}: re-encoded as JPEG", img.source_id, img.path, bad=False))
        reencode = True
    if pil.mode != "RGB":
        problems.append(problem(REPAIRED, f"{pil.mode} image converted to RGB", img.source_id, img.path, bad=False))
        reencode = True
    # The mask grid is what the annotations state; an EXIF rotation may explain a mismatch.
    grids = Counter((i.height, i.width) for i in img.instances if i.height and i.width)
    grid = grids.most_common(1)[0][0] if grids else (pil.height, pil.width)
    if (pil.height, pil.width) != grid:
        try:
            orientation = pil.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF block: treat as no orientation
            orientation = 1
        if orientation in range(2, 9):
            turned = ImageOps.exif_transpose(pil)
            if (turned.height, turned.width) == grid:
                problems.append(problem(REPAIRED, f"EXIF orientation {orientation} applied so the image matches its {grid[0]}x{grid[1]} masks",
                                        img.source_id, img.path, bad=False))
                pil, reencode = turned, True
    pil = _to_rgb(pil)
    h, w = pil.height, pil.width

    scale = None
    if max_size and max(h, w) > max_size:
        s = max_size / max(h, w)
        new_size = (max(1, round(w * s)), max(1, round(h * s)))
        scale = new_size
        pil = pil.resize(new_size, Image.Resampling.BILINEAR)
        reencode = True

    instances, orig_only = [], []
    for inst in img.instances:
        ih, iw = (inst.height, inst.width) if inst.height and inst.width else (h, w)
        if (ih, iw) != (h, w):
            problems.append({**problem(DROP_INSTANCE, f"mask grid {ih}x{iw} != decoded image {h}x{w} (not explained by EXIF orientation)",
                                       img.source_id, inst.where), "instances": 1})
            continue
        coco, err, repaired = _decode_mask(inst, h, w)
        if coco is None:
            problems.append({**problem(DROP_INSTANCE, err, img.source_id, inst.where), "instances": 1})
            continue
        if repaired:
            what = "overlapping or unsorted runs merged (union)" if inst.kaggle_rle is not None else "invalid polygons skipped"
            problems.append(problem(REPAIRED, what, img.source_id, inst.where, bad=False))
        labels = {"category_id": inst.category_id, "attribute_ids": list(inst.attribute_ids)}
        orig = None
        if scale is not None:
            orig, coco = coco, _resize_mask(coco, scale)
        enc = {"size": coco["size"], "counts": coco["counts"].encode("ascii")}
        area = int(mask_util.area(enc))
        if area == 0:
            bad = scale is None
            reason = "empty mask" if bad else f"mask vanished when resized to {scale[0]}x{scale[1]}"
            problems.append({**problem(DROP_INSTANCE, reason, img.source_id, inst.where, bad=bad), "instances": 1})
            if orig is not None:  # still part of the original-grid ground truth
                orig_only.append({**labels, "orig_segmentation": orig})
            continue
        bbox = [int(round(v)) for v in mask_util.toBbox(enc).tolist()]
        instances.append({**labels, "bbox": bbox, "area": area, "segmentation": coco,
                          **({"orig_segmentation": orig} if orig is not None else {})})
    if not instances:
        problems.append({**problem(DROP_IMAGE, "no valid instances left", img.source_id, img.path, bad=False), "instances": 0})
        return out
    if reencode:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
    out["jpg"] = data
    out["meta"] = {"image_id": img.image_id, "source_id": img.source_id, "height": pil.height, "width": pil.width,
                   "orig_height": h, "orig_width": w, "instances": instances, **({"orig_only": orig_only} if orig_only else {})}
    return out


def _work(args: tuple[str, RawImage, int | None]) -> dict:
    key, img, max_size = args
    try:
        return process_image(key, img, max_size)
    except Exception as e:  # a bug or an exotic file must not end a multi-hour build: report it
        reason = f"unexpected error while processing ({type(e).__name__}: {e})"
        return {"key": key, "jpg": None, "meta": None,
                "problems": [{**problem(DROP_IMAGE, reason, img.source_id, img.path), "instances": len(img.instances)}]}


# ---------------------------------------------------------------------------------------------
# planning: keys, split, shards, fingerprints

def assign_keys(images: list[RawImage]) -> list[str]:
    seen: set[str] = set()
    keys = []
    for img in images:
        key = base = manifest_lib.safe_key(img.source_id)
        n = 1
        while key in seen:
            key = f"{base}_{n}"
            n += 1
        seen.add(key)
        keys.append(key)
    return keys


def _rank(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode("utf-8")).hexdigest()


def stratified_split(cats: list[set[int]], ids: list[str], val_fraction: float, seed: int) -> list[str]:
    """Per-image 'train'/'val', deterministic; each category gets about val_fraction of its images
    in val, and a category with >= 2 images lands in both splits (iterative stratification:
    rarest category first, each image goes where that category is needed most)."""
    n = len(ids)
    if val_fraction <= 0 or n < 2:
        return ["train"] * n
    count = Counter(c for cs in cats for c in cs)
    need = {"val": {}, "train": {}}
    for c, k in count.items():
        v = round(k * val_fraction)
        if k >= 2:
            v = min(max(v, 1), k - 1)
        need["val"][c], need["train"][c] = v, k - v
    total = {"val": round(n * val_fraction), "train": n - round(n * val_fraction)}
    total["val"] = min(max(total["val"], 1), n - 1)
    total["train"] = n - total["val"]
    order = sorted(range(n), key=lambda i: _rank(seed, ids[i]))
    split: list[str | None] = [None] * n
    by_cat: dict[int, list[int]] = defaultdict(list)
    for i in order:
        for c in cats[i]:
            by_cat[c].append(i)
    remaining = dict(count)

    def place(i: int, c: int | None) -> None:
        if c is not None and need["val"][c] != need["train"][c]:
            s = "val" if need["val"][c] > need["train"][c] else "train"
        else:  # tie: the split furthest from its overall share
            s = "val" if total["val"] / (n * val_fraction) > total["train"] / (n * (1 - val_fraction)) else "train"
        split[i] = s
        total[s] -= 1
        for cc in cats[i]:
            need[s][cc] -= 1
            remaining[cc] -= 1

    while True:
        live = [(k, c) for c, k in remaining.items() if k > 0]
        if not live:
            break
        _, c = min(live)
        for i in by_cat[c]:
            if split[i] is None:
                place(i, c)
    for i in order:  # images without categories
        if split[i] is None:
            place(i, None)
    return split  # type: ignore[return-value]


def _fingerprint(settings: dict, items: list[tuple[str, RawImage]]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for key, img in items:
        try:
            st = os.stat(img.path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
        rec = {"key": key, "image": {k: v for k, v in dataclasses.asdict(img).items() if k != "path"},
               "file": Path(img.path).name, "stat": stat}
        h.update(json.dumps(rec, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing

class _HashingFile:
    """Write-through wrapper computing the sha256 and size of what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


class ShardWriter:
    """One shard: members `<key>.jpg`, `<key>.json` per sample with fixed headers (deterministic)."""

    def __init__(self, path: Path):
        self.path = path
        self._ctx = atomic_open(path, "wb")
        self._hf = _HashingFile(self._ctx.__enter__())
        self._tar = tarfile.open(fileobj=self._hf, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[dict] = []
        self.num_instances = 0

    def add(self, key: str, jpg: bytes, meta: dict) -> None:
        offset = self._tar.offset
        js = json.dumps(meta, separators=(",", ":")).encode("utf-8")
        self._tar.addfile(_tarinfo(f"{key}.jpg", len(jpg)), io.BytesIO(jpg))
        self._tar.addfile(_tarinfo(f"{key}.json", len(js)), io.BytesIO(js))
        cats = sorted({i["category_id"] for i in meta["instances"]})
        self.samples.append({"key": key, "offset": offset, "width": meta["width"], "height": meta["height"], "categories": cats,
                             "image_id": meta["image_id"], "source_id": meta["source_id"]})
        self.num_instances += len(meta["instances"])

    def close(self) -> tuple[str, int]:
        self._tar.close()
        self._ctx.__exit__(None, None, None)
        return self._hf.sha.hexdigest(), self._hf.n

    def abort(self) -> None:
        self._ctx.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)


def read_source(cfg: BuildConfig) -> Source:
    src = Path(cfg.src)
    fmt = cfg.format
    if fmt == "auto":
        if kaggle_source.looks_like(src):
            fmt = "kaggle"
        elif coco_source.looks_like(src):
            fmt = "coco"
        elif not src.exists():
            raise SourceError(f"{src}: does not exist; pass the Kaggle folder (with train.csv) or a COCO annotation JSON")
        else:
            raise SourceError(f"{src}: neither a Kaggle folder (train.csv) nor a COCO annotation JSON; pass one, or --format")
    reader = kaggle_source if fmt == "kaggle" else coco_source
    return reader.read(src, cfg.images)


@dataclasses.dataclass
class _ShardPlan:
    split: str
    name: str
    items: list[tuple[str, RawImage]]
    fingerprint: str = ""


def plan_shards(source: Source, cfg: BuildConfig) -> list[_ShardPlan]:
    images = source.images
    keys = assign_keys(images)
    cats = [{i.category_id for i in img.instances} for img in images]
    splits = stratified_split(cats, [img.source_id for img in images], cfg.val_fraction, cfg.seed)
    settings = {"builder": BUILDER_VERSION, "quality": JPEG_QUALITY, "max_size": cfg.max_size}
    plans = []
    for split in manifest_lib.SPLITS:
        members = sorted((i for i in range(len(images)) if splits[i] == split), key=lambda i: _rank(cfg.seed, images[i].source_id))
        for s in range(0, len(members), cfg.samples_per_shard):
            chunk = [(keys[i], images[i]) for i in members[s : s + cfg.samples_per_shard]]
            p = _ShardPlan(split, manifest_lib.shard_name(split, s // cfg.samples_per_shard), chunk)
            p.fingerprint = _fingerprint({**settings, "split": split, "name": p.name}, chunk)
            plans.append(p)
    return plans


def _reusable(out: Path, plan: _ShardPlan) -> dict | None:
    side = out / SIDECAR_DIR / f"{plan.name}.json"
    try:
        rec = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != plan.fingerprint:
        return None
    if rec["num_samples"] == 0:
        return rec
    tar = out / plan.name
    if not tar.is_file() or tar.stat().st_size != rec["bytes"] or sha256_file(tar) != rec["sha256"]:
        return None
    return rec


def _clean(out: Path, plans: list[_ShardPlan]) -> None:
    """Remove temp files of a killed run, stale shards of another plan and the old manifest."""
    names = {p.name for p in plans}
    for f in out.iterdir():
        n = f.name
        stale_tmp = n.startswith(".") and n.endswith(".tmp")
        stale_tar = n.endswith(".tar") and n.split("-")[0] in manifest_lib.SPLITS and n not in names
        if f.is_file() and (stale_tmp or stale_tar or n == manifest_lib.MANIFEST_NAME):
            f.unlink()
    side = out / SIDECAR_DIR
    if side.is_dir():
        for f in side.iterdir():
            if f.is_file() and (f.name.endswith(".tmp") or f.name[: -len(".json")] not in names):
                f.unlink()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed or 0:.1f} images/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def _write_shard(out: Path, p: _ShardPlan, results: Iterator[dict], advance) -> dict:
    """Consume this shard's results, write its tar (temp name, then rename) and its sidecar."""
    writer = None
    problems: list[dict] = []
    try:
        for _ in p.items:
            r = next(results)
            problems.extend(r["problems"])
            if r["jpg"] is not None:
                writer = writer or ShardWriter(out / p.name)
                writer.add(r["key"], r["jpg"], r["meta"])
            advance()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    sha, nbytes = writer.close() if writer is not None else ("", 0)
    if writer is None:  # nothing valid in this shard: no tar (and none left from an earlier run)
        (out / p.name).unlink(missing_ok=True)
    rec = {"fingerprint": p.fingerprint, "name": p.name, "split": p.split,
           "num_samples": len(writer.samples) if writer else 0, "num_instances": writer.num_instances if writer else 0,
           "bytes": nbytes, "sha256": sha, "samples": writer.samples if writer else [], "problems": problems}
    atomic_write_json(out / SIDECAR_DIR / f"{p.name}.json", rec, indent=None)
    return rec


def _open_pool(workers: int, n_tasks: int):
    """A worker pool (None: work inline), made before the progress bar starts its thread."""
    if workers <= 1 or n_tasks <= 1:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # concurrent.futures, not multiprocessing.Pool: when a worker dies (the OOM killer, a crash in
    # a native decoder) Pool silently replaces it and waits forever for the lost result, while
    # the executor raises BrokenProcessPool, which ends the build with a message
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ProcessPoolExecutor(min(workers, n_tasks), mp_context=ctx)
    pool.submit(int).result()  # with fork, the first submit starts every worker: do it before any thread runs
    return pool


class WorkerDied(RuntimeError):
    """A decoding worker process ended abnormally (message says what to do)."""


def _checked(results: Iterator[dict]) -> Iterator[dict]:
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from results
    except BrokenProcessPool as e:
        raise WorkerDied(f"a worker process died while decoding images ({e}); usually the OS killed it for "
                         "memory: re-run the same command with fewer --workers (finished shards are kept)") from None


def _results(pool, todo: list[_ShardPlan], cfg: BuildConfig, workers: int) -> Iterator[dict]:
    """Processed images in plan order."""
    tasks = [(key, img, cfg.max_size) for p in todo for key, img in p.items]
    if pool is None:
        return map(_work, tasks)
    return _checked(pool.map(_work, tasks, chunksize=max(1, min(8, len(tasks) // (workers * 8)))))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build(cfg: BuildConfig) -> tuple[int, dict]:
    """Run the build; returns (exit code, report). Raises SourceError on fatal input."""
    t0 = time.time()
    out = Path(cfg.out)
    if not 0 <= cfg.val_fraction < 1:
        raise SourceError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.samples_per_shard <= 0:
        raise SourceError("--samples-per-shard must be > 0")
    if cfg.max_size is not None and cfg.max_size < 1:
        raise SourceError(f"--max-size must be a positive number of pixels (or left out to keep sizes), got {cfg.max_size}")
    if cfg.workers < 0:
        raise SourceError(f"--workers must be >= 0 (0: all cores), got {cfg.workers}")
    if out.exists() and not out.is_dir():
        raise SourceError(f"{out}: exists and is not a folder; pass a new or existing output folder as OUT")
    source = read_source(cfg)
    if not source.images:
        first = "; ".join(f"{p.get('where', '?')}: {p['reason']}" for p in source.problems[:3])
        why = f" ({len(source.problems)} rows rejected, e.g. {first})" if source.problems else ""
        raise SourceError(f"{source.path}: no annotated images (nothing valid to build){why}; check the file is the full annotation set")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SourceError(f"{out}: cannot create the output folder ({e.strerror or e}); pass a writable OUT") from e
    plans = plan_shards(source, cfg)
    _clean(out, plans)
    workers = cfg.workers or default_workers()

    records: dict[str, dict] = {}
    todo = []
    for p in plans:
        rec = _reusable(out, p)
        if rec is not None:
            records[p.name] = rec
        else:
            todo.append(p)
    n_todo = sum(len(p.items) for p in todo)

    pool = _open_pool(workers, n_todo)
    try:
        with _progress(cfg.progress) as bar:
            task = bar.add_task(f"shard build -> {out}", total=n_todo)
            results = _results(pool, todo, cfg, workers)
            for p in todo:
                records[p.name] = _write_shard(out, p, results, lambda: bar.advance(task))
    except BaseException:
        if pool is not None:  # Ctrl-C or a failure: stop the workers now, not after their queue
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    if pool is not None:
        pool.shutdown(wait=True)

    report = _report(source, plans, records, {p.name for p in todo}, workers, n_todo, time.time() - t0)
    code = 0
    if report["totals"]["samples"] == 0:
        code = EXIT_FATAL
        report["error"] = f"nothing valid: no image survived; see {out / manifest_lib.REPORT_NAME} for each reason"
    elif report["totals"]["bad_fraction"] > cfg.max_bad_fraction:
        code = EXIT_TOO_BAD
        report["error"] = (f"{report['totals']['bad_fraction']:.1%} of the source instances were bad "
                           f"(> --max-bad-fraction {cfg.max_bad_fraction:g}); see {out / manifest_lib.REPORT_NAME}. Fix the source, "
                           f"or re-run with a higher --max-bad-fraction to accept it (finished shards are kept). No manifest was written.")
    else:
        atomic_write_json(out / manifest_lib.MANIFEST_NAME, _manifest(source, plans, records, cfg))
    atomic_write_json(out / manifest_lib.REPORT_NAME, report)
    return code, report


def _manifest(source: Source, plans: list[_ShardPlan], records: dict[str, dict], cfg: BuildConfig) -> dict:
    splits: dict[str, dict] = {}
    for split in manifest_lib.SPLITS:
        shards = []
        for p in plans:
            rec = records[p.name]
            if p.split != split or rec["num_samples"] == 0:
                continue
            shards.append({"name": rec["name"], "num_samples": rec["num_samples"], "num_instances": rec["num_instances"],
                           "bytes": rec["bytes"], "sha256": rec["sha256"], "samples": rec["samples"]})
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards),
                         "num_instances": sum(s["num_instances"] for s in shards), "shards": shards}
    return {
        "format": manifest_lib.FORMAT, "version": manifest_lib.VERSION,
        "categories": source.vocab.categories, "attributes": source.vocab.attributes,
        "settings": {"format": source.format, "source": str(Path(cfg.src).resolve()), "max_size": cfg.max_size,
                     "samples_per_shard": cfg.samples_per_shard, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
                     "builder_version": BUILDER_VERSION},
        "splits": splits,
    }


def _report(source: Source, plans, records, todo_names: set[str], workers: int, processed: int, elapsed: float) -> dict:
    problems = list(source.problems)
    for p in plans:
        problems.extend(records[p.name]["problems"])
    problems = [_normalise_problem(p) for p in problems]
    lost_bad = sum(p.get("instances", 1) for p in problems if p["bad"] and p["action"] in (DROP_INSTANCE, DROP_IMAGE))
    reasons = Counter((p["action"], _reason_kind(p["reason"])) for p in problems)
    samples = sum(records[p.name]["num_samples"] for p in plans)
    instances = sum(records[p.name]["num_instances"] for p in plans)
    totals = {
        "source_images": len(source.images), "source_instances": source.num_rows,
        "samples": samples, "instances": instances,
        "dropped_images": sum(1 for p in problems if p["action"] == DROP_IMAGE),
        "dropped_instances": sum(p.get("instances", 1) for p in problems if p["action"] in (DROP_INSTANCE, DROP_IMAGE)),
        "bad_instances": lost_bad,
        "repaired": sum(1 for p in problems if p["action"] == REPAIRED),
        "dropped_attributes": sum(1 for p in problems if p["action"] == "dropped attribute"),
        "bad_fraction": lost_bad / max(1, source.num_rows),
        "shards": sum(1 for p in plans if records[p.name]["num_samples"]), "shards_reused": len(plans) - len(todo_names),
        "elapsed_s": round(elapsed, 3), "workers": workers,
        "images_per_s": round(processed / elapsed, 2) if elapsed > 0 else None,
    }
    return {"source": str(source.path), "format": source.format, "totals": totals,
            "reasons": [{"action": a, "reason": r, "count": n} for (a, r), n in sorted(reasons.items())],
            "problems": problems}


def _normalise_problem(p: dict) -> dict:
    """Every report entry has the same keys (docs/design.md): {action, reason, image_id, where, bad, instances},
    `instances` being how many source instances the entry lost (1 for a dropped instance, 0 for repairs)."""
    lost = 1 if p["action"] == DROP_INSTANCE else 0
    return {"action": p["action"], "reason": p["reason"], "image_id": p.get("image_id"), "where": p.get("where"),
            "bad": p["bad"], "instances": p.get("instances", lost)}


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary table: drop details in parentheses, numbers -> N."""
    return re.sub(r"\d+", "N", reason.split(" (")[0])


def print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = report["totals"]
    table = Table(title=f"shard build {out}")
    table.add_column("")
    table.add_column("count", justify="right")
    for label, key in (("source images", "source_images"), ("source instances", "source_instances"), ("samples written", "samples"),
                       ("instances written", "instances"), ("dropped images", "dropped_images"), ("dropped instances", "dropped_instances"),
                       ("repaired", "repaired"), ("dropped attribute ids", "dropped_attributes")):
        table.add_row(label, str(t[key]))
    table.add_row("bad fraction", f"{t['bad_fraction']:.2%}")
    table.add_row("images/s", f"{t['images_per_s']}" if t["images_per_s"] is not None else "-")
    console = Console(stderr=True)
    console.print(table)
    if report["reasons"]:
        rt = Table(title="problems by reason (details in report.json)")
        rt.add_column("action")
        rt.add_column("reason")
        rt.add_column("count", justify="right")
        for r in report["reasons"]:
            rt.add_row(r["action"], r["reason"], str(r["count"]))
        console.print(rt)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Kaggle folder (train.csv, label_descriptions.json, train/) or COCO annotation JSON / its folder")
    p.add_argument("out", help="output folder for shards, manifest.json and report.json")
    p.add_argument("--format", choices=["auto", "kaggle", "coco"], default="auto")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of images in val, stratified by category (default 0.1)")
    p.add_argument("--max-size", type=int, default=None, help="resize so the longer side is at most PX (default: keep sizes and bytes)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="images per shard (default 256)")
    p.add_argument("--workers", type=int, default=0, help="processes decoding images (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and shard order (default 0)")
    p.add_argument("--images", default=None, help="folder holding the images (default: SRC/train, or beside/under images/ for COCO)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05,
                   help="fail when more than this share of source instances is bad (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    cfg = BuildConfig(src=args.src, out=args.out, format=args.format, val_fraction=args.val_fraction, max_size=args.max_size,
                      samples_per_shard=args.samples_per_shard, workers=args.workers, seed=args.seed, images=args.images,
                      max_bad_fraction=args.max_bad_fraction, progress=not args.no_progress)
    try:
        code, report = build(cfg)
    except SourceError as e:
        print(f"shard build: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except WorkerDied as e:
        print(f"shard build: error: {e}", file=sys.stderr)
        return EXIT_FATAL
    except OSError as e:  # disk full, permissions: finished shards stay, a re-run resumes
        print(f"shard build: error: writing {cfg.out} failed ({e}); free space or fix permissions, then re-run the same "
              "command: finished shards are kept", file=sys.stderr)
        return EXIT_FATAL
    print_summary(report, Path(cfg.out))
    if code:
        print(f"shard build: error: {report['error']}", file=sys.stderr)
    else:
        print(f"wrote {report['totals']['samples']} samples to {cfg.out} (manifest.json, report.json)")
    return code
