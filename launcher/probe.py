"""Step time and peak memory of the training model at a few batch sizes, on one host.

`launcher calibrate` runs `python -m launcher.probe ARGS_JSON` on every host (like doctor's probe)
and reads one JSON line after MARKER. For each distinct GPU model among the visible devices (the
host's CUDA_VISIBLE_DEVICES) it builds the model of the run's config (fashionseg.model.build),
trains a few steps on synthetic images at the config's training size with a few boxes and
masks each, and records the median step time and the peak memory per batch size. Batch sizes
that run out of memory are recorded as such and end that device's sweep. Without a GPU it
measures the CPU (one entry, device "cpu"), which is how the tests run it.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

MARKER = "FASHIONSEG_PROBE "


def synthetic_batch(batch: int, hw: tuple[int, int], num_classes: int, num_attributes: int, device, gen):
    """`batch` images [3,H,W] (float 0..1, which the model takes as well as uint8) with 3 boxes each
    (masks fill the boxes), like the loader's output."""
    import torch

    h, w = hw
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=gen).to(device))
        xy = torch.rand(3, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(3, 2, generator=gen) * 0.3 + 0.1) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(3, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, num_classes, (3,), generator=gen).to(device),
                        "masks": masks.to(device),
                        "attributes": (torch.rand(3, num_attributes, generator=gen) < 0.05).float().to(device)})
    return images, targets


def measure(model, optimizer, batch: int, hw, num_classes: int, num_attributes: int, device, *,
            steps: int, warmup: int) -> dict[str, Any]:
    """Median seconds per optimizer step and peak memory (bytes, CUDA only) at one batch size."""
    import torch

    gen = torch.Generator().manual_seed(batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(warmup + steps):
            images, targets = synthetic_batch(batch, hw, num_classes, num_attributes, device, gen)
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        return {"batch": batch, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return {"batch": batch, "step_time": statistics.median(times), "peak_memory": peak, "oom": False}


def probe(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from fashionseg.model.build import build_model
    from fashionseg.train import config as config_lib

    cfg = config_lib.load(args["config"], args.get("overrides", []))
    hw = (max(cfg.data.min_size), cfg.data.max_size)
    torch.manual_seed(0)
    if torch.cuda.is_available():
        groups: dict[str, list[int]] = {}
        for i in range(torch.cuda.device_count()):
            groups.setdefault(torch.cuda.get_device_name(i), []).append(i)
        targets = [(name, ids, torch.device("cuda", ids[0]), torch.cuda.get_device_properties(ids[0]).total_memory)
                   for name, ids in groups.items()]
    else:
        targets = [("cpu", [0], torch.device("cpu"), None)]
    out = []
    for name, ids, device, total in targets:
        model = build_model(cfg.model, args["num_classes"], args["num_attributes"]).to(device).train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        points = []
        for b in args["batch_sizes"]:
            points.append(measure(model, optimizer, b, hw, args["num_classes"], args["num_attributes"], device,
                                  steps=args["steps"], warmup=args["warmup"]))
            if points[-1]["oom"]:
                break
        out.append({"name": name, "local_ids": ids, "total_memory": total, "points": points})
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"image_size": list(hw), "train_batch_size": cfg.train.batch_size, "torch": torch.__version__, "devices": out}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = {"batch_sizes": [1, 2, 4], "steps": 3, "warmup": 1, "num_classes": 47, "num_attributes": 294,
            "overrides": [], **json.loads(argv[0])}
    print(MARKER + json.dumps(probe(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
