"""`fashionseg train` with faults injected from the test side (production code has no test hooks).

    python tests/train_fault_worker.py --nan-steps 2,3 -- --config ... key=value ...

--nan-steps: the model's training losses become NaN at these 1-based training forwards (= data
steps when accumulate_steps is 1 and nothing is replayed).
--hang-step: that training forward never returns (a stuck driver, a dead peer).
"""
from __future__ import annotations

import argparse
import sys
import threading

from fashionseg.model import build


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--nan-steps", default="")
    p.add_argument("--hang-step", type=int, default=0)
    ns = p.parse_args(argv[:split])
    nan_steps = {int(s) for s in ns.nan_steps.split(",") if s}
    original = build.FashionMaskRCNN.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == ns.hang_step:
                threading.Event().wait()  # hang for good
            if calls["n"] in nan_steps:
                out = {k: v * float("nan") for k, v in out.items()}
        return out

    build.FashionMaskRCNN.forward = forward
    from fashionseg.train.entry import main as train_main
    return train_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
