"""The peer: images/s and peak memory of our Mask R-CNN + attribute head in a bare
torchvision-reference-style training loop, per precision and memory format.

The loop is references/detection/engine.py `train_one_epoch` (autocast + GradScaler for fp16,
autocast alone for bf16, `.item()` of the loss every step, zero_grad/backward/step), without its
logging. Data comes either from synthetic batches held on the device (`--data synthetic`: the
arithmetic alone) or, as the reference reads it, from loose JPEGs plus a COCO JSON through
torchvision `CocoDetection` + `wrap_dataset_for_transforms_v2` and a DataLoader with workers
(`--data coco --coco DIR`, DIR as written by bench/gpu_data.py `peer_coco`). bench/gpu_suite.sh
compares our trainer with this loop (`trainer_vs_peer`).

    python bench/precision.py --device cuda --backbone resnet50_fpn --size 1024 --batch 4 \
        --precisions fp32 fp16 bf16 --channels-last both --steps 20
    python bench/precision.py --device cpu --backbone mobilenet_v3_large_fpn --size 256 --steps 3
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fashionseg.model.build import ModelConfig, build_model  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_config(config: str | None = None, overrides: list[str] = (), **fields) -> ModelConfig:
    """The model section of a run config (so the peer runs the trainer's model), or ModelConfig
    defaults; `fields` that this ModelConfig does not have are ignored (they move between versions)."""
    if config is not None:
        from fashionseg.train import config as config_lib

        cfg = config_lib.load(config, [o for o in overrides if o.startswith("model.")]).model
    else:
        cfg = ModelConfig()
    names = {f.name for f in dataclasses.fields(cfg)}
    # the data layer resizes: the model must not resize training images a second time
    fields = {"resize_in_train": False, **fields}
    return dataclasses.replace(cfg, **{k: v for k, v in fields.items() if k in names})


def batch(n: int, size: int, num_attributes: int, device: torch.device, seed: int = 0, num_classes: int = 47):
    """`n` random images of size x size with four box-shaped instances each (float 0..1)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g).to(device))
        k = 4
        xy = torch.randint(0, size // 2, (k, 2), generator=g).float()
        wh = torch.randint(max(1, size // 8), max(2, size // 2), (k, 2), generator=g).float()
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        attrs = (torch.rand(k, num_attributes, generator=g) < 0.02).float()
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, num_classes, (k,), generator=g).to(device),
                        "masks": masks.to(device), "attributes": attrs.to(device)})
    return images, targets


