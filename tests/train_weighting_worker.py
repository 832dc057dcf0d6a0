"""One optimizer step of the real loop code (Trainer._micro / _optimizer_step, the real batch-size
exchange and loss weights) on a tiny deterministic model, so the update can be compared exactly
between ranks with batch sizes {1, 3} and one process with all 4 samples.

    accelerate launch --multi_gpu --num_processes 2 ... tests/train_weighting_worker.py OUT train.batch_sizes=[1,3]
    python tests/train_weighting_worker.py OUT train.batch_size=4
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fashionseg.train import config as config_lib
from fashionseg.train.distributed import build_accelerator, gather_ints, local_batch_size, loss_weight, resolve_precision
from fashionseg.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    """Linear regression whose loss is the mean over the rank's samples (as each Mask R-CNN term
    is a mean over its own batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, images, targets):
        x = torch.stack(images)
        y = torch.stack([t["y"] for t in targets])
        return {"loss_mse": ((self.lin(x).squeeze(1) - y) ** 2).mean()}


def main() -> int:
    out = Path(sys.argv[1])
    cfg = config_lib.load(ROOT / "configs" / "debug.yaml", ["train.clip_grad_norm=null", *sys.argv[2:]])
    acc = build_accelerator(cfg.train, [], str(out), resolve_precision("fp32"))
    t = Trainer.__new__(Trainer)
    t.tcfg, t.accelerator, t.miner, t.stop_signal = cfg.train, acc, None, None
    t.rank, t.world, t.device = acc.process_index, acc.num_processes, acc.device
    t.local_batch = local_batch_size(cfg.train, t.rank, t.world, acc.local_process_index)
    t.batch_sizes = gather_ints(t.local_batch, t.world)
    t.weight = loss_weight(t.batch_sizes, t.rank)
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t.model, t.optimizer = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(4, 3, generator=g), torch.randn(4, generator=g) * 3
    start = sum(t.batch_sizes[: t.rank])
    mine = range(start, start + t.local_batch)
    images, targets = [xs[i] for i in mine], [{"y": ys[i]} for i in mine]
    with acc.accumulate(t.model):
        losses, nonfinite, _, _ = t._micro(images, targets, poison=False)
        t._optimizer_step()
    assert not nonfinite
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in acc.unwrap_model(t.model).state_dict().items()}, out / "weights.pt")
        (out / "info.json").write_text(json.dumps({"batch_sizes": t.batch_sizes, "loss": losses["loss"]}))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
