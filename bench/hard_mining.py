"""A/B of hard-example replay on the synthetic dataset: mask AP overall and on the hard categories.

    python bench/hard_mining.py --work /tmp/hm_bench --images 128 --steps 150 --every 5 --seeds 0 1 2

For each seed it trains the debug model (configs/debug.yaml, one process, CPU unless a GPU is
there) once per arm with `fashionseg train`, the real trainer (`--arms`, default base batch image):
  base          N data steps, no replay
  batch         N' data steps + a replay of the hardest batch every `--every` steps after warmup,
                N' chosen so that data + replay steps == N: the same number of optimizer steps as
                base (equal compute; wall-clock and CPU seconds are measured and printed)
  image         as batch, with hard_mining.unit=image: replay batches of the hardest images
  batch@steps, image@steps   N data steps + replays (more optimizer steps than base)
and scores each `model_final.pth` on val with fashionseg.eval (COCO segm AP). The hard subset is
computed from the training split, not hand-picked: the rarest third of the categories (fewest
training instances) and the smallest third (median mask area), e.g. collars, pockets, zippers.
Prints one row per arm with mean and spread (std over seeds) and writes `results.json` in --work.
Training uses the trainer's own schedule (warmup, multistep decay at 75% of max_steps), so all
arms see the same LR curve per data step (hard_mining.count_in_schedule=false).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# arm -> (hard_mining.unit or None for no replay, equal optimizer steps to base?)
ARMS = {"base": (None, True), "batch": ("batch", True), "image": ("image", True),
        "batch@steps": ("batch", False), "image@steps": ("image", False)}


def prepare_shards(work: Path, images: int, size: int, seed: int) -> Path:
    from fashionseg.data.shards.build import BuildConfig, build
    from fashionseg.data.synth import write_dataset

    shards = work / f"shards_{images}_{size}_{seed}"
    if (shards / "manifest.json").exists():
        return shards
    src = write_dataset(work / f"synth_{images}_{size}_{seed}", images, seed=seed, size=size, progress=True)
    code, report = build(BuildConfig(src=str(src), out=str(shards), samples_per_shard=32, val_fraction=0.25,
                                     workers=1, progress=True))
    if code != 0:
        raise SystemExit(f"shard build failed: {report.get('error')}")
    return shards


def hard_categories(shards: Path) -> tuple[list[int], dict]:
    """Rarest third and smallest third of the categories of the training split (source ids)."""
    from fashionseg.data.eval_source import ground_truth

    gt = ground_truth(shards, "train", grid="stored")
    counts: dict[int, int] = {}
    areas: dict[int, list[float]] = {}
    for a in gt["annotations"]:
        counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
        areas.setdefault(a["category_id"], []).append(float(a["area"]))
    cats = sorted(counts)
    third = max(1, len(cats) // 3)
    rare = sorted(cats, key=lambda c: counts[c])[:third]
    small = sorted(cats, key=lambda c: statistics.median(areas[c]))[:third]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    info = {"rare": {names[c]: counts[c] for c in rare},
            "small": {names[c]: statistics.median(areas[c]) for c in small},
            "all": {names[c]: counts[c] for c in cats}}
    return sorted(set(rare) | set(small)), info


def data_steps_for_equal_optimizer_steps(n: int, warmup: int, every: int) -> int:
    """Largest n' with n' + replays(n') <= n, replays(n') = floor((n' - warmup) / every) after warmup."""
    best = 0
    for k in range(n + 1):
        if k + max(0, (k - warmup) // every) <= n:
            best = k
    return best


def train(shards: Path, run: Path, steps: int, seed: int, replay: dict | None, args) -> tuple[float, float]:
    """Train one arm in a subprocess; (wall seconds, CPU seconds of the subprocess and its workers).
    CPU seconds are the fairer cost on a shared machine, where wall-clock depends on the neighbours."""
    cmd = [sys.executable, "-m", "fashionseg.train", "--config", str(ROOT / "configs" / "debug.yaml"),
           "--shards", str(shards), "--out", str(run), f"train.max_steps={steps}", f"train.seed={seed}",
           f"train.warmup_iters={args.warmup}", f"train.checkpoint_every={10**6}", "eval.every_epochs=0",
           "eval.at_end=false", f"log.every={max(1, steps // 4)}", "log.log_with=[]", "log.rich=false",
           f"data.min_size=[{args.size}]", f"data.max_size={args.size * 4 // 3}"]
    if replay:
        cmd += ["hard_mining.enabled=true"] + [f"hard_mining.{k}={v}" for k, v in replay.items()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds, cpu


def evaluate(run: Path, shards: Path, hard: list[int], args) -> dict:
    import torch

    from fashionseg.eval import inference as inf
    from fashionseg.eval.evaluate import evaluate_model

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = inf.load_for_inference(run / "model_final.pth", device)
    test_size, max_size = inf.inference_scale(loaded[3])
    m = evaluate_model(loaded[0], shards, "val", loaded[1], mask_thresh=loaded[2].mask_thresh, batch_size=4,
                       device=device, max_images=args.eval_images, iou_f1=False, progress=False,
                       test_size=test_size, max_size=max_size)
    per_cat = m["segm"]["per_category"]

    def mean_ap(cats) -> float:
        vals = [per_cat[str(c)]["AP"] for c in cats if per_cat.get(str(c), {}).get("AP") is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    present = [int(c) for c, v in per_cat.items() if v["AP"] is not None]
    return {"segm_AP": m["segm"]["AP"] or 0.0, "segm_AP50": m["segm"]["AP50"] or 0.0,
            "hard_AP": mean_ap([c for c in hard if c in present]),
            "easy_AP": mean_ap([c for c in present if c not in hard]),
            "replays": None, "per_category": per_cat}


def fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v == v]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * mean:5.2f} ± {100 * sd:4.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/fashionseg_hm_bench"))
    ap.add_argument("--images", type=int, default=160, help="synthetic images (25%% go to val)")
    ap.add_argument("--size", type=int, default=96, help="image height in px (synth and model.min_size)")
    ap.add_argument("--steps", type=int, default=40, help="data steps of the baseline")
    ap.add_argument("--warmup", type=int, default=10, help="train.warmup_iters; replays start after it")
    ap.add_argument("--every", type=int, default=5, help="hard_mining.every")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--loss", default="total", help="hard_mining.loss (total or a term such as loss_mask)")
    ap.add_argument("--max-loss", type=float, default=None, help="hard_mining.max_loss")
    ap.add_argument("--arms", nargs="+", default=["base", "batch", "image"], choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--eval-images", type=int, default=None, help="score the first N val images only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-runs", action="store_true", help="keep each run folder (checkpoints: ~0.5 GB per run)")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    shards = prepare_shards(args.work, args.images, args.size, args.data_seed)
    hard, info = hard_categories(shards)
    print(f"hard categories (rarest + smallest third of train): rare={info['rare']} small(median px)={info['small']}")

    replay = {"every": args.every, "top_k": args.top_k, "loss": args.loss}
    if args.max_loss is not None:
        replay["max_loss"] = args.max_loss
    n_time = data_steps_for_equal_optimizer_steps(args.steps, args.warmup, args.every)
    arms = {}
    for arm in args.arms:
        unit, equal_compute = ARMS[arm]
        arms[arm] = (args.steps, None) if unit is None else (n_time if equal_compute else args.steps, dict(replay, unit=unit))
    results: dict[str, list[dict]] = {a: [] for a in arms}
    t_all = time.perf_counter()
    for seed in args.seeds:
        for arm, (steps, rep) in arms.items():
            run = args.work / f"run_{arm.replace('@', '_')}_s{seed}_{time.time_ns()}"
            seconds, cpu = train(shards, run, steps, seed, rep, args)
            r = evaluate(run, shards, hard, args)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            last = [x for x in rows if "step" in x and "loss" in x][-1]
            r.update(seed=seed, data_steps=steps, train_seconds=seconds, train_cpu_seconds=cpu, final_loss=last.get("loss"),
                     replays=last.get("hard_mining/replays", 0), fallback_replays=last.get("hard_mining/fallback_replays", 0))
            results[arm].append(r)
            if not args.keep_runs:
                shutil.rmtree(run, ignore_errors=True)
            print(f"seed {seed} {arm:13s} data steps {steps:4d} replays {r['replays']:3d} (fallback {r['fallback_replays']}) train {seconds:6.1f} s wall {cpu:6.1f} s CPU  "
                  f"segm AP {100 * r['segm_AP']:5.2f}  hard {100 * r['hard_AP']:5.2f}  easy {100 * r['easy_AP']:5.2f}",
                  flush=True)

    print(f"\nhard mining A/B: {args.images} synthetic images at {args.size} px, debug model, seeds {args.seeds}, "
          f"every={args.every} top_k={args.top_k} loss={args.loss} max_loss={args.max_loss}; "
          f"mask AP x100, mean ± std over seeds; total {time.perf_counter() - t_all:.0f} s")
    print(f"{'arm':13s} {'data':>5s} {'replays':>7s} {'wall s':>7s} {'CPU s':>7s}  {'segm AP':>13s}  {'segm AP50':>13s}  "
          f"{'hard-cat AP':>13s}  {'other AP':>13s}")
    for arm, rs in results.items():
        print(f"{arm:13s} {rs[0]['data_steps']:5d} {rs[0]['replays']:7d} {statistics.fmean(r['train_seconds'] for r in rs):7.1f} "
              f"{statistics.fmean(r['train_cpu_seconds'] for r in rs):7.1f}  "
              f"{fmt([r['segm_AP'] for r in rs]):>13s}  {fmt([r['segm_AP50'] for r in rs]):>13s}  "
              f"{fmt([r['hard_AP'] for r in rs]):>13s}  {fmt([r['easy_AP'] for r in rs]):>13s}")
    from fashionseg.io import atomic_write_json
    atomic_write_json(args.work / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                   "hard_categories": info, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
