"""Run by tests/test_loader_distributed.py, under `accelerate launch --multi_gpu --num_processes N`
(gloo on CPU) or as one plain process: each rank iterates the rest of its loader's epoch with a
collective every step (unequal step counts would hang) and writes what it read to
OUT/{tag}rank{r}.json. `--save-at K` also saves the loader state after K steps to
OUT/{tag}rank{r}.pth; `--resume FILE` starts from such a state (any rank's, any layout's)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from fashionseg.data.loader import LoaderConfig, build_loader
from fashionseg.io import atomic_write_json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("shards")
    p.add_argument("out")
    p.add_argument("--batch-sizes", default="2,3")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    bs = [int(b) for b in args.batch_sizes.split(",")]
    cfg = LoaderConfig(workers=args.workers, min_size=[64], max_size=128, color_jitter=0.2, chunk_size=3)
    loader = build_loader(cfg, args.shards, "train", rank=rank, world_size=world, batch_sizes=bs, seed=5)
    loader.set_epoch(1)
    if args.resume:
        loader.load_state_dict(torch.load(args.resume, weights_only=True))
    out = Path(args.out)
    result = {"rank": rank, "world": world, "len": len(loader), "steps_left": loader.steps_left(),
              "layout_change": loader.layout_change, "summary": loader.plan().summary(), "keys": [], "sizes": []}
    for images, targets in loader:
        if world > 1:  # a DDP-like collective every step: a rank with fewer steps would leave the other hanging
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == world
        result["keys"].append([t["key"] for t in targets])
        result["sizes"].append(len(images))
        if len(result["keys"]) == args.save_at:
            torch.save(loader.state_dict(), out / f"{args.tag}rank{rank}.pth")
    steps = [len(result["keys"])]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, steps[0])
        steps = gathered
    result["all_steps"] = steps
    result["epoch_after"] = loader.epoch
    atomic_write_json(out / f"{args.tag}rank{rank}.json", result)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
