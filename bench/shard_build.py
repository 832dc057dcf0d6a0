"""Throughput of `shard build` (images/s) on synthetic Kaggle-layout data.

Two image sizes (synth-sized 128 px, and 1024 px like the Kaggle photos), 1 worker and all
cores, with and without --max-size. Prints one line per configuration; nothing is asserted.

    .venv/bin/python bench/shard_build.py [--small 400] [--large 64] [--workers N]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from fashionseg.data.shards.build import BuildConfig, build, default_workers
from fashionseg.data.synth import write_dataset


def bench(src: Path, work: Path, workers: int, max_size: int | None) -> tuple[int, float]:
    out = work / f"out-{workers}-{max_size}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    code, report = build(BuildConfig(src=str(src), out=str(out), workers=workers, max_size=max_size, samples_per_shard=64,
                                     progress=False))
    dt = time.perf_counter() - t0
    assert code == 0, report.get("error")
    shutil.rmtree(out)
    return report["totals"]["samples"], dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=400, help="images of 128 px")
    ap.add_argument("--large", type=int, default=64, help="images of 1024 px")
    ap.add_argument("--workers", type=int, default=default_workers(), help="the 'all cores' setting")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'images':>18} {'workers':>7} {'max_size':>8} {'n':>5} {'seconds':>8} {'images/s':>9}")
        for size, n, max_sizes in ((128, args.small, [None]), (1024, args.large, [None, 512])):
            src = write_dataset(work / f"synth{size}", n, seed=0, size=size, progress=False)
            for max_size in max_sizes:
                for workers in sorted({1, args.workers}):
                    count, dt = bench(src, work, workers, max_size)
                    print(f"{f'synth {size} px':>18} {workers:>7} {str(max_size):>8} {count:>5} {dt:>8.2f} {count / dt:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
