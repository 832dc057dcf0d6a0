"""Pictures of predictions: translucent masks, boxes, class names with scores, top attributes.

Shared by `fashionseg predict`, the demo and anything else that shows detections. Input is the
image (PIL or uint8 array) and COCO result dicts on that image's grid (see coco.py).
"""
from __future__ import annotations

import colorsys
import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fashionseg.data.rle import decode_coco
from fashionseg.data.vocab import Vocab
from fashionseg.io import atomic_write_bytes


def category_color(cat_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per category id (golden-ratio hues)."""
    h = (cat_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _label(result: dict, vocab: Vocab | None, top_attributes: int) -> str:
    cat = result["category_id"]
    name = vocab.category_name(cat) if vocab is not None and vocab.has_category(cat) else str(cat)
    name = name.split(",")[0]
    text = f"{name} {result.get('score', 1.0):.2f}"
    attrs = list(result.get("attribute_ids") or [])[:top_attributes]
    if attrs:
        names = [vocab.attribute_name(a) if vocab is not None and vocab.has_attribute(a) else str(a) for a in attrs]
        text += "\n" + ", ".join(n.split(" (")[0] for n in names)
    return text


def draw_overlay(image, results: list[dict], vocab: Vocab | None = None, *, top_attributes: int = 3,
                 alpha: float = 0.45, min_score: float = 0.0) -> Image.Image:
    """Image with each result's mask blended in its category colour, its box, and a label
    ("name score" + up to `top_attributes` attribute names, highest score first)."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    canvas = np.asarray(img.convert("RGB"), dtype=np.float32).copy()
    h, w = canvas.shape[:2]
    shown = sorted((r for r in results if r.get("score", 1.0) >= min_score), key=lambda r: r.get("score", 1.0))
    for r in shown:  # low scores first so confident instances end up on top
        m = decode_coco(r["segmentation"]).astype(bool)
        if m.shape != (h, w):
            raise ValueError(f"mask grid {m.shape} differs from the image {h}x{w}")
        canvas[m] = (1 - alpha) * canvas[m] + alpha * np.asarray(category_color(r["category_id"]), np.float32)
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for r in shown:
        color = category_color(r["category_id"])
        if "bbox" in r:
            x, y, bw, bh = r["bbox"]
            draw.rectangle([x, y, x + bw, y + bh], outline=color, width=max(1, round(min(h, w) / 300)))
            text = _label(r, vocab, top_attributes)
            tx, ty = x + 2, y + 1
            left, top, right, bottom = draw.multiline_textbbox((tx, ty), text, font=font)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
            draw.multiline_text((tx, ty), text, fill=color, font=font)
    return out


def save_png(path: str | os.PathLike, image: Image.Image) -> None:
    """PNG written atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
