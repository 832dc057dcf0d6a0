"""One optimizer step of the real step code (step.Stepper with the DDP backend, the real batch-size
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
from fashionseg.train.backend import build_backend
from fashionseg.train.distributed import Layout, build_accelerator, resolve_precision
from fashionseg.train.step import Stepper

ROOT = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    """Linear regression whose loss is the mean over the rank's samples (as each Mask R-CNN term
    is a mean over its own batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, images, targets):
        x = torch.stack(images)
        y = torch.stack([t["y"] for t in targets]).to(x.device)
        return {"loss_mse": ((self.lin(x).squeeze(1) - y) ** 2).mean()}


def main() -> int:
    out = Path(sys.argv[1])
    cfg = config_lib.load(ROOT / "configs" / "debug.yaml", ["train.clip_grad_norm=null", *sys.argv[2:]])
    acc = build_accelerator(cfg.train, [], str(out), resolve_precision("fp32"))
    layout = Layout.build(cfg.train, acc)
    torch.manual_seed(0)
    tiny = Tiny()
    model, opt = acc.prepare(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1))
    stepper = Stepper(model, build_backend(acc, model, opt, cfg.train), acc.device,
                      layout.loss_weight, layout.world, lambda: False)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(4, 3, generator=g), torch.randn(4, generator=g) * 3
    start = sum(layout.batch_sizes[: layout.rank])
    mine = range(start, start + layout.local_batch)
    batch = ([xs[i] for i in mine], [{"y": ys[i], "key": str(i)} for i in mine])
    out_step = stepper(iter([batch]), 1)
    assert not out_step.skipped and out_step.images == 4
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in acc.unwrap_model(model).state_dict().items()}, out / "weights.pt")
        (out / "info.json").write_text(json.dumps({"batch_sizes": layout.batch_sizes, "loss": out_step.losses["loss"]}))
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
