"""One source image -> one shard sample: decode, check, repair, convert masks (runs in the
build's worker processes).

Never raises on bad data: every problem becomes a `Problem` with its reason; the image is
dropped (jpg None) when nothing valid is left. With --max-size the image and its masks shrink
together, and each mask's original-grid RLE is kept beside the stored one (docs/formats.md,
"Original-grid masks") so eval can score at the original resolution.
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.sources.records import DROP_IMAGE, DROP_INSTANCE, REPAIRED, Problem, RawImage, RawInstance

JPEG_QUALITY = 95  # used only when an image must be re-encoded (resize, repair)
POLYGON_MARGIN = 8  # polygon coordinates beyond this many image sizes are corrupt, not annotations


def _decode_mask(inst: RawInstance, h: int, w: int) -> tuple[dict | None, str | None, bool]:
    """-> (COCO compressed RLE on the h x w grid, error reason, repaired)."""
    if inst.kaggle_rle is not None:
        try:
            coco, repaired = rle.kaggle_to_coco(inst.kaggle_rle, h, w)
        except rle.RLEError as e:
            return None, f"bad EncodedPixels: {e}", False
        return coco, None, repaired
    seg = inst.segmentation
    try:
        if isinstance(seg, list):
            polys = [[float(v) for v in p] for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                return None, "no polygon with >= 3 points", False
            # pycocotools' rasteriser segfaults on NaN/inf and runs out of memory on huge
            # coordinates (it walks every edge pixel by pixel): refuse those before calling it
            if not all(np.isfinite(p).all() for p in polys):
                return None, "polygon has a NaN or infinite coordinate", False
            limit = POLYGON_MARGIN * max(h, w)
            if any(np.abs(p).max() > limit for p in polys):
                return None, f"polygon coordinate beyond +-{limit} for a {h}x{w} image", False
            r = mask_util.merge(mask_util.frPyObjects(polys, h, w))
            return {"size": [h, w], "counts": r["counts"].decode("ascii")}, None, len(polys) != len(seg)
        if isinstance(seg, dict) and "counts" in seg and "size" in seg:
            sh, sw = (int(v) for v in seg["size"])
            if (sh, sw) != (h, w):
                return None, f"RLE size {sh}x{sw} != image size {h}x{w}", False
            counts = seg["counts"]
            if isinstance(counts, list):
                if sum(int(c) for c in counts) != h * w or any(int(c) < 0 for c in counts):
                    return None, f"uncompressed RLE counts do not sum to {h}*{w}", False
                r = mask_util.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
            else:
                r = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            m = mask_util.decode(r)  # normalise to the canonical encoding
            return rle.encode_coco(m), None, False
    except (ValueError, TypeError, OverflowError) as e:
        return None, f"unreadable segmentation ({e})", False
    return None, f"unsupported segmentation of type {type(seg).__name__}", False


def _to_rgb(pil: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. PIL's own convert clips 16/32-bit and float greyscale to 0..255 (a 16-bit
    PNG turns white, a 0..1 float image black), so those are scaled to 8 bits first."""
    if pil.mode == "RGB":
        return pil
    if pil.mode.startswith("I;16") or pil.mode in ("I", "F"):
        a = np.asarray(pil).astype(np.float64)
        if pil.mode.startswith("I;16"):
            a = a / 257.0
        elif pil.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        elif pil.mode == "I" and a.size and a.max() > 255:
            a = a / (257.0 if a.max() <= 65535 else a.max() / 255.0)
        pil = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return pil.convert("RGB")


def _resize_mask(coco: dict, size: tuple[int, int]) -> dict:
    # pycocotools decodes column-major: resize the transpose (no copy; nearest is per-axis) and
    # hand the transposed result back, already in the column-major order encode wants
    mt = rle.decode_coco(coco).T
    small_t = Image.fromarray(mt, "L").resize((size[1], size[0]), Image.Resampling.NEAREST)
    return rle.encode_coco(np.asarray(small_t).T)


