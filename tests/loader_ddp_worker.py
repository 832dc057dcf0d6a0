"""Run by tests/test_loader_distributed.py under `accelerate launch --multi_gpu --num_processes 2`
(gloo on CPU): each rank iterates its loader with a collective every step (unequal step counts
would hang) and writes the keys it read to OUT/rank{r}.json."""
from __future__ import annotations

import argparse
import json
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
    args = p.parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    bs = [int(b) for b in args.batch_sizes.split(",")]
    cfg = LoaderConfig(batch_sizes=bs, workers=args.workers, min_size=[64], max_size=128, color_jitter=0.2, chunk_size=3)
    result = {"rank": rank, "world": world}
    for split, train in (("train", True), ("val", False)):
        loader = build_loader(cfg, args.shards, split, rank=rank, world_size=world, seed=5, train=train)
        steps, keys, sizes = 0, [], []
        for images, targets in loader:
            if train:  # a DDP-like collective every step: a rank with fewer steps would leave the other hanging
                t = torch.ones(1)
                dist.all_reduce(t)
                assert t.item() == world
            keys += [t["key"] for t in targets]
            sizes.append(len(images))
            steps += 1
        counts = torch.tensor([steps])
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(gathered, counts)
        result[split] = {"steps": steps, "len": len(loader), "keys": keys, "sizes": sizes,
                         "all_steps": [int(g.item()) for g in gathered], "summary": loader.plan_summary()}
    atomic_write_json(Path(args.out) / f"rank{rank}.json", result)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
