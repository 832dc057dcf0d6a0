"""Console entry point `launcher` (plan / run / doctor): argument routing only.

Everything after the first `--` is passed to the training module untouched (TRAIN_ARGS), so
`launcher run hosts.yaml -- --config configs/debug.yaml train.lr=0.01` never has to know the
trainer's options.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "plan": ("launcher.plan", "print the exact command every host will run"),
    "run": ("launcher.run", "start every host, stream their logs, stop all when one fails "
                            "(--max-restarts: then restart from the latest checkpoint)"),
    "doctor": ("launcher.doctor", "check every host: reachable, same code, GPUs supported, disk, shards, port"),
    "calibrate": ("launcher.calibrate", "measure each card's step time per batch size; write balanced batch sizes"),
}


def main(argv: list[str] | None = None) -> int:
    from launcher.hosts import HostsError

    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(
        prog="launcher", description="one torchrun per host from hosts.yaml (docs/launcher.md)",
        epilog="everything after '--' goes to the training module, e.g. "
               "launcher run hosts.yaml -- --config configs/debug.yaml --shards shards/demo")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        usage = None if name == "doctor" else f"launcher {name} [options] HOSTS -- TRAIN_ARGS"
        p = sub.add_parser(name, help=help_, description=help_, usage=usage)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if train_args and args.command == "doctor":
        parser.error("doctor takes no TRAIN_ARGS after '--'")
    args.train_args = train_args
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except HostsError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
