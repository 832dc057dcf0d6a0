"""Throughput of `shard build` and `shard verify` (images/s) on synthetic Kaggle-layout data.

Two image sizes (synth-sized 128 px, and 1024 px like the Kaggle photos), 1 worker and all
cores, with and without --max-size. Prints one line per configuration with the build and verify
rates and the shard bytes (with --max-size the sample JSON also holds the original-grid masks);
nothing is asserted.

    .venv/bin/python bench/shard_build.py [--small 400] [--large 64] [--workers N] [--repeats 1]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fashionseg.data.shards.build import BuildConfig, build, default_workers
from fashionseg.data.shards.verify import verify
from fashionseg.data.synth import write_dataset


def bench(src: Path, work: Path, workers: int, max_size: int | None) -> tuple[int, float, float, int]:
    """-> (samples, build seconds, verify seconds, shard bytes)."""
    out = work / f"out-{workers}-{max_size}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    code, report = build(BuildConfig(src=str(src), out=str(out), workers=workers, max_size=max_size, samples_per_shard=64,
                                     progress=False))
    dt = time.perf_counter() - t0
    assert code == 0, report.get("error")
    t0 = time.perf_counter()
    assert all(not r.errors for r in verify(out))
    dv = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    shutil.rmtree(out)
    return report["totals"]["samples"], dt, dv, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=400, help="images of 128 px")
    ap.add_argument("--large", type=int, default=64, help="images of 1024 px")
    ap.add_argument("--workers", type=int, default=default_workers(), help="the 'all cores' setting")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"{'images':>18} {'workers':>7} {'max_size':>8} {'n':>5} {'build s':>8} {'build/s':>8} {'verify s':>8} "
              f"{'verify/s':>8} {'MiB':>7}")
        for size, n, max_sizes in ((128, args.small, [None]), (1024, args.large, [None, 512])):
            src = write_dataset(work / f"synth{size}", n, seed=0, size=size, progress=False)
            for max_size in max_sizes:
                for workers in sorted({1, args.workers}):
                    runs = [bench(src, work, workers, max_size) for _ in range(args.repeats)]
                    count, mib = runs[0][0], runs[0][3] / 2**20
                    db, dv = statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)
                    print(f"{f'synth {size} px':>18} {workers:>7} {str(max_size):>8} {count:>5} {db:>8.2f} {count / db:>8.1f} "
                          f"{dv:>8.2f} {count / dv:>8.1f} {mib:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
