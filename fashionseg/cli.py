"""Console entry points `shard` and `fashionseg`: argument routing only, no logic.

Each command lives in the module named below, which exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `shard --help`
does not pay for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SHARD_COMMANDS = {
    "synth": ("fashionseg.data.synth", "write a synthetic dataset in the Kaggle layout"),
    "build": ("fashionseg.data.shards.build", "pack a Kaggle or COCO dataset into webdataset shards"),
    "verify": ("fashionseg.data.shards.verify", "re-check every shard's checksum, images and masks"),
    "inspect": ("fashionseg.data.shards.inspect", "statistics table and a contact sheet of a shard set"),
    "plan": ("fashionseg.data.plan", "steps and samples per rank for a training layout"),
}

FASHIONSEG_COMMANDS = {
    "train": ("fashionseg.train.entry", "train Mask R-CNN + attribute head (also under accelerate launch)"),
    "eval": ("fashionseg.eval.evaluate", "COCO mAP and AP^{IoU+F1} of a weights file on a split"),
    "predict": ("fashionseg.eval.predict", "predictions.json, submission.csv and overlays for images"),
    "score": ("fashionseg.eval.score", "score any COCO results file against a COCO/Fashionpedia annotation file"),
    "tune-thresholds": ("fashionseg.eval.tune", "search post-processing thresholds on val"),
    "report": ("fashionseg.train.report", "PNG of loss terms, lr and AP of a run directory"),
    "average": ("fashionseg.train.average", "average the weights of the last K checkpoints"),
    "schedule": ("fashionseg.train.schedule", "print (and plot) the learning rate a config gives at each step"),
}


def _dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None) -> int:
    from fashionseg.console import setup_logging

    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in commands.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command '{argv[0]}' (choose from {', '.join(commands)})")
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(commands[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"{prog} {argv[0]}", description=commands[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_intermixed_args(argv[1:])  # options may follow key=value overrides
    return int(module.run(args) or 0)


def shard_main(argv: list[str] | None = None) -> int:
    return _dispatch("shard", SHARD_COMMANDS, argv)


def main(argv: list[str] | None = None) -> int:
    return _dispatch("fashionseg", FASHIONSEG_COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
