"""`fashionseg average RUN_DIR --last K --out W`: the mean of the last K checkpoints' weights
(seed 004's checkpoint averaging), written as a `model_final.pth`-style file.

Floating-point tensors are averaged in float64 and cast back; integer buffers (BatchNorm's
`num_batches_tracked`) are taken from the newest checkpoint. BatchNorm running statistics are
averaged like weights, the usual practice for detection models with frozen or few BN layers.
DeepSpeed checkpoints are read through the model weights written beside them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fashionseg.io import atomic_open
from fashionseg.train import checkpoint as ckpt_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (holds checkpoints/)")
    parser.add_argument("--last", type=int, default=3, metavar="K", help="how many of the newest checkpoints (default 3)")
    parser.add_argument("--out", help="output weights (default: RUN_DIR/model_avg.pth)")


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    states = [ckpt_lib.load_trainer_state(p) for p in paths]
    for p, s in zip(paths, states):
        if "model" not in s:
            raise ValueError(f"{p}: no model weights in trainer.pth (a DeepSpeed checkpoint): average its "
                             "model_final.pth files or convert with zero_to_fp32 first")
    newest = states[-1]["model"]
    out = {}
    for k, v in newest.items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s in states:
                if s["model"][k].shape != v.shape:
                    raise ValueError(f"checkpoints disagree on the shape of '{k}'")
                acc += s["model"][k].double()
            out[k] = (acc / len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    ckpts = ckpt_lib.list_checkpoints(run_dir)
    if not ckpts:
        print(f"error: no checkpoints in {run_dir / ckpt_lib.CKPT_DIR}")
        return 1
    if args.last < 1:
        print("error: --last must be >= 1")
        return 2
    chosen = ckpts[-args.last:]
    if len(chosen) < args.last:
        print(f"note: only {len(chosen)} checkpoint(s) kept (train.keep_checkpoints); averaging those")
    try:
        model = average_checkpoints(chosen)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    newest = ckpt_lib.load_trainer_state(chosen[-1])
    final = {"model": model, "config": newest["config"], "averaged": [p.name for p in chosen]}
    src_final = run_dir / "model_final.pth"
    if src_final.exists():  # vocabularies come from the run's own final file when it has one
        f = torch.load(src_final, map_location="cpu", weights_only=True)
        final["categories"], final["attributes"] = f.get("categories"), f.get("attributes")
    elif "vocab" in newest:
        final["categories"], final["attributes"] = newest["vocab"]["categories"], newest["vocab"]["attributes"]
    out = Path(args.out) if args.out else run_dir / "model_avg.pth"
    with atomic_open(out, "wb") as f:
        torch.save(final, f)
    print(f"averaged {', '.join(p.name for p in chosen)} -> {out}")
    return 0
