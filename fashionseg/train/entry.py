"""`fashionseg train`: argument parsing only; the trainer lives in loop.py.

The same entry runs in one process, under `accelerate launch [args] -m fashionseg.train ...` and
under `torchrun ... -m fashionseg.train ...` (the launcher): Accelerator reads the environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (configs/debug.yaml, configs/fashionpedia_r50.yaml)")
    parser.add_argument("--shards", help="shard folder (overrides data.shards)")
    parser.add_argument("--out", help="run folder (default: runs/<config name>)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--debug", action="store_true",
                        help="one process, deterministic algorithms, a small subset, a log line every step")
    parser.add_argument("--overfit-batches", type=int, default=0, metavar="K",
                        help="train on K fixed batches; exit non-zero unless the loss falls by at least half")
    parser.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides at any depth, e.g. train.lr=0.01 train.batch_sizes=[2,2,4] "
                             "model.loss_weights.loss_mask=2.0")


def run(args: argparse.Namespace) -> int:
    from fashionseg.train import config as config_lib

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    try:
        cfg = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.shards:
        print("error: no shards: pass --shards DIR or set data.shards in the config", file=sys.stderr)
        return 2
    if args.debug or cfg.train.deterministic:
        # MKL picks summation orders by memory alignment unless told not to: bit-exact reruns need this
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own probe would warn on every rank
    from fashionseg.data.loader import LoaderStateError
    from fashionseg.data.plan import PlanError
    from fashionseg.data.shards.manifest import ManifestError
    from fashionseg.model.gpu import GPUCompatibilityError
    from fashionseg.train.checkpoint import CheckpointError
    from fashionseg.train.loop import RunOptions, TrainingError, train

    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    opts = RunOptions(config=cfg, run_dir=run_dir, shards=cfg.shards, resume=args.resume, debug=args.debug,
                      overfit_batches=args.overfit_batches, detect_anomaly=args.detect_anomaly, argv=list(sys.argv))
    try:
        return train(opts)
    except (TrainingError, CheckpointError, config_lib.ConfigError, GPUCompatibilityError, LoaderStateError, PlanError,
            ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from fashionseg.console import setup_logging
    setup_logging()
    parser = argparse.ArgumentParser(prog="fashionseg train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))  # options may follow key=value overrides
