"""Kaggle iMaterialist 2020 submission files: `ImageId,EncodedPixels,ClassId,AttributesIds`.

One row per predicted instance, masks on the ORIGINAL image grid in Kaggle's column-major,
1-indexed `start length` RLE (fashionseg.data.rle.encode_kaggle), `AttributesIds` the predicted
source attribute ids joined by commas (empty when none).

Kaggle rejects overlapping masks within an image, so rows are made disjoint here: instances are
taken in descending score order and each keeps only the pixels no higher-scoring instance of the
same image has claimed (ties: the earlier detection wins). An instance left with no pixels gets
no row; an image with no detections gets no row either.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fashionseg.data.rle import RLEError, decode_coco, encode_kaggle, parse_kaggle
from fashionseg.io import atomic_write_text

HEADER = ("ImageId", "EncodedPixels", "ClassId", "AttributesIds")


class SubmissionError(ValueError):
    """A submission file that does not follow the Kaggle format (the message names the row)."""


def disjoint_masks(masks: list[np.ndarray], scores: list[float]) -> list[np.ndarray]:
    """Masks [H, W] -> the same masks with overlaps given to the higher score (input order kept)."""
    order = sorted(range(len(masks)), key=lambda i: -scores[i])  # sorted() is stable: ties keep order
    out: list[np.ndarray | None] = [None] * len(masks)
    taken = None
    for i in order:
        m = np.asarray(masks[i]).astype(bool)
        if taken is None:
            taken = np.zeros_like(m)
        out[i] = (m & ~taken).astype(np.uint8)
        taken |= m
    return out  # type: ignore[return-value]


def image_rows(image_key: str, results: list[dict]) -> list[tuple[str, str, str, str]]:
    """One image's results (COCO RLE masks on its original grid) -> submission rows, disjoint."""
    if not results:
        return []
    masks = [decode_coco(r["segmentation"]) for r in results]
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise SubmissionError(f"image {image_key}: masks on different grids {sorted(shapes)}")
    masks = disjoint_masks(masks, [float(r["score"]) for r in results])
    rows = []
    for i in sorted(range(len(results)), key=lambda i: -float(results[i]["score"])):
        if not masks[i].any():
            continue
        r = results[i]
        rows.append((str(image_key), encode_kaggle(masks[i]), str(int(r["category_id"])),
                     ",".join(str(int(a)) for a in sorted(r.get("attribute_ids") or []))))
    return rows


def write_submission(path: str | os.PathLike, rows: Iterable[tuple[str, str, str, str]]) -> int:
    """Write rows (atomically) under the Kaggle header; returns the number of rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    n = 0
    for row in rows:
        w.writerow(row)
        n += 1
    atomic_write_text(path, buf.getvalue())
    return n


def read_submission(path: str | os.PathLike, sizes: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Read and check a submission -> [{"ImageId", "EncodedPixels", "ClassId": int, "AttributesIds": [int]}].

    With `sizes` ({ImageId: (height, width)}) every mask is also checked against its grid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SubmissionError(f"{path}: cannot read ({e})") from e
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        raise SubmissionError(f"{path}: header is {header}, expected {','.join(HEADER)}")
    rows = []
    for line, row in enumerate(reader, start=2):
        if len(row) != 4:
            raise SubmissionError(f"{path} line {line}: {len(row)} fields, expected 4 ({','.join(HEADER)})")
        image_id, encoded, class_id, attrs = row
        try:
            cls = int(class_id)
            attr_ids = [int(a) for a in attrs.split(",")] if attrs.strip() else []
        except ValueError:
            raise SubmissionError(f"{path} line {line}: ClassId/AttributesIds must be integers, got {class_id!r}/{attrs!r}") from None
        if sizes is not None:
            if image_id not in sizes:
                raise SubmissionError(f"{path} line {line}: unknown ImageId {image_id!r}")
            try:
                parse_kaggle(encoded, *sizes[image_id])
            except RLEError as e:
                raise SubmissionError(f"{path} line {line} ({image_id}): bad EncodedPixels: {e}") from None
        rows.append({"ImageId": image_id, "EncodedPixels": encoded, "ClassId": cls, "AttributesIds": attr_ids})
    return rows
