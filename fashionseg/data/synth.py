"""`shard synth`: a synthetic fashion dataset in the exact Kaggle iMaterialist 2020 layout.

Person-like figures on varied backgrounds wear polygon garments. Each main garment class has
its own colour family and shape, parts (sleeve, collar, neckline, pocket, zipper) lie inside
their garment, garments occlude each other (and a second figure may stand in front of the
first), and attributes are visible in the pixels: the pattern attribute sets the fill texture,
length attributes set the hem, sleeve-length attributes set the sleeves, the neckline type sets
the neck opening. Masks come from the rasterised label map, so the RLE in train.csv is exactly
the visible part of each instance. Everything derives from (seed, image index): byte-identical
output for a seed, so tests and the demo can rely on it.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fashionseg.data import rle
from fashionseg.io import atomic_write_bytes, atomic_write_text

# Category ids (fashionseg/data/label_descriptions.json).
SHIRT, TOP, JACKET, PANTS, SHORTS, SKIRT, DRESS = 0, 1, 4, 6, 7, 8, 10
HAT, SHOE, BAG = 14, 23, 24
COLLAR, SLEEVE, POCKET, NECKLINE, ZIPPER = 28, 31, 32, 33, 35

# Attribute ids.
PATTERNS = {"plain": 317, "stripe": 328, "dot": 323, "check": 322}
LENGTHS = {"mini": 149, "knee": 151, "maxi": 154}  # hem height, fraction of the figure
HEM = {149: 0.60, 151: 0.73, 154: 0.93}
SLEEVES = {"sleeveless": 156, "short": 157, "elbow": 158, "three_quarter": 159, "wrist": 160}
SLEEVE_T = {156: 0.0, 157: 0.28, 158: 0.5, 159: 0.74, 160: 1.0}  # fraction of the arm covered
NECK_V, NECK_ROUND = 183, 182
ZIP_UP = 229

# One colour family per class keeps the task learnable by a small model in a few hundred steps.
COLORS = {
    SHIRT: (232, 232, 238), TOP: (214, 58, 58), JACKET: (62, 72, 88), PANTS: (44, 78, 168),
    SHORTS: (204, 172, 92), SKIRT: (148, 52, 150), DRESS: (236, 136, 34), HAT: (216, 206, 60),
    SHOE: (34, 24, 24), BAG: (124, 74, 30),
}
TRIM = (250, 250, 250)
ZIP_COLOR = (176, 176, 182)
SKINS = [(241, 204, 170), (224, 172, 130), (176, 120, 84), (112, 72, 48)]
MIN_PIXELS = 10  # annotators do not label slivers


@dataclass
class Instance:
    category_id: int
    attribute_ids: list[int]
    owner: int  # label-map value of the garment this instance (or its parent) paints
    region: np.ndarray | None = None  # parts only: the pixels painted for this part
    children: list["Instance"] = field(default_factory=list)


class Canvas:
    """An RGB image plus a label map saying which main garment owns each pixel."""

    def __init__(self, height: int, width: int, rng: np.random.Generator):
        self.h, self.w, self.rng = height, width, rng
        self.rgb = self._background()
        self.owner = np.zeros((height, width), np.int32)  # 0 = background / skin
        self.instances: list[Instance] = []
        yy, xx = np.mgrid[0:height, 0:width]
        self.yy, self.xx = yy, xx

    def _background(self) -> np.ndarray:
        rng, h, w = self.rng, self.h, self.w
        c0 = rng.integers(90, 200, 3).astype(np.float32)
        c1 = np.clip(c0 + rng.integers(-60, 61, 3), 0, 255).astype(np.float32)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(c0 * (1 - t) + c1 * t, (h, w, 3)).copy()
        for _ in range(int(rng.integers(0, 3))):  # a few large soft blocks: walls, doors, floor
            x0, x1 = sorted(rng.integers(0, w, 2).tolist())
            y0 = int(rng.integers(h // 2, h))
            img[y0:, x0 : x1 + 1] = img[y0:, x0 : x1 + 1] * 0.85 + rng.integers(60, 200, 3) * 0.15
        return img

    def mask(self, draw_fn) -> np.ndarray:
        im = Image.new("L", (self.w, self.h), 0)
        draw_fn(ImageDraw.Draw(im))
        return np.asarray(im, dtype=bool)

    def poly(self, pts) -> np.ndarray:
        return self.mask(lambda d: d.polygon([(float(x), float(y)) for x, y in pts], fill=1))

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        return self.mask(lambda d: d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1))

    def texture(self, base, pattern: int, period: float) -> np.ndarray:
        """Full-canvas fill for a pattern attribute: plain, vertical stripes, dots or checks."""
        base = np.asarray(base, np.float32)
        alt = base * 0.4 if base.mean() > 110 else (base + 255) / 2
        half = max(2.0, period / 2)
        if pattern == PATTERNS["stripe"]:
            on = (self.xx // half) % 2 == 1
        elif pattern == PATTERNS["check"]:
            on = ((self.xx // half) + (self.yy // half)) % 2 == 1
        elif pattern == PATTERNS["dot"]:
            gx, gy = (self.xx % period) - period / 2, (self.yy % period) - period / 2
            on = gx * gx + gy * gy <= (period * 0.28) ** 2
        else:
            on = np.zeros((self.h, self.w), bool)
        return np.where(on[..., None], alt, base)

    def paint(self, region: np.ndarray, color_or_tex) -> None:
        if np.ndim(color_or_tex) == 1:
            self.rgb[region] = np.asarray(color_or_tex, np.float32)
        else:
            self.rgb[region] = color_or_tex[region]

    def garment(self, category_id: int, attrs: list[int], region: np.ndarray, fill) -> Instance:
        inst = Instance(category_id, sorted(attrs), owner=len(self.instances) + 1)
        self.instances.append(inst)
        self.owner[region] = inst.owner
        self.paint(region, fill)
        return inst

    def part(self, parent: Instance, category_id: int, attrs: list[int], region: np.ndarray, fill) -> None:
        region = region & (self.owner == parent.owner)  # parts lie inside their garment
        if fill is not None:
            self.paint(region, fill)
        parent.children.append(Instance(category_id, sorted(attrs), parent.owner, region))

    def jitter(self, color) -> np.ndarray:
        return np.clip(np.asarray(color, np.float32) + self.rng.integers(-18, 19, 3), 0, 255)

    def final_masks(self) -> list[tuple[int, list[int], np.ndarray]]:
        """(category, attributes, visible mask) per instance, main garment before its parts."""
        out = []
        for inst in self.instances:
            visible = self.owner == inst.owner
            if visible.sum() < MIN_PIXELS:
                continue
            out.append((inst.category_id, inst.attribute_ids, visible))
            for part in inst.children:
                m = part.region & visible
                if m.sum() >= MIN_PIXELS:
                    out.append((part.category_id, part.attribute_ids, m))
        return out


def _seg(c: Canvas, p0, p1, w0: float, w1: float) -> np.ndarray:
    """A tapered band from p0 to p1 (an arm, a leg, a sleeve)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    n = max(1e-6, (dx * dx + dy * dy) ** 0.5)
    nx, ny = -dy / n, dx / n
    return c.poly([(x0 + nx * w0, y0 + ny * w0), (x1 + nx * w1, y1 + ny * w1),
                   (x1 - nx * w1, y1 - ny * w1), (x0 - nx * w0, y0 - ny * w0)])


