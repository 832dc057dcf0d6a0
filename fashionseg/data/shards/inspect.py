"""`shard inspect`: what a shard set holds, as tables and a contact sheet.

Tables: images and instances per split, instances per category, attribute frequencies and
image sizes. The contact sheet draws the first samples of a split with each instance's mask
tinted, its box outlined and its category name written, so a wrong mask convention (e.g. the
transposed RLE) is visible at a glance.
"""
from __future__ import annotations

import argparse
import colorsys
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fashionseg.data import rle
from fashionseg.data.shards.manifest import ManifestError
from fashionseg.data.shards.reader import iter_split, read_manifest


def collect(shard_dir: str | Path, splits: list[str]) -> dict:
    """Statistics of the given splits, read from the shards themselves."""
    images, instances = Counter(), Counter()
    per_cat, per_attr, sizes = Counter(), Counter(), Counter()
    for split in splits:
        for _key, _jpg, meta in iter_split(shard_dir, split):
            images[split] += 1
            sizes[(meta["width"], meta["height"])] += 1
            for inst in meta["instances"]:
                instances[split] += 1
                per_cat[inst["category_id"]] += 1
                per_attr.update(inst["attribute_ids"])
    return {"images": images, "instances": instances, "categories": per_cat, "attributes": per_attr, "sizes": sizes}


def _color(cat_id: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((cat_id * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def contact_sheet(shard_dir: str | Path, split: str, names: dict[int, str], num: int = 16, cell: int = 256) -> Image.Image:
    """First `num` samples of `split`, masks tinted, boxes and category names drawn."""
    tiles = []
    for key, jpg, meta in iter_split(shard_dir, split):
        img = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32)
        for inst in meta["instances"]:
            m = rle.decode_coco(inst["segmentation"]).astype(bool)
            img[m] = img[m] * 0.5 + np.asarray(_color(inst["category_id"]), np.float32) * 0.5
        tile = Image.fromarray(img.astype(np.uint8))
        s = cell / max(tile.size)
        tile = tile.resize((max(1, round(tile.width * s)), max(1, round(tile.height * s))), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        font = ImageFont.load_default()
        for inst in meta["instances"]:
            x, y, w, h = (v * s for v in inst["bbox"])
            draw.rectangle([x, y, x + w, y + h], outline=_color(inst["category_id"]))
            label = names.get(inst["category_id"], str(inst["category_id"])).split(",")[0]
            draw.text((x + 1, y + 1), label, fill=(255, 255, 255), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        draw.text((2, tile.height - 12), key[:24], fill=(255, 255, 0), font=font, stroke_width=1, stroke_fill=(0, 0, 0))
        tiles.append(tile)
        if len(tiles) >= num:
            break
    cols = max(1, min(4, len(tiles)))
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), (24, 24, 24))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * cell, (i // cols) * cell))
    return sheet


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="shard folder (holds manifest.json)")
    p.add_argument("--split", default=None, help="one split (default: all in the tables, train on the sheet)")
    p.add_argument("--out", dest="sheet", default=None, help="contact sheet PNG (default OUT/sheet-<split>.png)")
    p.add_argument("--num", type=int, default=16, help="images on the contact sheet (default 16)")
    p.add_argument("--top", type=int, default=25, help="rows of the attribute table (default 25)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fashionseg.io import atomic_open

    try:
        manifest = read_manifest(args.out)
    except ManifestError as e:
        print(f"shard inspect: error: {e}", file=sys.stderr)
        return 2
    splits = list(manifest["splits"])
    if args.split is not None and args.split not in splits:
        print(f"shard inspect: error: {args.out}: no split '{args.split}' (has {', '.join(splits)})", file=sys.stderr)
        return 2
    chosen = [args.split] if args.split else splits
    stats = collect(args.out, chosen)
    cat_names = {c["id"]: c["name"] for c in manifest["categories"]}
    attr_names = {a["id"]: a["name"] for a in manifest["attributes"]}
    console = Console()

    t = Table(title=f"{args.out}: splits")
    for col in ("split", "images", "instances", "shards"):
        t.add_column(col, justify="left" if col == "split" else "right")
    for s in chosen:
        t.add_row(s, str(stats["images"][s]), str(stats["instances"][s]), str(len(manifest["splits"][s]["shards"])))
    console.print(t)

    t = Table(title="instances per category")
    for col in ("id", "category", "supercategory", "instances"):
        t.add_column(col, justify="right" if col in ("id", "instances") else "left")
    for c in manifest["categories"]:
        if stats["categories"][c["id"]]:
            t.add_row(str(c["id"]), c["name"], c.get("supercategory", ""), str(stats["categories"][c["id"]]))
    console.print(t)

    t = Table(title=f"attribute frequencies (top {args.top} of {len(stats['attributes'])} used)")
    for col in ("id", "attribute", "instances"):
        t.add_column(col, justify="right" if col != "attribute" else "left")
    for a, n in sorted(stats["attributes"].items(), key=lambda kv: (-kv[1], kv[0]))[: args.top]:
        t.add_row(str(a), attr_names.get(a, "?"), str(n))
    console.print(t)

    t = Table(title="image sizes (width x height)")
    t.add_column("size")
    t.add_column("images", justify="right")
    for (w, h), n in stats["sizes"].most_common(10):
        t.add_row(f"{w}x{h}", str(n))
    if len(stats["sizes"]) > 10:
        t.add_row(f"... {len(stats['sizes']) - 10} more sizes", "")
    console.print(t)

    sheet_split = args.split or ("train" if "train" in splits and manifest["splits"]["train"]["num_samples"] else splits[0])
    sheet_path = Path(args.sheet) if args.sheet else Path(args.out) / f"sheet-{sheet_split}.png"
    sheet = contact_sheet(args.out, sheet_split, cat_names, num=args.num)
    with atomic_open(sheet_path, "wb") as f:
        sheet.save(f, format="PNG")
    console.print(f"contact sheet of {sheet_split}: {sheet_path}")
    return 0
