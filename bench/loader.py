"""Loader throughput: images/s per worker process for
(a) fashionseg's shard loader (train mode: multi-scale-style resize, flip; jitter shown separately),
(b) the usual peer: torchvision CocoDetection + wrap_dataset_for_transforms_v2 over the same images
    as loose files with a COCO JSON, v2 ToImage/RandomHorizontalFlip/Resize/ToDtype (same resize),
(c) the decode-only limit: JPEG decode + pycocotools RLE decode of every mask, bytes already in memory.
Also the JPEG decoder choice (PIL vs torchvision.io.decode_jpeg).

    .venv/bin/python bench/loader.py [--images 192] [--size 1024] [--min-size 800] [--workers 0]

Data: `shard synth` images (height --size, width the same or 3/4), built into shards without resize.
"Per worker process": with --workers 0 (default) every pipeline runs whole in one process, the
fair comparison with (c). With --workers W > 0, (a) and (b) run W DataLoader worker processes and
their total rate is divided by W; the loader's consuming process then also does a little work
(painting masks, uint8 -> float32, ~2 ms per 0.85-Mpx image) that this figure does not charge to the
workers. Pipelines are timed interleaved (median of --repeats) so that load from other processes
hits all alike; (a) and (b) are timed from their first batch (worker start-up left out). The
last line is `loader_vs_peer=X.XX loader_vs_decode_limit=0.YY`.

`--plan-samples 45623` times only the elastic-resume planning at Fashionpedia's size (no images):
the full-epoch plan, the consumed set after half an epoch, the re-plan of the rest on a smaller
layout, and the size of the position a checkpoint stores.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_data(tmp: Path, images: int, size: int) -> tuple[Path, Path, Path, list]:
    from fashionseg.data.shards.build import BuildConfig, build
    from fashionseg.data.shards.reader import iter_split
    from fashionseg.data.synth import write_dataset

    src = write_dataset(tmp / "src", images, seed=0, size=size, progress=False)
    shards = tmp / "shards"
    code, report = build(BuildConfig(src=str(src), out=str(shards), val_fraction=0.0, samples_per_shard=64, workers=0,
                                     progress=False))
    if code != 0:
        sys.exit(f"shard build failed: {report.get('error')}")
    # the peer's input: the very same stored images as loose files + a COCO JSON
    loose = tmp / "loose"
    loose.mkdir()
    coco = {"images": [], "annotations": [], "categories": []}
    cats = set()
    raw = list(iter_split(shards, "train"))
    for i, (key, jpg, meta) in enumerate(raw):
        (loose / f"{key}.jpg").write_bytes(jpg)
        coco["images"].append({"id": i, "file_name": f"{key}.jpg", "height": meta["height"], "width": meta["width"]})
        for inst in meta["instances"]:
            cats.add(inst["category_id"])
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": inst["category_id"],
                                        "segmentation": inst["segmentation"], "bbox": inst["bbox"], "area": inst["area"],
                                        "iscrowd": 0})
    coco["categories"] = [{"id": c, "name": str(c)} for c in sorted(cats)]
    ann = tmp / "instances.json"
    ann.write_text(json.dumps(coco))
    return shards, loose, ann, raw


def steady(loader) -> tuple[int, float]:
    """(images, seconds) from the first batch to the end of an epoch: worker start-up, paid once
    per epoch by both DataLoaders, is left out (it is noise next to a real 45k-image epoch)."""
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(images) for images, _ in it)
    return n, time.perf_counter() - t0


def plan_costs(samples: int, repeats: int) -> int:
    """`--plan-samples N`: what elastic resume costs at a dataset's size, with no images: the plan
    of a full epoch, the consumed set after half of it, the re-plan of the rest on another layout
    and the size of the layout-free position a checkpoint stores (base64 bitmap)."""
    import base64

    from fashionseg.data.plan import PlanConfig, build_plan, build_pool

    rng = np.random.default_rng(0)
    shards, per = [], 1000
    for si in range(-(-samples // per)):
        n = min(per, samples - si * per)
        shards.append({"name": f"train-{si:06d}.tar", "num_samples": n, "samples": [
            {"key": f"{si}-{i}", "offset": 4096 * i, "width": int(rng.integers(400, 1200)),
             "height": int(rng.integers(400, 1200)), "categories": sorted(set(rng.integers(0, 46, 3).tolist()))}
            for i in range(n)]})
    split = {"shards": shards}
    cfg = PlanConfig(repeat_factor_threshold=0.001)
    pool = build_pool(split)  # the loader builds it once
    a = dict(batch_sizes=[4] * 5 + [2] * 3, workers=4)  # 5x 1080 Ti + 3x smaller, 4 workers each
    b = dict(batch_sizes=[4] * 5, workers=4)  # the 3 smaller cards gone
    times: dict[str, list[float]] = {"plan": [], "consumed_after": [], "re-plan": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        full = build_plan(split, seed=0, epoch=0, cfg=cfg, pool=pool, **a)
        t1 = time.perf_counter()
        mask, _ = full.consumed_after(full.rank_steps[0] // 2)
        t2 = time.perf_counter()
        rest = build_plan(split, seed=0, epoch=0, cfg=cfg, pool=pool, consumed=mask, **b)
        t3 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[k].append(v)
    packed = len(base64.b64encode(np.packbits(mask).tobytes()))
    print(f"{samples} samples, {full.stream_len} stream items/epoch (repeat-factor t=0.001); layout A 8 ranks "
          f"{sum(a['batch_sizes'])}/step, B 5 ranks {sum(b['batch_sizes'])}/step; cut after {full.rank_steps[0] // 2} of "
          f"{full.rank_steps[0]} steps; rest on B: {rest.rank_steps[0]} steps, {rest.duplicates} duplicates")
    for k, v in times.items():
        print(f"{k:<16} {statistics.median(v) * 1000:8.1f} ms (median of {repeats})")
    print(f"position bitmap  {packed} bytes base64 per copy (the state holds two: now and at the plan's start)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--size", type=int, default=1024, help="synthetic image height (default 1024)")
    p.add_argument("--min-size", type=int, default=800, help="train shorter side (default 800)")
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes for (a) and (b) (default 0: in-process)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each pipeline, interleaved (median)")
    p.add_argument("--no-tune-malloc", action="store_true",
                   help="leave glibc's malloc defaults (the loader then does not tune them either)")
    p.add_argument("--plan-samples", type=int, default=None,
                   help="only time the elastic-resume planning for a split of this many samples (no images)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.plan_samples:
        return plan_costs(args.plan_samples, max(1, args.repeats))

    from PIL import Image
    from pycocotools import mask as mask_util
    from torch.utils.data import DataLoader
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    import torchvision.transforms.v2.functional as F

    from fashionseg.data.loader import LoaderConfig, build_loader, tune_malloc
    from fashionseg.data.transforms import output_size

    # the loader tunes malloc in its processes (LoaderConfig.tune_malloc); do it for the whole
    # bench process so that every pipeline, the peer's included, gets the same allocator
    tuned = False if args.no_tune_malloc else tune_malloc()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        print(f"building {args.images} synthetic images of height {args.size} ...", flush=True)
        shards, loose, ann, raw = build_data(tmp, args.images, args.size)
        n = len(raw)
        n_inst = sum(len(m["instances"]) for _, _, m in raw)
        mean_px = np.mean([m["height"] * m["width"] for _, _, m in raw])
        mean_kb = np.mean([len(j) for _, j, _ in raw]) / 1024
        print(f"{n} images, {n_inst / n:.1f} instances/image, {mean_px / 1e6:.2f} Mpx, {mean_kb:.0f} KiB/jpg; "
              f"resize shorter side {args.min_size} (max {args.max_size}); workers {args.workers}; torch threads 1; "
              f"malloc tuned for all pipelines: {tuned}")
        per = max(1, args.workers)

        # JPEG decoder choice
        jpgs = [j for _, j, _ in raw]
        tensors = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]

        def pil():
            for j in jpgs:
                Image.open(io.BytesIO(j)).convert("RGB").load()
            return n

        def tv():
            for t in tensors:
                decode_jpeg(t)
            return n

        def pil_resize():
            for j, (_, _, m) in zip(jpgs, raw):
                oh, ow = output_size(m["height"], m["width"], args.min_size, args.max_size)
                Image.open(io.BytesIO(j)).convert("RGB").resize((ow, oh), Image.BILINEAR)
            return n

        def tv_resize():
            for t, (_, _, m) in zip(tensors, raw):
                oh, ow = output_size(m["height"], m["width"], args.min_size, args.max_size)
                F.resize(decode_jpeg(t), [oh, ow], antialias=True)
            return n

        # (c) decode-only limit: JPEG (the faster decoder) + every mask decoded by pycocotools
        rles = [[{"size": i["segmentation"]["size"], "counts": i["segmentation"]["counts"].encode()} for i in m["instances"]]
                for _, _, m in raw]

        def limit():
            for t, r in zip(tensors, rles):
                decode_jpeg(t)
                if r:
                    mask_util.decode(r)
            return n

        # (a) this loader
        def loader_pass(jitter: float):
            cfg = LoaderConfig(workers=args.workers, min_size=[args.min_size], max_size=args.max_size,
                               hflip=0.5, color_jitter=jitter, group_aspect_ratio=True, tune_malloc=tuned)
            ld = build_loader(cfg, shards, "train", rank=0, world_size=1, batch_sizes=[2], seed=0)
            return lambda: steady(ld)

        # (b) the peer
        tf = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(0.5), v2.Resize(args.min_size, max_size=args.max_size),
                         v2.ToDtype(torch.float32, scale=True)])
        ds = wrap_dataset_for_transforms_v2(CocoDetection(str(loose), str(ann), transforms=tf),
                                            target_keys={"boxes", "labels", "masks", "image_id"})
        peer = DataLoader(ds, batch_size=2, num_workers=args.workers, collate_fn=lambda b: tuple(zip(*b)), shuffle=True)

        pipelines = {"pil": pil, "tv": tv, "pil_resize": pil_resize, "tv_resize": tv_resize, "limit": limit,
                     "loader": loader_pass(0.0), "loader_jitter": loader_pass(0.4), "peer": lambda: steady(peer)}
        times: dict[str, list[float]] = {k: [] for k in pipelines}
        for rep in range(args.repeats + 1):  # interleaved, so that load from other processes hits all alike
            for name, fn in pipelines.items():
                t0 = time.perf_counter()
                out = fn()
                count, seconds = out if isinstance(out, tuple) else (out, time.perf_counter() - t0)
                if rep:  # the first round warms up
                    times[name].append(count / seconds)
        r = {k: statistics.median(v) for k, v in times.items()}
        for k in ("loader", "loader_jitter", "peer"):
            r[k] /= per
        r_pil, r_tv, r_pil_rs, r_tv_rs, r_limit, r_loader, r_loader_jit, r_peer = (r[k] for k in pipelines)

        rows = [("JPEG decode: PIL", r_pil), ("JPEG decode: torchvision.io.decode_jpeg", r_tv),
                ("JPEG decode + resize: PIL", r_pil_rs), ("JPEG decode + resize: torchvision", r_tv_rs),
                ("(c) decode-only limit (JPEG + RLE decode)", r_limit),
                ("(a) fashionseg loader (resize, flip)", r_loader),
                ("(a') fashionseg loader (resize, flip, jitter 0.4)", r_loader_jit),
                ("(b) CocoDetection + transforms v2 (resize, flip)", r_peer)]
        for name, r in rows:
            print(f"{name:<52} {r:8.1f} images/s per process")
        print(f"loader_vs_peer={r_loader / r_peer:.2f} loader_vs_decode_limit={r_loader / r_limit:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