def _lerp(p0, p1, t):
    return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)


def _figure(c: Canvas, cx: float, y0: float, fh: float) -> None:
    rng = c.rng
    u = fh  # every length is a fraction of the figure height
    Y = lambda f: y0 + f * u  # noqa: E731
    skin = np.asarray(SKINS[int(rng.integers(len(SKINS)))], np.float32)
    sw, ww, hw = 0.105 * u, 0.078 * u, 0.095 * u  # half widths: shoulders, waist, hips
    ysh, ywaist, yhip, ycrotch, yankle = Y(0.15), Y(0.40), Y(0.49), Y(0.55), Y(0.94)
    period = max(4.0, round(u / 14))
    shoulders = [(cx - sw, ysh + 0.012 * u), (cx + sw, ysh + 0.012 * u)]
    side = lambda s: 1 if s else -1  # noqa: E731
    wrists = [(cx + side(s) * (sw + 0.055 * u), Y(0.47)) for s in (0, 1)]
    ankles = [(cx + side(s) * 0.055 * u, yankle) for s in (0, 1)]
    hips = [(cx + side(s) * 0.05 * u, yhip) for s in (0, 1)]

    # body: head, neck, arms, legs (skin shows wherever no garment covers it)
    body = c.ellipse(cx, Y(0.065), 0.05 * u, 0.062 * u) | c.poly(
        [(cx - 0.025 * u, Y(0.1)), (cx + 0.025 * u, Y(0.1)), (cx + 0.03 * u, ysh + 0.02 * u), (cx - 0.03 * u, ysh + 0.02 * u)])
    body |= c.poly([(cx - sw, ysh), (cx + sw, ysh), (cx + hw, yhip), (cx - hw, yhip)])
    for s in (0, 1):
        body |= _seg(c, shoulders[s], wrists[s], 0.026 * u, 0.02 * u) | c.ellipse(*wrists[s], 0.024 * u, 0.028 * u)
        body |= _seg(c, hips[s], ankles[s], 0.042 * u, 0.026 * u)
    c.paint(body, skin)
    hair = c.ellipse(cx, Y(0.035), 0.052 * u, 0.035 * u)
    c.paint(hair, np.asarray([40, 28, 20], np.float32) + rng.integers(0, 60))

    pattern = lambda choices: int(rng.choice([PATTERNS[p] for p in choices]))  # noqa: E731
    dress = rng.random() < 0.3

    # lower garment (behind the upper one)
    if not dress:
        kind = int(rng.choice([PANTS, PANTS, SHORTS, SKIRT]))
        pat = pattern(["plain", "plain", "check", "stripe"]) if kind != SKIRT else pattern(list(PATTERNS))
        attrs = [pat]
        if kind == SKIRT:
            length = int(rng.choice(list(LENGTHS.values())))
            attrs.append(length)
            yhem, flare = Y(HEM[length]), 0.05 * u + 0.08 * u * (HEM[length] - 0.6) / 0.33
            region = c.poly([(cx - ww, ywaist), (cx + ww, ywaist), (cx + hw + flare, yhem), (cx - hw - flare, yhem)])
        else:
            yhem = yankle if kind == PANTS else Y(0.64)
            t = (yhem - yhip) / (yankle - yhip)
            kn = [_lerp(hips[s], ankles[s], t) for s in (0, 1)]
            lw = 0.046 * u if kind == PANTS else 0.055 * u
            region = c.poly([(cx - ww, ywaist), (cx + ww, ywaist), (cx + hw, yhip), (kn[1][0] + lw, yhem),
                             (kn[1][0] - lw * 0.7, yhem), (cx, ycrotch), (kn[0][0] + lw * 0.7, yhem), (kn[0][0] - lw, yhem), (cx - hw, yhip)])
        low = c.garment(kind, attrs, region, c.texture(c.jitter(COLORS[kind]), pat, period))
        if kind in (PANTS, SHORTS) and rng.random() < 0.5:
            for s in (0, 1):
                px = cx + side(s) * 0.06 * u
                c.part(low, POCKET, [], c.poly([(px - 0.03 * u, Y(0.50)), (px + 0.03 * u, Y(0.50)), (px + 0.025 * u, Y(0.555)), (px - 0.025 * u, Y(0.555))]),
                       c.jitter(COLORS[kind]) * 0.7)

    # upper garment or dress, with sleeves and a neckline cut
    kind = DRESS if dress else int(rng.choice([SHIRT, TOP]))
    choices = {SHIRT: ["short", "elbow", "wrist"], TOP: ["sleeveless", "short", "wrist"],
               DRESS: ["sleeveless", "short", "elbow", "three_quarter"]}[kind]
    sleeve = SLEEVES[str(rng.choice(choices))]
    pat = pattern(list(PATTERNS))
    attrs = [pat, sleeve]
    if kind == DRESS:
        length = int(rng.choice(list(LENGTHS.values())))
        attrs.append(length)
        yhem, flare = Y(HEM[length]), 0.06 * u + 0.1 * u * (HEM[length] - 0.6) / 0.33
        torso = c.poly([(cx - sw, ysh), (cx + sw, ysh), (cx + ww, ywaist), (cx + hw + flare, yhem), (cx - hw - flare, yhem), (cx - ww, ywaist)])
    else:
        torso = c.poly([(cx - sw, ysh), (cx + sw, ysh), (cx + hw * 1.02, yhip + 0.02 * u), (cx - hw * 1.02, yhip + 0.02 * u)])
    sleeves = [_seg(c, _lerp(shoulders[s], (cx, ysh), 0.15), _lerp(shoulders[s], wrists[s], SLEEVE_T[sleeve]), 0.034 * u, 0.03 * u)
               for s in (0, 1)] if SLEEVE_T[sleeve] > 0 else []
    v_neck = kind == SHIRT or rng.random() < 0.5
    neck_depth = 0.09 * u if v_neck else 0.045 * u
    neck_hw = 0.045 * u
    if v_neck:
        cut = c.poly([(cx - neck_hw, ysh - 1), (cx + neck_hw, ysh - 1), (cx, ysh + neck_depth)])
        band = c.poly([(cx - neck_hw * 1.5, ysh - 1), (cx + neck_hw * 1.5, ysh - 1), (cx, ysh + neck_depth * 1.35)])
    else:
        cut = c.ellipse(cx, ysh, neck_hw, neck_depth)
        band = c.ellipse(cx, ysh, neck_hw * 1.45, neck_depth * 1.45)
    region = torso.copy()
    for m in sleeves:
        region |= m
    region &= ~cut
    color = c.jitter(COLORS[kind])
    up = c.garment(kind, attrs, region, c.texture(color, pat, period))
    for m in sleeves:
        c.part(up, SLEEVE, [], m, None)
    if kind == SHIRT:  # collar: two flaps either side of the V
        for s in (0, 1):
            c.part(up, COLLAR, [], c.poly([(cx + side(s) * neck_hw * 0.4, ysh - 0.01 * u), (cx + side(s) * neck_hw * 1.9, ysh - 0.005 * u),
                                            (cx + side(s) * neck_hw * 0.3, ysh + neck_depth * 0.8)]), TRIM)
        if rng.random() < 0.5:
            px = cx + 0.055 * u
            c.part(up, POCKET, [], c.poly([(px - 0.025 * u, Y(0.22)), (px + 0.025 * u, Y(0.22)), (px + 0.025 * u, Y(0.27)), (px - 0.025 * u, Y(0.27))]), color * 0.72)
    else:
        c.part(up, NECKLINE, [NECK_V if v_neck else NECK_ROUND], band & ~cut, np.asarray(TRIM) * 0.5 + color * 0.5)

    # jacket over it: open (the top shows in the middle) or closed with a zipper
    if rng.random() < 0.35:
        jsleeve = SLEEVES[str(rng.choice(["three_quarter", "wrist", "wrist"]))]
        jpat = pattern(["plain", "plain", "check"])
        closed = rng.random() < 0.4
        jsw = sw * 1.12
        jtorso = c.poly([(cx - jsw, ysh - 0.005 * u), (cx + jsw, ysh - 0.005 * u), (cx + hw * 1.12, yhip + 0.05 * u), (cx - hw * 1.12, yhip + 0.05 * u)])
        jsl = [_seg(c, _lerp(shoulders[s], (cx, ysh), 0.1), _lerp(shoulders[s], wrists[s], SLEEVE_T[jsleeve]), 0.04 * u, 0.034 * u) for s in (0, 1)]
        jregion = jtorso | jsl[0] | jsl[1]
        gap = 0.004 * u if closed else 0.035 * u
        jregion &= ~c.poly([(cx - 0.05 * u, ysh - 2), (cx + 0.05 * u, ysh - 2), (cx + gap, Y(0.3)), (cx + gap, yhip + 0.06 * u), (cx - gap, yhip + 0.06 * u), (cx - gap, Y(0.3))])
        jattrs = [jpat, jsleeve] + ([ZIP_UP] if closed else [])
        jcolor = c.jitter(COLORS[JACKET])
        jacket = c.garment(JACKET, jattrs, jregion, c.texture(jcolor, jpat, period))
        for m in jsl:
            c.part(jacket, SLEEVE, [], m, None)
        if closed:
            zw = max(1.0, 0.014 * u)
            c.part(jacket, ZIPPER, [], c.poly([(cx - zw, Y(0.3)), (cx + zw, Y(0.3)), (cx + zw, yhip + 0.05 * u), (cx - zw, yhip + 0.05 * u)]), ZIP_COLOR)
        if rng.random() < 0.6:
            for s in (0, 1):
                px = cx + side(s) * 0.07 * u
                c.part(jacket, POCKET, [], c.poly([(px - 0.028 * u, Y(0.45)), (px + 0.028 * u, Y(0.45)), (px + 0.028 * u, Y(0.51)), (px - 0.028 * u, Y(0.51))]), jcolor * 0.7)

    if rng.random() < 0.9:  # shoes, one instance each
        for s in (0, 1):
            ax, ay = ankles[s]
            c.garment(SHOE, [], c.ellipse(ax + side(s) * 0.012 * u, ay + 0.02 * u, 0.038 * u, 0.022 * u), c.jitter(COLORS[SHOE]))
    if rng.random() < 0.25:  # hat: brim + crown
        region = c.ellipse(cx, Y(0.03), 0.085 * u, 0.018 * u) | c.poly([(cx - 0.045 * u, Y(0.03)), (cx + 0.045 * u, Y(0.03)), (cx + 0.04 * u, Y(-0.03)), (cx - 0.04 * u, Y(-0.03))])
        c.garment(HAT, [], region, c.jitter(COLORS[HAT]))
    if rng.random() < 0.4:  # bag held at one hand, in front of everything of this figure
        hx, hy = wrists[int(rng.integers(2))]
        bw, bh = 0.07 * u, 0.09 * u
        region = c.poly([(hx - bw, hy + 0.03 * u), (hx + bw, hy + 0.03 * u), (hx + bw * 1.1, hy + 0.03 * u + bh), (hx - bw * 1.1, hy + 0.03 * u + bh)])
        region |= c.mask(lambda d: d.arc([hx - bw * 0.6, hy - 0.02 * u, hx + bw * 0.6, hy + 0.08 * u], 180, 360, fill=1, width=max(1, int(0.012 * u))))
        c.garment(BAG, [], region, c.jitter(COLORS[BAG]))


