"""Inference images/s with BatchNorm folded into the convolutions vs unfolded, in one run.

The unfolded arm is what `load_model(fold=False)` gives (BatchNorm2d in eval mode: a model is
rebuilt without pretrained weights, so its norm layers are BatchNorm2d); the folded arm is the
same weights after `fold_batchnorm` (what eval/predict get by default). Random weights, random
uint8 images of --height x --width (the model does not resize: that is the data layer's job),
score_thresh 0 so every image carries --dets detections through the mask and attribute heads.
Measured for the whole model and for the backbone alone (body + FPN, where the BatchNorm
layers are; the RoI heads of R18/R50-FPN have none). Arms alternate --repeats times (order flipped each time), --images images each; the figure per
arm is mean +- std of the per-repeat images/s, per wall second and (on CPU) per CPU second of
this process (steadier on a shared machine: it counts the work, not the waiting).

    OMP_NUM_THREADS=2 python bench/fold.py                            # CPU, R50 and R18, 512x384
    python bench/fold.py --device cuda --images 100 --batch-size 4 --height 800 --width 1088
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fashionseg.model.build import ModelConfig, build_model
from fashionseg.model.fold import fold_batchnorm


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def images_per_second(run, n: int, batch: int, device: torch.device) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of `run()` on `batch` images."""
    sync(device)
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    while done < n:
        run()
        done += batch
    sync(device)
    return done / (time.perf_counter() - t0), done / (time.process_time() - c0)


def bench(backbone: str, args, device: torch.device) -> None:
    cfg = ModelConfig(backbone=backbone, score_thresh=0.0, detections_per_img=args.dets)
    torch.manual_seed(0)
    unfolded = build_model(cfg, 47, 294).eval()
    with torch.no_grad():  # non-trivial statistics, as after training
        for m in unfolded.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    folded = copy.deepcopy(unfolded)
    count = fold_batchnorm(folded)
    models = {"unfolded": unfolded.to(device), "folded": folded.to(device)}
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, args.height, args.width), dtype=torch.uint8, generator=g).to(device)
              for _ in range(args.batch_size)]
    with torch.no_grad():
        tensors = unfolded.transform(images)[0].tensors
    # the whole model, and the backbone alone (body + FPN: where the BatchNorm layers are)
    runs = {(part, arm): (lambda m=m: m(images)) if part == "model" else (lambda m=m: m.backbone(tensors))
            for part in ("model", "backbone") for arm, m in models.items()}
    for run in runs.values():
        images_per_second(run, args.warmup, len(images), device)
    rates = {key: {"wall": [], "CPU": []} for key in runs}
    for r in range(args.repeats):
        for part in ("model", "backbone"):
            for arm in (("unfolded", "folded") if r % 2 == 0 else ("folded", "unfolded")):
                wall, cpu = images_per_second(runs[part, arm], args.images, len(images), device)
                rates[part, arm]["wall"].append(wall)
                rates[part, arm]["CPU"].append(cpu)
    print(f"{backbone}: {count} BatchNorm layers folded")
    for part in ("model", "backbone"):
        for clock in ("wall", "CPU") if device.type == "cpu" else ("wall",):
            for arm in models:
                v = rates[part, arm][clock]
                print(f"  {part:8s} {clock:4s} {arm:9s} {statistics.mean(v):7.2f} +- {statistics.stdev(v):5.2f} "
                      f"images/{clock} s  ({', '.join(f'{x:.2f}' for x in v)})")
            speedup = [f / u for f, u in zip(rates[part, "folded"][clock], rates[part, "unfolded"][clock])]
            print(f"  {part:8s} {clock:4s} folded/unfolded = {statistics.mean(speedup):.3f} +- {statistics.stdev(speedup):.3f} "
                  "(per-repeat ratios)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50_fpn", "resnet18_fpn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, default=4, help="images per arm per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dets", type=int, default=100)
    args = p.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# inference, {where}: {args.height}x{args.width} uint8 images, batch {args.batch_size}, {args.dets} detections "
          f"per image, {args.repeats} x {args.images} images per arm, interleaved")
    for backbone in args.backbones:
        bench(backbone, args, device)


if __name__ == "__main__":
    main()
