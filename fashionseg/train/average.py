"""`fashionseg average RUN_DIR --last K --out W`: the mean of the last K checkpoints' weights
(checkpoint averaging, as Kaggle write-ups use), written as a weights file like model_final.pth.

Floating-point tensors are averaged in float64 and cast back; integer buffers (BatchNorm's
`num_batches_tracked`) are taken from the newest checkpoint. BatchNorm running statistics are
averaged like weights, the usual practice for detection models with frozen or few BN layers.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fashionseg.model.weights_file import WeightsFile, save_weights
from fashionseg.train import checkpoint as ckpt_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder (holds checkpoints/)")
    parser.add_argument("--last", type=int, default=3, metavar="K", help="how many of the newest checkpoints (default 3)")
    parser.add_argument("--out", help="output weights (default: RUN_DIR/model_avg.pth)")


def model_state(path: Path, state: dict) -> dict[str, torch.Tensor]:
    model = state["parts"].get("model")
    if model is None:
        raise ValueError(f"{path}: no model weights in trainer.pth (a DeepSpeed checkpoint keeps them sharded in ds/): "
                         "convert with DeepSpeed's zero_to_fp32.py first")
    return model


def average_checkpoints(paths: list[Path]) -> dict[str, torch.Tensor]:
    states = [model_state(p, ckpt_lib.read(p)) for p in paths]
    newest = states[-1]
    out = {}
    for k, v in newest.items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s in states:
                if s[k].shape != v.shape:
                    raise ValueError(f"checkpoints disagree on the shape of '{k}'")
                acc += s[k].double()
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
        meta = ckpt_lib.read(chosen[-1])["meta"]
    except (ValueError, ckpt_lib.CheckpointError) as e:
        print(f"error: {e}")
        return 1
    out = Path(args.out) if args.out else run_dir / "model_avg.pth"
    vocab = meta["vocab"]
    save_weights(out, WeightsFile(model, meta["config"], vocab["categories"], vocab["attributes"],
                                  {"averaged": [p.name for p in chosen]}))
    print(f"averaged {', '.join(p.name for p in chosen)} -> {out}")
    return 0
