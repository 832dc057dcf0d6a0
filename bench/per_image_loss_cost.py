"""Cost of per-image losses (hard_mining.unit=image): a training step with and without them.

    python bench/per_image_loss_cost.py --shards shards/synth [--config configs/debug.yaml] [--rounds 30]

One process, one model (the config's), the same real training batches for both arms: each round
takes the next batch and times forward + backward + optimizer step twice, once with
`model(images, targets, image_losses=True)` (plus the per-image values to the host, as the
Stepper fetches them) and once without, in alternating order, so load from other jobs on the
machine hits both arms alike. Prints the median ms/step of each arm, the median of the paired
differences and the median time of the per-image computation alone, over rounds after `--warmup`.
On the CPU the clock is the process's CPU time (what the step costs on a machine shared with other
jobs), on a GPU the wall-clock after a synchronize.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "debug.yaml"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=4")
    args = ap.parse_args()

    from fashionseg.data.loader import build_loader
    from fashionseg.model import build as build_module
    from fashionseg.model.build import build_model, per_image_losses
    from fashionseg.train.config import load
    from fashionseg.train.step import to_device

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load(args.config, args.overrides)
    b = cfg.train.batch_size
    loader = build_loader(cfg.data, args.shards, "train", rank=0, world_size=1, batch_sizes=[b], seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, loader.vocab.num_classes, loader.vocab.num_attributes).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    # on the CPU the process's own CPU time: what the step costs, whatever else runs on the machine
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inner: list[float] = []  # the per-image computation alone

    def timed(*a, **k):
        sync()
        t0 = clock()
        out = per_image_losses(*a, **k)
        sync()
        inner.append(clock() - t0)
        return out

    build_module.per_image_losses = timed

    def step(images, targets, per_image: bool) -> float:
        sync()
        t0 = clock()
        if per_image:
            losses, image_losses = model(images, targets, image_losses=True)
        else:
            losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        values = [total.detach().reshape(1)]
        if per_image:
            values += list(image_losses.values())
        torch.cat(values).tolist()  # the step's host sync, with the per-image values when asked
        sync()
        return clock() - t0

    batches = iter(loader)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds + args.warmup):
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches)
        images, targets = to_device(images, targets, device)
        for per_image in ((False, True) if r % 2 == 0 else (True, False)):
            seconds = step(images, targets, per_image)
            if r >= args.warmup:
                times[per_image].append(seconds)
    base, per = (statistics.median(times[k]) * 1000 for k in (False, True))
    diff = statistics.median((t - s) * 1000 for s, t in zip(times[False], times[True]))
    alone = statistics.median(inner[-args.rounds:]) * 1000
    what = "wall" if device.type == "cuda" else "process CPU"
    print(f"{cfg.model.backbone}, batch {b}, {device}, {args.rounds} rounds, {what} time: without {base:.1f} ms/step, "
          f"with per-image losses {per:.1f} ms/step; paired median difference {diff:+.1f} ms ({100 * diff / base:+.1f}%); "
          f"the per-image computation alone {alone:.1f} ms ({100 * alone / base:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
