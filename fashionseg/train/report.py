"""`fashionseg report RUN_DIR`: one PNG of a run's loss terms, learning rate and AP over steps."""
from __future__ import annotations

import argparse
from pathlib import Path

from fashionseg.train.logging import read_metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG path (default: RUN_DIR/report.png)")


def plot(run_dir: str | Path, out: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fashionseg.io import atomic_open

    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train and not evals:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no rows to plot (has the run logged a step yet?)")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    terms = sorted({k for r in train for k in r if k.startswith("loss")})
    for k in terms:
        pts = [(r["step"], r[k]) for r in train if k in r]
        ax.plot(*zip(*pts), label=k, lw=2.2 if k == "loss" else 1.2)
    ax.set(title="loss terms (mean per logging interval)", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    ax = axes[1]
    pts = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if pts:
        ax.plot(*zip(*pts), color="tab:green")
    skipped = [r["step"] for r in train if r.get("skipped_steps")]
    ax.set(title=f"learning rate{' (skipped steps: %d)' % train[-1]['skipped_steps'] if skipped else ''}", xlabel="step")
    ax = axes[2]
    keys = [k for k in ("eval/segm_AP", "eval/bbox_AP", "eval/segm_AP50", "eval/iou_f1_AP") if any(k in r for r in evals)]
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        ax.plot(*zip(*pts), marker="o", label=k[5:])
    ax.set(title="validation AP", xlabel="step", ylim=(0, None))
    if keys:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    try:
        out = plot(run_dir, args.out or run_dir / "report.png")
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 1
    print(out)
    return 0
