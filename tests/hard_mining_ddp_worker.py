"""One rank of a small DDP run that follows the trainer <-> hard-miner protocol exactly.

Launched by tests/test_hard_mining_distributed.py with
`accelerate launch --multi_gpu --num_processes 2 ... tests/hard_mining_ddp_worker.py OUT ...`.
It isolates the miner's part of the contract (docs/design.md, "Trainer <-> hard miner") from the
full trainer: a real Accelerator/DDP model, optimizer, warmup scheduler and per-rank checkpoint,
batches that are a pure function of (key, epoch) as `loader.load_batch(keys, epoch)` promises.
`--unit image` mines per sample (each sample's own loss, hard_mining.unit=image).
Each rank writes OUT/rank{r}.json (its replay log and the miner's stats) and OUT/rank{r}.pt
(its final weights). `--stop-after K` saves a checkpoint after data step K and exits, as a
killed run would leave it; `--resume` continues from that checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from fashionseg.io import atomic_write_bytes, atomic_write_json
from fashionseg.train.hard_mining import HardMiningConfig
from fashionseg.train.image_mining import build_miner

DIM = 8


def load_sample(key: str, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (x, y) from (key, epoch), with an 'augmentation' drawn from that seed. Keys of
    rank 1 carry a larger scale, so its losses often exceed the ceiling (exercises fallback)."""
    seed = int.from_bytes(hashlib.sha256(f"{key}/{epoch}".encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    scale = 4.0 if key.startswith("r1") else 1.0
    x = torch.randn(DIM, generator=g) * scale
    y = torch.tensor([x.sum().item() * 0.5 + torch.randn((), generator=g).item()])
    return x, y


def batch_keys(rank: int, step: int, batch_size: int) -> list[str]:
    return [f"r{rank}_s{step}_{i}" for i in range(batch_size)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-loss", type=float, default=None)
    ap.add_argument("--count-in-schedule", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--unit", choices=["batch", "image"], default="batch")
    args = ap.parse_args()

    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = acc.process_index, acc.num_processes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup + 1)))
    model, opt = acc.prepare(model, opt)
    batch_size = 2 + rank                                   # unequal per-rank batch sizes
    miner = build_miner(HardMiningConfig(enabled=True, every=args.every, max_loss=args.max_loss, unit=args.unit,
                                         count_in_schedule=args.count_in_schedule), args.warmup, batch_size)
    assert miner is not None

    def train_step(keys: list[str], epochs: list[int]) -> tuple[float, list[float]]:
        x, y = (torch.stack(v) for v in zip(*(load_sample(k, e) for k, e in zip(keys, epochs))))
        x = x + 0.01 * torch.randn_like(x)     # consumes the RNG, which the checkpoint must restore
        per_sample = torch.nn.functional.mse_loss(model(x), y, reduction="none").mean(dim=1)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        return loss.item(), per_sample.detach().tolist()

    ckpt = args.out / "ckpt" / f"rank{rank}.pt"
    log: list[dict] = []
    start = 1
    if args.resume:
        state = torch.load(ckpt, weights_only=True)
        acc.unwrap_model(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        miner.load_state_dict(state["miner"])
        torch.set_rng_state(state["torch_rng"])
        log, start = state["log"], state["step"] + 1

    for step in range(start, args.steps + 1):
        epoch = (step - 1) // 4
        keys = batch_keys(rank, step, batch_size)
        loss, per_sample = train_step(keys, [epoch] * len(keys))
        sched.step()
        miner.observe(step, keys, epoch, {"loss": loss}, [{"loss": v} for v in per_sample])
        if miner.should_replay(step):
            for _ in range(miner.replays_per_trigger):
                replay = miner.pop()
                before, _ = train_step(replay.keys, replay.key_epochs())
                with torch.no_grad():
                    x, y = (torch.stack(v) for v in zip(*(load_sample(k, e) for k, e in zip(replay.keys, replay.key_epochs()))))
                    after = torch.nn.functional.mse_loss(model(x), y).item()
                if miner.count_in_schedule:
                    sched.step()
                miner.record_replay(before, after)
                log.append({"step": step, "keys": replay.keys, "epoch": replay.epoch, "epochs": replay.key_epochs(),
                            "fallback": replay.fallback, "mined_loss": replay.loss, "before": before, "after": after,
                            "lr": opt.param_groups[0]["lr"]})
        if args.stop_after == step:
            buf = io.BytesIO()
            torch.save({"model": acc.unwrap_model(model).state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "miner": miner.state_dict(),
                        "torch_rng": torch.get_rng_state(), "log": log, "step": step}, buf)
            atomic_write_bytes(ckpt, buf.getvalue())
            acc.wait_for_everyone()
            return 0

    buf = io.BytesIO()
    torch.save(acc.unwrap_model(model).state_dict(), buf)
    atomic_write_bytes(args.out / f"rank{rank}.pt", buf.getvalue())
    atomic_write_json(args.out / f"rank{rank}.json", {"rank": rank, "world": world, "replays": log,
                                                      "stats": miner.stats(), "final_lr": opt.param_groups[0]["lr"]})
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
