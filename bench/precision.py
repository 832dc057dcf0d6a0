"""Training images/s and peak memory of Mask R-CNN + attribute head per precision.

The GPU figure issue 5 asks for (R50-FPN at 1024 px, fp16 vs fp32) comes from this script on a
GPU box; on a CPU it runs fp32 (and bf16 autocast, where the CPU has it) at a small size so the
script itself stays tested. Batches are synthetic (random images with a few box-shaped
instances), identical for every precision, so only the arithmetic differs.

    python bench/precision.py --device cuda --backbone resnet50_fpn --size 1024 --batch 2 \
        --precisions fp32 fp16 bf16 --steps 20
    python bench/precision.py --device cpu --backbone mobilenet_v3_large_fpn --size 256 --steps 3
"""
from __future__ import annotations

import argparse
import time

import torch

from fashionseg.model.build import ModelConfig, build_model

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def batch(n: int, size: int, num_attributes: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        k = 4
        xy = torch.randint(0, size // 2, (k, 2), generator=g).float()
        wh = torch.randint(size // 8, size // 2, (k, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        attrs = (torch.rand(k, num_attributes, generator=g) < 0.02).float()
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 47, (k,), generator=g).to(device),
                        "masks": masks.to(device), "attributes": attrs.to(device)})
    return images, targets


def measure(args, precision: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, min_size=args.size, max_size=args.size)
    model = build_model(cfg, 47, 294).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images, targets = batch(args.batch, args.size, 294, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"precision": precision, "step_s": step, "images_per_sec": args.batch / step, "peak_mem_mb": mem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="resnet50_fpn")
    ap.add_argument("--size", type=int, default=1024, help="images are size x size, model min/max size = size")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=None, choices=sorted(DTYPES))
    args = ap.parse_args()
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}), torch {torch.__version__}")
    print(f"{args.backbone} at {args.size} px, batch {args.batch}, median of {args.steps} steps")
    print(f"{'precision':>9} {'step s':>8} {'images/s':>9} {'peak MiB':>9}")
    for p in precisions:
        r = measure(args, p, device)
        print(f"{r['precision']:>9} {r['step_s']:8.3f} {r['images_per_sec']:9.2f} {r['peak_mem_mb']:9.0f}")


if __name__ == "__main__":
    main()