def coco_loader(coco_dir: Path, batch_size: int, workers: int, min_size: int, max_size: int, seed: int = 0):
    """The reference's input pipeline over DIR/images + DIR/instances.json (category ids are the
    model's labels 1..C, `attribute_ids` indices 0..A-1): (DataLoader, num_classes, num_attributes)."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    ann = coco_dir / "instances.json"
    info = json.loads(ann.read_text())
    num_classes, num_attributes = len(info["categories"]) + 1, len(info["attributes"])
    resize = v2.Resize(size=None, max_size=max_size) if min_size >= max_size else v2.Resize(min_size, max_size=max_size)
    tf = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), resize, v2.ToDtype(torch.float32, scale=True)])
    base = CocoDetection(str(coco_dir / "images"), str(ann), transforms=tf)
    wrapped = wrap_dataset_for_transforms_v2(base, target_keys={"boxes", "labels", "masks", "image_id"})
    attrs = []
    for image_id in base.ids:  # the dataset's order; annotations in the order CocoDetection loads them
        anns = base.coco.loadAnns(base.coco.getAnnIds(image_id))
        a = torch.zeros(len(anns), num_attributes)
        for j, x in enumerate(anns):
            a[j, list(x.get("attribute_ids", []))] = 1.0
        attrs.append(a)

    class WithAttributes(Dataset):
        def __len__(self):
            return len(wrapped)

        def __getitem__(self, i):
            image, target = wrapped[i]  # plain tensors out: tv_tensors subclasses cost dispatch in the model
            return image.as_subclass(torch.Tensor), {"boxes": target["boxes"].as_subclass(torch.Tensor).float(), "labels": target["labels"],
                           "masks": target["masks"].as_subclass(torch.Tensor), "attributes": attrs[i]}

    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(WithAttributes(), batch_size=batch_size, shuffle=True, num_workers=workers, generator=g,
                        collate_fn=lambda b: tuple(zip(*b)), drop_last=True, persistent_workers=workers > 0)
    return loader, num_classes, num_attributes


def endless(loader):
    while True:
        yield from loader


def measure(model_cfg: ModelConfig, precision: str, device: torch.device, *, steps: int, warmup: int,
            channels_last: bool = False, batch_size: int = 2, size: int = 512, coco: Path | None = None,
            workers: int = 0, lr: float = 1e-3, seed: int = 0) -> dict:
    """images/s, peak memory and data-wait share of the reference loop (one precision, one format)."""
    torch.manual_seed(seed)
    if coco is not None:
        loader, num_classes, num_attributes = coco_loader(coco, batch_size, workers, size, size, seed)
        source = endless(loader)
    else:
        num_classes, num_attributes = 47, 294
        fixed = batch(batch_size, size, num_attributes, device, seed, num_classes)
        source = itertools.repeat(fixed)
    model = build_model(model_cfg, num_classes, num_attributes).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)
    dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    data_s, skipped, t0 = 0.0, 0, time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            data_s, t0 = 0.0, time.perf_counter()
        d0 = time.perf_counter()
        images, targets = next(source)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        data_s += time.perf_counter() - d0
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_dict = model(images, targets)
            losses = sum(loss for loss in loss_dict.values())
        loss_value = losses.item()
        if not torch.isfinite(torch.tensor(loss_value)):
            skipped += 1  # the reference exits here; the peer keeps timing (a skipped step does less work)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(losses).backward()
            scaler.step(opt)
            scaler.update()
        else:
            losses.backward()
            opt.step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return {"precision": precision, "channels_last": channels_last, "step_s": seconds / steps,
            "images_per_sec": steps * batch_size / seconds, "peak_mem_mb": mem, "data_wait_frac": data_s / seconds,
            "nonfinite_steps": skipped, "data": "coco" if coco is not None else "synthetic", "workers": workers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default=None, help="take the model section of this run config (default: ModelConfig())")
    ap.add_argument("--backbone", default=None, help="default: the config's, else resnet50_fpn")
    ap.add_argument("--size", type=int, default=1024, help="image side (synthetic) / resize target (coco)")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=None, choices=sorted(DTYPES))
    ap.add_argument("--channels-last", choices=["off", "on", "both"], default="off")
    ap.add_argument("--data", choices=["synthetic", "coco"], default="synthetic")
    ap.add_argument("--coco", type=Path, default=None, help="folder with images/ and instances.json (--data coco)")
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers (--data coco; the reference's -j 4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("overrides", nargs="*", help="model.key=value overrides of --config")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.data == "coco" and args.coco is None:
        ap.error("--data coco needs --coco DIR")
    fields = {"backbone": args.backbone} if args.backbone else ({} if args.config else {"backbone": "resnet50_fpn"})
    cfg = model_config(args.config, args.overrides, **fields)
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32"])
    formats = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        print(f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}), torch {torch.__version__}")
    print(f"{cfg.backbone} at {args.size} px, batch {args.batch}, {args.steps} timed steps, data {args.data}")
    print(f"{'precision':>9} {'chl':>4} {'step s':>8} {'images/s':>9} {'peak MiB':>9} {'data wait':>9}")
    rows = []
    for p, cl in itertools.product(precisions, formats):
        r = measure(cfg, p, device, steps=args.steps, warmup=args.warmup, channels_last=cl, batch_size=args.batch,
                    size=args.size, coco=args.coco if args.data == "coco" else None, workers=args.workers, lr=args.lr)
        rows.append(r)
        mem = f"{r['peak_mem_mb']:9.0f}" if r["peak_mem_mb"] is not None else f"{'-':>9}"
        print(f"{p:>9} {'on' if cl else 'off':>4} {r['step_s']:8.3f} {r['images_per_sec']:9.2f} {mem} "
              f"{r['data_wait_frac']:9.1%}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
