"""A tiny DDP job for the launcher tests: gloo, a linear model, N steps, weights saved per rank.

Run under torchrun (the launcher): reads RANK/WORLD_SIZE/LOCAL_RANK from the environment and its
batch size from FASHIONSEG_LOCAL_BATCH_SIZES[LOCAL_RANK] like fashionseg.train does.
`--die-rank R --die-step S` makes global rank R exit(3) before step S (S = --steps: after the
last step) while the others sleep after training, so only the launcher can stop them (when
rank R is not in this world, e.g. its host was left out, the others finish normally). `--hold`:
every rank sleeps after training (a run only a signal ends). Every rank
writes `pid-rankR` (its pid and torchrun's) at start so a test can check nothing is left behind.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--die-rank", type=int, default=-1)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--die-step", type=int, default=1)
    ap.add_argument("--resume", action="store_true")  # what `launcher run --max-restarts` adds on a restart
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ["LOCAL_RANK"])
    sizes = os.environ.get("FASHIONSEG_LOCAL_BATCH_SIZES")
    batch = int(sizes.split(",")[local_rank]) if sizes else 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pid-rank{rank}"), "w") as f:
        f.write(f"{os.getpid()} {os.getppid()}")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1000 + rank)
    for step in range(args.steps + 1):
        if rank == args.die_rank and step == args.die_step:
            print(f"rank {rank} dying at step {step}", flush=True)
            os._exit(3)
        if step == args.steps:
            break
        x = torch.randn(batch, 4, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.6f}", flush=True)
    if args.hold or 0 <= args.die_rank < world:  # a survivor: wait for the launcher to stop us
        time.sleep(600)
    torch.save(model.module.state_dict(), os.path.join(args.out, f"rank{rank}.pt"))
    info = {"rank": rank, "world": world, "local_rank": local_rank, "batch": batch,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "overrides": args.overrides, "resume": args.resume, "pid": os.getpid(),
            "probe": os.environ.get("LAUNCHER_TEST_PROBE")}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()  # no rank tears gloo down while a peer still talks to it ("terminate called ...")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