def process_image(key: str, img: RawImage, max_size: int | None) -> dict:
    """Decode and check one image with its instances -> {key, jpg, meta, problems}.

    Never raises on bad data: every problem becomes a report entry; jpg is None when the image
    is dropped.
    """
    problems: list[Problem] = []
    out: dict[str, Any] = {"key": key, "jpg": None, "meta": None, "problems": problems}
    n_inst = len(img.instances)
    lost = lambda reason: problems.append(Problem(DROP_IMAGE, reason, img.source_id, img.path, instances=n_inst))  # noqa: E731
    if not img.instances:
        problems.append(Problem(DROP_IMAGE, "no valid instances in the source", img.source_id, img.path, bad=False, instances=0))
        return out
    try:
        data = Path(img.path).read_bytes()
    except OSError as e:
        lost(f"missing or unreadable image file ({e.strerror or e})")
        return out
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        pil = Image.open(io.BytesIO(data))
        fmt = pil.format
        pil.load()
    except Exception as e:  # PIL raises many types for corrupt data; all mean "unreadable"
        lost(f"cannot decode image ({type(e).__name__}: {e})")
        return out

    reencode = False
    if fmt != "JPEG":
        suffix = Path(img.path).suffix
        what = f"{fmt} bytes behind a {suffix} name" if suffix.lower() in (".jpg", ".jpeg") else f"{fmt} image"
        problems.append(Problem(REPAIRED, f"{what}: re-encoded as JPEG", img.source_id, img.path, bad=False))
        reencode = True
    if pil.mode != "RGB":
        problems.append(Problem(REPAIRED, f"{pil.mode} image converted to RGB", img.source_id, img.path, bad=False))
        reencode = True
    # The mask grid is what the annotations state; an EXIF rotation may explain a mismatch.
    grids = Counter((i.height, i.width) for i in img.instances if i.height and i.width)
    grid = grids.most_common(1)[0][0] if grids else (pil.height, pil.width)
    if (pil.height, pil.width) != grid:
        try:
            orientation = pil.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF block: treat as no orientation
            orientation = 1
        if orientation in range(2, 9):
            turned = ImageOps.exif_transpose(pil)
            if (turned.height, turned.width) == grid:
                problems.append(Problem(REPAIRED, f"EXIF orientation {orientation} applied so the image matches its {grid[0]}x{grid[1]} masks",
                                        img.source_id, img.path, bad=False))
                pil, reencode = turned, True
    pil = _to_rgb(pil)
    h, w = pil.height, pil.width

    scale = None
    if max_size and max(h, w) > max_size:
        s = max_size / max(h, w)
        new_size = (max(1, round(w * s)), max(1, round(h * s)))
        scale = new_size
        pil = pil.resize(new_size, Image.Resampling.BILINEAR)
        reencode = True

    instances, orig_only = [], []
    for inst in img.instances:
        ih, iw = (inst.height, inst.width) if inst.height and inst.width else (h, w)
        if (ih, iw) != (h, w):
            problems.append(Problem(DROP_INSTANCE, f"mask grid {ih}x{iw} != decoded image {h}x{w} (not explained by EXIF orientation)",
                                    img.source_id, inst.where))
            continue
        coco, err, repaired = _decode_mask(inst, h, w)
        if coco is None:
            problems.append(Problem(DROP_INSTANCE, err, img.source_id, inst.where, ))
            continue
        if repaired:
            what = "overlapping or unsorted runs merged (union)" if inst.kaggle_rle is not None else "invalid polygons skipped"
            problems.append(Problem(REPAIRED, what, img.source_id, inst.where, bad=False))
        labels = {"category_id": inst.category_id, "attribute_ids": list(inst.attribute_ids)}
        orig = None
        if scale is not None:
            orig, coco = coco, _resize_mask(coco, scale)
        enc = {"size": coco["size"], "counts": coco["counts"].encode("ascii")}
        area = int(mask_util.area(enc))
        if area == 0:
            bad = scale is None
            reason = "empty mask" if bad else f"mask vanished when resized to {scale[0]}x{scale[1]}"
            problems.append(Problem(DROP_INSTANCE, reason, img.source_id, inst.where, bad=bad, ))
            if orig is not None:  # still part of the original-grid ground truth
                orig_only.append({**labels, "orig_segmentation": orig})
            continue
        bbox = [int(round(v)) for v in mask_util.toBbox(enc).tolist()]
        instances.append({**labels, "bbox": bbox, "area": area, "segmentation": coco,
                          **({"orig_segmentation": orig} if orig is not None else {})})
    if not instances:
        problems.append(Problem(DROP_IMAGE, "no valid instances left", img.source_id, img.path, bad=False, instances=0))
        return out
    if reencode:
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
    out["jpg"] = data
    out["meta"] = {"image_id": img.image_id, "source_id": img.source_id, "height": pil.height, "width": pil.width,
                   "orig_height": h, "orig_width": w, "instances": instances, **({"orig_only": orig_only} if orig_only else {})}
    return out


def work(args: tuple[str, RawImage, int | None]) -> dict:
    """`process_image` for a worker pool: never raises, an unexpected error drops the image with its reason."""
    key, img, max_size = args
    try:
        return process_image(key, img, max_size)
    except Exception as e:  # a bug or an exotic file must not end a multi-hour build: report it
        reason = f"unexpected error while processing ({type(e).__name__}: {e})"
        return {"key": key, "jpg": None, "meta": None,
                "problems": [Problem(DROP_IMAGE, reason, img.source_id, img.path, instances=len(img.instances))]}
