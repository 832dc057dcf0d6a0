#!/usr/bin/env bash
# `make demo`: synthetic data -> shards -> train the light model on the CPU -> COCO AP -> a picture.
# Everything lands in shards/demo and runs/demo (`make clean` removes them). Measured on the idle
# 2-core machine: 2 min 5 s wall (training 106 s); mask AP 0.109, AP50 0.373, box AP 0.192 on the
# 44 val images (docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
SRC="$(mktemp -d -t fashionseg_demo_src.XXXXXX)"   # the raw synthetic dataset: only `shard build` reads it
trap 'rm -rf "$SRC"' EXIT
SHARDS=shards/demo
RUN=runs/demo
STEPS="${DEMO_STEPS:-}"   # DEMO_STEPS=100 make demo: a quicker, worse model

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 shard synth: 400 synthetic images in the Kaggle layout ($SRC)"
rm -rf "$SHARDS" "$RUN"
shard synth "$SRC" --images 400 --size 96 --seed 0

step "2/5 shard build: webdataset shards + manifest ($SHARDS)"
shard build "$SRC" "$SHARDS" --val-fraction 0.1 --samples-per-shard 128 --no-progress

step "3/5 fashionseg train: ResNet-18 FPN Mask R-CNN + attribute head from scratch, CPU ($RUN)"
t0=$(date +%s)
fashionseg train --config configs/demo.yaml --shards "$SHARDS" --out "$RUN" ${STEPS:+--max-steps "$STEPS"}
echo "trained in $(( $(date +%s) - t0 )) s"

step "4/5 fashionseg eval: COCO bbox/segm AP and AP^{IoU+F1} on val"
fashionseg eval --weights "$RUN/model_final.pth" --shards "$SHARDS" --split val --batch-size 8 \
    --out "$RUN/eval.json" --no-progress

step "5/5 predictions on val images"
fashionseg predict --weights "$RUN/model_final.pth" "$SHARDS" --split val --out "$RUN/predict" \
    --score-thresh 0.5 --batch-size 8 --no-progress > /dev/null
python - "$RUN" <<'PY'
"""Contact sheet of the first 8 val overlays -> RUN/predictions.png (2x upscaled for the eye)."""
import sys
from pathlib import Path
from PIL import Image
run = Path(sys.argv[1])
files = sorted((run / "predict").rglob("*.png"))[:8]
if not files:
    sys.exit(f"no overlay PNGs under {run / 'predict'}")
tiles = [Image.open(f).convert("RGB") for f in files]
w = max(t.width for t in tiles) * 2
h = max(t.height for t in tiles) * 2
sheet = Image.new("RGB", (w * 4, h * ((len(tiles) + 3) // 4)), "white")
for i, t in enumerate(tiles):
    sheet.paste(t.resize((t.width * 2, t.height * 2), Image.NEAREST), ((i % 4) * w, (i // 4) * h))
sheet.save(run / "predictions.png")
PY
fashionseg report "$RUN" > /dev/null
python - "$RUN/eval.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"\nmask AP {m['segm']['AP']:.3f}  mask AP50 {m['segm']['AP50']:.3f}  box AP {m['bbox']['AP']:.3f}  "
      f"AP^(IoU+F1) {m['iou_f1']['AP'] if m.get('iou_f1') else float('nan'):.3f}  on {m['num_images']} val images")
PY
echo
echo "predictions: $RUN/predictions.png"
echo "curves:      $RUN/report.png"
echo "metrics:     $RUN/eval.json, $RUN/metrics.jsonl (TensorBoard: tensorboard --logdir $RUN)"
