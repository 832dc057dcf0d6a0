"""`shard build`: pack a Kaggle or COCO dataset into verified webdataset shards.

Pipeline: read the source into records (sources/, cheap row checks) -> keys and a train/val
split stratified by category (split.py) -> cut each split into shards of a fixed list of source
images -> decode images and masks in worker processes (process.py) -> write each shard to a
temporary name with webdataset's TarWriter, rename it, record its checksum in
OUT/.build/<shard>.json (writer.py) -> write manifest.json and report.json (report.py).

Every shard is a pure function of its source images and the settings (fixed tar headers, fixed
JPEG settings), and its sidecar holds a fingerprint of both, so a re-run after a crash keeps
every finished shard whose fingerprint and sha256 still match and rebuilds only the rest,
producing byte-identical shards. The formats are in docs/formats.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from fashionseg.data.shards import manifest as manifest_lib
from fashionseg.data.shards import process
from fashionseg.data.shards.report import make_report, print_summary
from fashionseg.data.shards.split import assign_keys, rank, stratified_split
from fashionseg.data.shards.writer import ShardWriter
from fashionseg.data.sources import coco as coco_source
from fashionseg.data.sources import kaggle as kaggle_source
from fashionseg.data.sources.records import Problem, RawImage, Source, SourceError
from fashionseg.io import atomic_write_json, sha256_file

BUILDER_VERSION = 3  # bump when the bytes a shard holds change for the same input (2: 16-bit/float images
# scaled; 3: integer image_id + source_id, original-grid masks when resized, webdataset's TarWriter)
SIDECAR_DIR = ".build"
EXIT_FATAL, EXIT_TOO_BAD = 2, 1
FORMATS = ("auto", "kaggle", "kaggle2019", "coco")


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
    if fmt == "coco":
        return coco_source.read(src, cfg.images)
    return kaggle_source.read(src, cfg.images, layout=None if cfg.format == "auto" else fmt)


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
    settings = {"builder": BUILDER_VERSION, "quality": process.JPEG_QUALITY, "max_size": cfg.max_size}
    plans = []
    for split in manifest_lib.SPLITS:
        members = sorted((i for i in range(len(images)) if splits[i] == split), key=lambda i: rank(cfg.seed, images[i].source_id))
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
    problems: list[Problem] = []
    writer = None
    with contextlib.ExitStack() as stack:  # the tar is opened at the first valid sample
        for _ in p.items:
            r = next(results)
            problems.extend(r["problems"])
            if r["jpg"] is not None:
                writer = writer or stack.enter_context(ShardWriter(out / p.name))
                writer.add(r["key"], r["jpg"], r["meta"])
            advance()
    if writer is None:  # nothing valid in this shard: no tar (and none left from an earlier run)
        (out / p.name).unlink(missing_ok=True)
        writer = ShardWriter(out / p.name)
    rec = {"fingerprint": p.fingerprint, "name": p.name, "split": p.split, "num_samples": len(writer.samples),
           "num_instances": writer.num_instances, "bytes": writer.bytes, "sha256": writer.sha256, "samples": writer.samples,
           "problems": [q.to_json() for q in problems]}
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
        return map(process.work, tasks)
    return _checked(pool.map(process.work, tasks, chunksize=max(1, min(8, len(tasks) // (workers * 8)))))


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
        first = "; ".join(f"{p.where or '?'}: {p.reason}" for p in source.problems[:3])
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

    report = _report(source, plans, records, len(plans) - len(todo), workers, n_todo, time.time() - t0, cfg)
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


def _report(source: Source, plans: list[_ShardPlan], records: dict[str, dict], reused: int, workers: int, processed: int,
            elapsed: float, cfg: BuildConfig) -> dict:
    problems = list(source.problems)
    for p in plans:
        problems.extend(Problem.from_json(q) for q in records[p.name]["problems"])
    warnings = []
    for split in manifest_lib.SPLITS:
        planned = sum(len(p.items) for p in plans if p.split == split)
        written = sum(records[p.name]["num_samples"] for p in plans if p.split == split)
        if split == "val" and cfg.val_fraction > 0 and planned == 0:
            warnings.append(f"split 'val' is empty: the source has {len(source.images)} annotated image(s), at least 2 are needed "
                            "for a val split")
        elif planned and not written:
            warnings.append(f"split '{split}' is empty: all {planned} of its images were dropped (reasons in report.json)")
    return make_report(source, problems, samples=sum(records[p.name]["num_samples"] for p in plans),
                       instances=sum(records[p.name]["num_instances"] for p in plans),
                       shards=sum(1 for p in plans if records[p.name]["num_samples"]), shards_reused=reused,
                       workers=workers, processed=processed, elapsed=elapsed, warnings=warnings)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Kaggle folder (train.csv, label_descriptions.json, train/) or COCO annotation JSON / its folder")
    p.add_argument("out", help="output folder for shards, manifest.json and report.json")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="kaggle: iMaterialist 2020 CSV; kaggle2019: 2019 CSV (ClassId 6_28_77 = category 6, attributes 28, 77); "
                        "coco: Fashionpedia/COCO JSON (default: auto-detect)")
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
