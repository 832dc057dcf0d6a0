"""Do we train as well as the plain torchvision reference pipeline? Same images, model, steps, seeds.

    python bench/accuracy_vs_peer.py                      # defaults: ~7 min on 2 idle cores
    python bench/accuracy_vs_peer.py --seeds 0 1 2 3 4 --steps 200 --images 192
    python bench/accuracy_vs_peer.py --skip-peer --set data.copy_paste=0.5   # A/B of our own features

Data: `shard synth` writes one synthetic Kaggle-layout set; `shard build` splits it (val 25%).
Both arms use exactly that split (the peer's COCO JSONs are written from the shards' manifest).
- ours: `fashionseg train --config configs/debug.yaml` on the shards (our loader: decode, one
  resize in the data layer, masks in the RLE domain; our trainer), then `fashionseg eval` on val.
- peer: the same JPEGs as loose files + COCO JSON (RLE masks) through
  `torchvision.datasets.CocoDetection` + `wrap_dataset_for_transforms_v2`, flip augmentation, a
  plain torchvision `MaskRCNN` with the same backbone, anchors, sampling and head sizes (read from
  the same config), the model's own resize (min_size = the config's data.min_size), and
  torchvision's reference `train_one_epoch` (SGD, linear warmup from 1/1000, the config's lr,
  momentum, weight decay, milestones and gradient clipping), scored with pycocotools on the same
  val images at their original size.
The peer has no attribute head (torchvision has none); ours trains one alongside, and its quality
is printed for our arm: Fashionpedia's AP^F1 (attribute F1 >= thresholds, mask IoU ignored) and
AP^{IoU+F1}, both from `fashionseg eval` on the official 18 attribute categories.
Per seed both arms get the same number of optimizer steps and batch size. Prints box/mask AP
(x100) mean +- std over seeds per arm, and last `fashionseg_vs_peer_maskAP=<ratio of means>`.
`--set KEY=VALUE ...` (dotted config overrides, checked before anything runs) reach our arm only;
`--skip-peer` runs our arm alone (no ratio line). Our runs are kept in --work, one folder per
overrides and seed, and reused when their resolved config is the one asked for, so an A/B's
baseline arm is not trained twice.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, log: Path) -> None:
    """Run a project command (the installed entry points' modules), output to `log`."""
    with open(log, "a") as f:
        code = subprocess.call([sys.executable, "-c", "import sys; from fashionseg.cli import main, shard_main; "
                                "sys.exit((shard_main if sys.argv[1] == 'shard' else main)(sys.argv[2:]))", *args],
                               stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {code}); see {log}")


# -- data -------------------------------------------------------------------------------------------
def prepare(work: Path, images: int, size: int) -> tuple[Path, Path]:
    """(shard folder, synth folder): one synthetic set, split once by `shard build`."""
    synth, shards, stamp = work / "synth", work / "shards", work / "data.json"
    want = {"images": images, "size": size}
    if (shards / "manifest.json").exists():
        if stamp.exists() and json.loads(stamp.read_text()) != want:
            raise SystemExit(f"{work} holds the data of {stamp.read_text()}, not {want}: pass another --work")
        return shards, synth
    cli("shard", "synth", "--images", str(images), "--size", str(size), "--seed", "0", str(synth), log=work / "data.log")
    cli("shard", "build", str(synth), str(shards), "--val-fraction", "0.25", "--workers", "1", "--no-progress",
        log=work / "data.log")
    stamp.write_text(json.dumps(want))
    return shards, synth


def write_coco(work: Path, synth: Path, shards: Path) -> dict[str, Path]:
    """COCO JSONs (RLE masks, category id = Kaggle ClassId + 1) for the shards' train/val keys."""
    from pycocotools import mask as mask_utils

    from fashionseg.data.rle import kaggle_to_coco

    manifest = json.loads((shards / "manifest.json").read_text())
    split_of = {s["key"]: split for split, info in manifest["splits"].items() for shard in info["shards"] for s in shard["samples"]}
    labels = json.loads((synth / "label_descriptions.json").read_text())
    categories = [{"id": c["id"] + 1, "name": c["name"]} for c in labels["categories"]]
    out = {split: {"images": [], "annotations": [], "categories": categories} for split in ("train", "val")}
    ids: dict[str, int] = {}
    with open(synth / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            split = split_of.get(row["ImageId"])
            if split is None:
                continue
            h, w = int(row["Height"]), int(row["Width"])
            if row["ImageId"] not in ids:
                ids[row["ImageId"]] = len(ids) + 1
                out[split]["images"].append({"id": ids[row["ImageId"]], "file_name": row["ImageId"] + ".jpg", "height": h, "width": w})
            rle, _ = kaggle_to_coco(row["EncodedPixels"], h, w)
            binary = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
            x, y, bw, bh = mask_utils.toBbox(binary).tolist()
            out[split]["annotations"].append({"id": len(out["train"]["annotations"]) + len(out["val"]["annotations"]) + 1,
                                              "image_id": ids[row["ImageId"]], "category_id": int(row["ClassId"]) + 1,
                                              "segmentation": rle, "area": float(mask_utils.area(binary)), "bbox": [x, y, bw, bh], "iscrowd": 0})
    paths = {}
    for split, data in out.items():
        paths[split] = work / f"coco_{split}.json"
        paths[split].write_text(json.dumps(data))
    return paths


# -- our arm ----------------------------------------------------------------------------------------
def run_name(sets: list[str], seed: int) -> str:
    tag = "".join(f"_{s}" for s in sets)
    return "ours" + "".join(c if c.isalnum() or c in "._-=" else "-" for c in tag) + f"_seed{seed}"


def trained_as(run: Path, args, overrides: list[str]) -> bool:
    """The run folder holds a finished run of exactly this resolved config."""
    from fashionseg.train.config import from_dict, load

    if not (run / "model_final.pth").exists() or not (run / "config.yaml").exists():
        return False
    quiet = logging.getLogger("fashionseg.train.config")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # the resolved config sets disabled components' keys
    try:
        saved = from_dict(yaml.safe_load((run / "config.yaml").read_text()))  # fills keys added since
    finally:
        quiet.setLevel(level)
    return dataclasses.asdict(saved) == dataclasses.asdict(load(args.config, overrides))


def ours(work: Path, shards: Path, args, seed: int) -> dict[str, float]:
    run = work / run_name(args.set, seed)
    log = work / f"{run.name}.log"
    overrides = [*args.set, f"train.seed={seed}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                 "eval.at_end=false", f"data.shards={shards}"]
    if not trained_as(run, args, overrides):
        if run.exists():
            shutil.rmtree(run)
        cli("fashionseg", "train", "--config", args.config, "--out", str(run), *overrides, log=log)
    cli("fashionseg", "eval", "--weights", str(run / "model_final.pth"), "--shards", str(shards), "--split", "val",
        "--out", str(run / "eval_val.json"), "--device", "cpu", "--no-progress", log=log)
    metrics = json.loads((run / "eval_val.json").read_text())
    attr = {k: 100 * metrics[k]["AP"] if k in metrics else float("nan") for k in ("f1_only", "iou_f1")}  # nan: no attributes
    return {"box": 100 * metrics["bbox"]["AP"], "mask": 100 * metrics["segm"]["AP"], "attr": attr["f1_only"],
            "iou_f1": attr["iou_f1"]}


# -- the peer: torchvision's reference pipeline ------------------------------------------------------
def peer_model(cfg: dict, num_classes: int):
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    m, d = cfg["model"], cfg["data"]
    arch = m["backbone"].split("_")[0]
    if not arch.startswith("resnet") or m["backbone"].endswith("_v2"):
        raise SystemExit(f"the peer covers the v1 ResNet-FPN backbones, not {m['backbone']}")
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)
    sizes = tuple((s,) for s in m.get("anchor_sizes", (32, 64, 128, 256, 512)))
    ratios = (tuple(m.get("aspect_ratios", (0.5, 1.0, 2.0))),) * len(sizes)
    hidden = m.get("mask_head_hidden", 256)
    return MaskRCNN(
        backbone, min_size=max(d["min_size"]), max_size=d["max_size"], box_predictor=FastRCNNPredictor(1024, num_classes),
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        rpn_pre_nms_top_n_train=m["rpn_pre_nms_top_n_train"], rpn_post_nms_top_n_train=m["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=m["rpn_pre_nms_top_n_test"], rpn_post_nms_top_n_test=m["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=m["rpn_batch_size_per_image"], box_batch_size_per_image=m["box_batch_size_per_image"],
        box_detections_per_img=m.get("detections_per_img", 100),
        mask_head=MaskRCNNHeads(backbone.out_channels, [hidden] * 4, 1), mask_predictor=MaskRCNNPredictor(hidden, hidden, num_classes),
    )


def coco_dataset(images: Path, ann: Path, train: bool):
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
    from torchvision.transforms import v2

    steps = [v2.ToImage()] + ([v2.RandomHorizontalFlip(0.5)] if train else []) + [v2.ToDtype(torch.float32, scale=True)]
    ds = CocoDetection(str(images), str(ann), transforms=v2.Compose(steps))
    return wrap_dataset_for_transforms_v2(ds, target_keys=("image_id", "boxes", "labels", "masks"))


def train_one_epoch(model, optimizer, loader, lr_scheduler, steps_left: int, clip: float | None) -> int:
    """torchvision references/detection/engine.py's loop (no AMP, no logger), cut at steps_left."""
    model.train()
    done = 0
    for images, targets in loader:
        loss_dict = model(list(images), [{k: v for k, v in t.items() if k != "image_id"} for t in targets])
        losses = sum(loss_dict.values())
        if not math.isfinite(losses.item()):
            raise SystemExit(f"peer: loss is {losses.item()}, stopping training ({loss_dict})")
        optimizer.zero_grad()
        losses.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        lr_scheduler.step()
        done += 1
        if done == steps_left:
            break
    return done


@torch.no_grad()
def peer_eval(model, ds, ann: Path) -> dict[str, float]:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    results = []
    for image, target in ds:
        (out,) = model([image])
        image_id = int(target["image_id"])
        boxes = out["boxes"].tolist()
        masks = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for box, score, label, m in zip(boxes, out["scores"].tolist(), out["labels"].tolist(), masks):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": int(label), "score": float(score), "segmentation": rle,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    gt = COCO(str(ann))
    ap = {}
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        if not results:
            ap[name] = 0.0
            continue
        e = COCOeval(gt, gt.loadRes(results), kind)
        e.evaluate()
        e.accumulate()
        e.summarize()
        ap[name] = 100 * max(0.0, float(e.stats[0]))
    return ap


def peer(work: Path, synth: Path, coco: dict[str, Path], cfg: dict, args, seed: int) -> dict[str, float]:
    t = cfg["train"]
    torch.manual_seed(seed)
    train_ds = coco_dataset(synth / "train", coco["train"], train=True)
    num_classes = 1 + max(c["id"] for c in json.loads(coco["train"].read_text())["categories"])
    model = peer_model(cfg, num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=t["lr"], momentum=t.get("momentum", 0.9), weight_decay=t.get("weight_decay", 1e-4))
    warmup = t.get("warmup_iters") or min(1000, args.steps - 1)
    milestones = [round(f * args.steps) for f in t.get("milestones", [])]

    def lr_factor(step: int) -> float:  # the reference's LinearLR warmup, then MultiStepLR
        warm = 1e-3 + (1 - 1e-3) * min(step, warmup) / warmup if step < warmup else 1.0
        return warm * 0.1 ** sum(step >= m for m in milestones)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch, shuffle=True, generator=g, num_workers=0,
                                         collate_fn=lambda b: tuple(zip(*b)), drop_last=True)
    done = 0
    while done < args.steps:
        done += train_one_epoch(model, optimizer, loader, scheduler, args.steps - done, t.get("clip_grad_norm"))
    return peer_eval(model, coco_dataset(synth / "train", coco["val"], train=False), coco["val"])


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:5.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/fashionseg_accuracy_vs_peer")
    p.add_argument("--config", default=str(ROOT / "configs" / "debug.yaml"))
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--size", type=int, default=96, help="synthetic image height (px)")
    p.add_argument("--steps", type=int, default=120)  # 60 left both arms at chance
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides for our arm only (e.g. data.copy_paste=0.5); repeatable")
    p.add_argument("--skip-peer", action="store_true", help="run our arm only (A/Bs of our own features)")
    args = p.parse_args()
    from fashionseg.train.config import ConfigError, load

    try:
        load(args.config, args.set)
    except ConfigError as e:
        raise SystemExit(f"--set: {e}") from None
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(args.config).read_text())
    t0 = time.perf_counter()
    shards, synth = prepare(work, args.images, args.size)
    coco = write_coco(work, synth, shards)
    rows: dict[str, list] = {"ours": []} if args.skip_peer else {"ours": [], "peer": []}
    for seed in args.seeds:
        rows["ours"].append(ours(work, shards, args, seed))
        o = rows["ours"][-1]
        line = f"seed {seed}: ours box {o['box']:.2f} mask {o['mask']:.2f} (attributes: AP^F1 {o['attr']:.2f} AP^IoU+F1 {o['iou_f1']:.2f})"
        if not args.skip_peer:
            rows["peer"].append(peer(work, synth, coco, cfg, args, seed))
            line += f" | peer box {rows['peer'][-1]['box']:.2f} mask {rows['peer'][-1]['mask']:.2f}"
        print(line, flush=True)
    print(f"# {Path(args.config).name}{''.join(' ' + s for s in args.set)}, {args.images} synthetic images of {args.size} px "
          f"(val 25%), {args.steps} steps of batch {args.batch}, seeds {args.seeds}, {time.perf_counter() - t0:.0f} s; "
          "AP x100, mean +- std over seeds")
    for arm, r in rows.items():
        attr = f"   attributes AP^F1 {summary([x['attr'] for x in r])}" if arm == "ours" else ""
        print(f"{arm:5s} box AP {summary([x['box'] for x in r])}   mask AP {summary([x['mask'] for x in r])}{attr}")
    if args.skip_peer:
        return
    peer_mask = statistics.mean(x["mask"] for x in rows["peer"])
    ratio = statistics.mean(x["mask"] for x in rows["ours"]) / peer_mask if peer_mask > 0 else float("nan")
    print(f"fashionseg_vs_peer_maskAP={ratio:.3f}")


if __name__ == "__main__":
    main()
