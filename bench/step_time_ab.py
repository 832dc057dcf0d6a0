"""Training step time of two checkouts of fashionseg (e.g. before/after a refactor), interleaved.

Each checkout builds its own synthetic shards with its own code, then runs `python -m
fashionseg.train --config configs/debug.yaml` for `--steps` steps per round, alternating
(old, new, old, new, ...) so machine noise hits both. Two figures per round and arm:
- wall: the median `step_time` of metrics.jsonl after the first 3 steps;
- CPU: (CPU s of a `--steps` run - CPU s of a `--steps // 4` run) / the step difference, read
  from the child's rusage. Start-up cancels out, and on a shared machine CPU time is far steadier
  than wall time (run with OMP_NUM_THREADS=1 so that no thread spins waiting for a busy core).

    git worktree add /tmp/old <commit>
    python bench/step_time_ab.py --old /tmp/old --new . [--rounds 3] [--steps 20]

Last lines: `step_time old=S.SSSs new=S.SSSs change=+X.X%` and `cpu_per_step old=... new=... change=...`
(medians over rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def sh(cmd: list[str], root: Path) -> float:
    """Run `cmd` in checkout `root`; return the CPU seconds (user + sys) it took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {root}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def shards_for(root: Path, work: Path) -> Path:
    src, out = work / "src", work / "shards"
    sh([sys.executable, "-m", "fashionseg.cli", "--help"], root)
    sh([sys.executable, "-c", "import sys; from fashionseg.cli import shard_main; sys.exit(shard_main(sys.argv[1:]))",
        "synth", str(src), "--images", "48", "--size", "96"], root)
    sh([sys.executable, "-c", "import sys; from fashionseg.cli import shard_main; sys.exit(shard_main(sys.argv[1:]))",
        "build", str(src), str(out), "--val-fraction", "0.2", "--samples-per-shard", "16", "--workers", "1"], root)
    return out


def train(root: Path, shards: Path, run: Path, steps: int) -> float:
    """CPU seconds of a debug run of `steps` steps."""
    return sh([sys.executable, "-m", "fashionseg.train", "--config", str(root / "configs" / "debug.yaml"),
               "--shards", str(shards), "--out", str(run), f"train.max_steps={steps}", "log.every=1",
               "eval.every_epochs=0", "eval.at_end=false", "log.log_with=[]", f"train.checkpoint_every={10 * steps}"], root)


def step_time(root: Path, shards: Path, run: Path, steps: int) -> tuple[float, float]:
    """(median wall s per step, CPU s per step) of one round."""
    short = max(steps // 4, 2)
    cpu_short = train(root, shards, run.with_name(run.name + "_short"), short)
    cpu = train(root, shards, run, steps)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    wall = statistics.median(r["step_time"] for r in rows if "step_time" in r and r["step"] > 3)
    return wall, (cpu - cpu_short) / (steps - short)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path)
    ap.add_argument("--new", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="step_time_ab_"))
    roots = {"old": args.old.resolve(), "new": args.new.resolve()}
    shards = {k: shards_for(r, work / k) for k, r in roots.items()}
    times: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for k, r in roots.items():
            times[k].append(step_time(r, shards[k], work / f"{k}_run{i}", args.steps))
        (ow, oc), (nw, nc) = times["old"][-1], times["new"][-1]
        print(f"round {i}: wall old {ow:.4f}s new {nw:.4f}s | CPU old {oc:.4f}s new {nc:.4f}s", flush=True)
    for j, name in enumerate(("step_time", "cpu_per_step")):
        old, new = (statistics.median(t[j] for t in times[k]) for k in ("old", "new"))
        print(f"{name} old={old:.4f}s new={new:.4f}s change={100 * (new - old) / old:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