def render(seed: int, index: int, size: int) -> tuple[str, bytes, int, int, list[tuple[int, list[int], np.ndarray]]]:
    """One image: (ImageId, JPEG bytes, height, width, [(category, attributes, mask)])."""
    image_id = hashlib.md5(f"fashionseg-synth-{seed}-{index}".encode()).hexdigest()
    rng = np.random.default_rng([seed, index])
    h = size
    w = size if rng.random() < 0.4 else int(round(size * 0.75))
    c = Canvas(h, w, rng)
    n_fig = 2 if rng.random() < 0.25 else 1
    for k in range(n_fig):  # back figure first (smaller, farther away), then the front one
        scale = 0.92 if n_fig == 1 else (0.8 if k == 0 else 0.95)
        fh = h * scale * (0.92 + 0.08 * rng.random())
        if n_fig == 1:
            cx = w * (0.38 + 0.24 * rng.random())
        else:
            cx = w * ((0.28 if k == 0 else 0.62) + 0.08 * rng.random())
        y0 = (h - fh) * (0.3 + 0.6 * rng.random()) if k == 0 or n_fig == 1 else h - fh * 1.0
        _figure(c, cx, y0, fh)
    noise = rng.normal(0, 3.0, c.rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(c.rgb + noise, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return image_id, buf.getvalue(), h, w, c.final_masks()


def write_dataset(out: str | Path, images: int, seed: int = 0, size: int = 128, progress: bool = True) -> Path:
    """Write OUT/train.csv, OUT/label_descriptions.json, OUT/train/<ImageId>.jpg."""
    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    vocab_bytes = resources.files("fashionseg.data").joinpath("label_descriptions.json").read_bytes()
    atomic_write_bytes(out / "label_descriptions.json", vocab_bytes)
    rows = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("synth", total=images)
        for i in range(images):
            image_id, jpg, h, w, masks = render(seed, i, size)
            atomic_write_bytes(out / "train" / f"{image_id}.jpg", jpg)
            for cat, attrs, m in masks:
                rows.append((image_id, rle.encode_kaggle(m), h, w, cat, ",".join(map(str, attrs))))
            bar.advance(task)
    rows.sort(key=lambda r: r[0])  # stable: instance order inside an image is kept
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds"])
    writer.writerows(rows)
    atomic_write_text(out / "train.csv", buf.getvalue())
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder (gets train.csv, label_descriptions.json, train/)")
    p.add_argument("--images", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical dataset (default 0)")
    p.add_argument("--size", type=int, default=128, help="image height in pixels; width is the same or 3/4 of it (default 128)")


def run(args: argparse.Namespace) -> int:
    if args.images <= 0 or args.size < 32:
        raise SystemExit("shard synth: --images must be > 0 and --size >= 32")
    out = write_dataset(args.out, args.images, args.seed, args.size)
    n = sum(1 for _ in open(out / "train.csv")) - 1
    print(f"wrote {args.images} images and {n} instances to {out} (Kaggle layout: train.csv, label_descriptions.json, train/)")
    return 0
