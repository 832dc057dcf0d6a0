"""Inference throughput (images/s) of the light and R50 models, random weights, CPU or GPU.

Two figures per model, on uint8 images already at the test scale (--size shorter side, as the
data layer gives them) whose original size is --height x --width:
- `model`: `inference.forward_by_shape` alone (backbone, RPN, heads, masks on the original grid:
  pasted there by a model with `output_sizes`, else on the test grid), eval mode, no_grad;
- `pipeline`: model + what `fashionseg eval/predict` add per image (masks at the original size,
  cut and RLE-encoded, source ids, attribute sets: inference.outputs_to_results).
Random weights give near-uniform class scores, so score_thresh is 0 and every image yields
exactly --dets detections (the mask head and mask paste then cost what a trained model's would
at that many detections). Images are random noise.

    python bench/inference.py                       # CPU, both models, 512 px test scale
    python bench/inference.py --device cuda --images 50 --batch-size 4 --size 800
"""
from __future__ import annotations

import argparse
import time

import torch

from fashionseg.data.transforms import output_size
from fashionseg.data.vocab import Vocab
from fashionseg.eval.inference import forward_by_shape, outputs_to_results
from fashionseg.model.build import ModelConfig, build_model

MODELS = {"light": "mobilenet_v3_large_fpn", "r50": "resnet50_fpn"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench(name: str, args, vocab: Vocab, device: torch.device) -> dict:
    cfg = ModelConfig(backbone=MODELS[name], score_thresh=0.0, detections_per_img=args.dets)
    torch.manual_seed(0)
    model = build_model(cfg, vocab.num_classes, vocab.num_attributes).to(device).eval()
    g = torch.Generator().manual_seed(0)
    h, w = output_size(args.height, args.width, args.size, int(args.size * 1333 / 800))
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).to(device) for _ in range(args.batch_size)]
    sizes = [(args.height, args.width)] * len(images)
    out: dict = {"name": name, "backbone": cfg.backbone}
    for mode in ("model", "pipeline"):
        for _ in range(args.warmup):
            forward_by_shape(model, images, sizes)
        sync(device)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while n < args.images:
            outs = forward_by_shape(model, images, sizes)
            if mode == "pipeline":
                for i, o in enumerate(outs):
                    outputs_to_results(o, i, vocab, mask_thresh=0.5, out_size=sizes[i])
            sync(device)
            n += len(images)
        out[mode] = n / (time.perf_counter() - t0)
        out[f"{mode}_cpu_s"] = (time.process_time() - c0) / n  # CPU seconds per image, all threads
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["light", "r50"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--size", type=int, default=512, help="test scale: shorter side (longer cap scaled as 800:1333)")
    p.add_argument("--height", type=int, default=768, help="original image height (masks are pasted at this size)")
    p.add_argument("--width", type=int, default=576)
    p.add_argument("--dets", type=int, default=50, help="detections per image")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, default=8, help="timed images per figure")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab = Vocab.default()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# inference on {where}: {args.height}x{args.width} originals at test size {args.size}, "
          f"{args.dets} detections/image, batch {args.batch_size}, {args.images} images timed")
    print("# img/s is wall clock; CPU s/img (process CPU time, all threads) is steadier on a shared machine")
    print(f"{'model':<8}{'backbone':<24}{'model img/s':>13}{'pipeline img/s':>16}{'model CPU s/img':>17}{'pipeline CPU s/img':>20}")
    for name in args.models:
        r = bench(name, args, vocab, device)
        print(f"{r['name']:<8}{r['backbone']:<24}{r['model']:>13.3f}{r['pipeline']:>16.3f}"
              f"{r['model_cpu_s']:>17.2f}{r['pipeline_cpu_s']:>20.2f}", flush=True)


if __name__ == "__main__":
    main()
