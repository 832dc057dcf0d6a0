"""Read the Kaggle iMaterialist (Fashion) 2020 layout (FORMATS.md section 1) into records.

SRC/train.csv (one row per instance), SRC/label_descriptions.json, SRC/train/<ImageId>.jpg.
Row-level problems (bad numbers, unknown class or attribute ids, empty masks) are recorded
here; image and RLE problems are found by the builder's workers when they decode.
"""
from __future__ import annotations

import csv
from pathlib import Path

from fashionseg.data.sources.records import (
    DROP_ATTRIBUTE, DROP_INSTANCE, RawImage, RawInstance, Source, SourceError, problem,
)
from fashionseg.data.vocab import Vocab, VocabError

COLUMNS = ("ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds")


def looks_like(src: Path) -> bool:
    return (src.is_dir() and (src / "train.csv").is_file()) or (src.is_file() and src.suffix.lower() == ".csv")


def _int(text: str) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def read(src: str | Path, images_dir: str | Path | None = None) -> Source:
    """SRC is the dataset folder (or its train.csv). Raises SourceError on fatal input."""
    src = Path(src)
    csv_path = src if src.is_file() else src / "train.csv"
    root = csv_path.parent
    if not csv_path.is_file():
        raise SourceError(f"{csv_path}: no train.csv; point SRC at the Kaggle folder holding train.csv, label_descriptions.json and train/")
    vocab_path = root / "label_descriptions.json"
    if not vocab_path.is_file():
        raise SourceError(f"{vocab_path}: no vocabulary; copy the competition's label_descriptions.json beside train.csv")
    try:
        vocab = Vocab.from_file(vocab_path)
    except VocabError as e:
        raise SourceError(f"{e}; use the competition's label_descriptions.json") from e
    image_dir = Path(images_dir) if images_dir else root / "train"

    csv.field_size_limit(1 << 30)  # EncodedPixels of large masks exceed csv's 128 KiB default
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            return _read_rows(reader, csv_path, vocab, image_dir)
        except (csv.Error, UnicodeDecodeError) as e:
            raise SourceError(f"{csv_path} line {reader.line_num}: not readable as CSV ({e}); re-export it as UTF-8 CSV") from e


def _read_rows(reader: csv.DictReader, csv_path: Path, vocab: Vocab, image_dir: Path) -> Source:
    problems: list[dict] = []
    images: dict[str, RawImage] = {}
    num_rows = 0
    header = reader.fieldnames or []
    for col in COLUMNS:
        if col not in header:
            raise SourceError(f"{csv_path}: column '{col}' is missing (header is {','.join(header) or 'empty'}); "
                              f"train.csv needs {','.join(COLUMNS)}")
    for row in reader:
        num_rows += 1
        where = f"{csv_path.name} line {reader.line_num}"
        image_id = (row.get("ImageId") or "").strip()
        if not image_id:
            problems.append(problem(DROP_INSTANCE, "empty ImageId", None, where))
            continue
        h, w, cls = _int(row["Height"]), _int(row["Width"]), _int(row["ClassId"])
        if h is None or w is None or h <= 0 or w <= 0:
            problems.append(problem(DROP_INSTANCE, f"bad Height/Width {row['Height']!r}x{row['Width']!r}", image_id, where))
            continue
        img = images.get(image_id)
        if img is None:
            img = images[image_id] = RawImage(image_id, str(image_dir / f"{image_id}.jpg"), h, w)
        if cls is None or not vocab.has_category(cls):
            problems.append(problem(DROP_INSTANCE, f"unknown ClassId {row['ClassId']!r}", image_id, where))
            continue
        encoded = (row.get("EncodedPixels") or "").strip()
        if not encoded:
            problems.append(problem(DROP_INSTANCE, "empty EncodedPixels", image_id, where))
            continue
        attrs: list[int] = []
        for tok in (row.get("AttributesIds") or "").replace(" ", "").split(","):
            if not tok:
                continue
            a = _int(tok)
            if a is None or not vocab.has_attribute(a):
                problems.append(problem(DROP_ATTRIBUTE, f"unknown attribute id {tok!r} (instance kept)", image_id, where, bad=False))
                continue
            attrs.append(a)
        img.instances.append(RawInstance(where, cls, sorted(set(attrs)), h, w, kaggle_rle=encoded))
    return Source("kaggle", csv_path, vocab, list(images.values()), problems, num_rows)
