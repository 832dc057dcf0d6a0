"""Kaggle iMaterialist 2020 submission files: `ImageId,EncodedPixels,ClassId,AttributesIds`.

One row per predicted instance, masks on the ORIGINAL image grid in Kaggle's column-major,
1-indexed `start length` RLE (fashionseg.data.rle.encode_kaggle), `AttributesIds` the predicted
source attribute ids joined by commas (empty when none).

Kaggle rejects overlapping masks within an image, so rows are made disjoint here: instances are
taken in descending score order and each keeps only the pixels no higher-scoring instance of the
same image has claimed (ties: the earlier detection wins). An instance left with no pixels gets
no row; an image with no detections gets no row either, unless a sample submission is given.

`--sample-submission FILE` (the competition's sample_submission.csv): the submission lists every
ImageId of FILE, in FILE's order, spelled as FILE spells it (".jpg" or not), and an image without
detections (or not among the inputs, or unreadable) gets FILE's own row(s) for it. Kaggle's file
is one placeholder row per test image (2020: EncodedPixels "1 1", ClassId 23, as the
competition's kernels copied it); copying the sample's row instead of hard-coding one keeps
whatever the competition's scorer expects for "nothing found". Images not in FILE are left out.
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

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

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


def _rows(path: Path, what: str):
    """(line number, 4 fields) of a submission-format CSV, its header checked."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SubmissionError(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    reader = csv.reader(io.StringIO(text))
    header = tuple(h.strip() for h in next(reader, None) or ())
    if header != HEADER:
        raise SubmissionError(f"{path}: header is {','.join(header) or '(empty file)'}, expected {','.join(HEADER)} "
                              "(Kaggle iMaterialist 2020's layout)")
    for line, row in enumerate(reader, start=2):
        if not row and what == "sample submission":
            continue
        if len(row) != 4:
            raise SubmissionError(f"{path} line {line}: {len(row)} fields, expected 4 ({','.join(HEADER)})")
        yield line, row


def read_submission(path: str | os.PathLike, sizes: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Read and check a submission -> [{"ImageId", "EncodedPixels", "ClassId": int, "AttributesIds": [int]}].

    With `sizes` ({ImageId: (height, width)}) every mask is also checked against its grid."""
    path = Path(path)
    rows = []
    for line, (image_id, encoded, class_id, attrs) in _rows(path, "submission"):
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


def _stem(image_id: str) -> str:
    """ImageIds compare without an image extension (Kaggle 2019 wrote "abc.jpg", 2020 "abc")."""
    p = Path(image_id)
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else image_id


def read_sample(path: str | os.PathLike) -> dict[str, list[tuple[str, str, str, str]]]:
    """A sample submission -> {ImageId as spelled there: its rows}, in file order (dicts keep it)."""
    path = Path(path)
    out: dict[str, list[tuple[str, str, str, str]]] = {}
    for line, row in _rows(path, "sample submission"):
        if not row[0].strip():
            raise SubmissionError(f"{path} line {line}: empty ImageId")
        out.setdefault(row[0].strip(), []).append((row[0].strip(), row[1], row[2], row[3]))
    if not out:
        raise SubmissionError(f"{path}: no rows after the header")
    stems: dict[str, str] = {}
    for image_id in out:
        if _stem(image_id) in stems:
            raise SubmissionError(f"{path}: ImageIds {stems[_stem(image_id)]!r} and {image_id!r} name the same image")
        stems[_stem(image_id)] = image_id
    return out


def align_to_sample(rows: Iterable[tuple[str, str, str, str]], sample: dict[str, list[tuple[str, str, str, str]]],
                    predicted: Iterable[str]) -> tuple[list[tuple], dict]:
    """Our rows (of the `predicted` ImageIds) -> the sample's ImageIds in its order (module
    docstring), and a report {"images", "placeholder": ImageIds given the sample's row,
    "not_predicted": sample ImageIds not among `predicted`, "extra": predicted ones not in the sample}."""
    ours: dict[str, list[tuple]] = {}
    for row in rows:
        ours.setdefault(_stem(row[0]), []).append(row)
    predicted = {_stem(p) for p in predicted}
    in_sample = {_stem(i) for i in sample}
    out, placeholder = [], []
    for image_id, sample_rows in sample.items():
        mine = ours.get(_stem(image_id))
        if mine:
            out += [(image_id, *r[1:]) for r in mine]
        else:
            out += sample_rows
            placeholder.append(image_id)
    return out, {"images": len(sample), "placeholder": placeholder,
                 "not_predicted": [i for i in sample if _stem(i) not in predicted],
                 "extra": sorted(predicted - in_sample)}
