"""Read the Kaggle iMaterialist layouts (docs/formats.md, "Kaggle") into records.

SRC/train.csv (one row per instance), SRC/label_descriptions.json, SRC/train/<ImageId>.jpg.
2020 (`kaggle`): columns ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds.
2019 (`kaggle2019`, iMaterialist FGVC6): no AttributesIds column; ClassId `6_28_77` is category 6
with attributes 28 and 77; ImageIds may carry `.jpg`. Auto-detected: a CSV without an
AttributesIds column is read with 2019 ClassIds.
Row-level problems (bad numbers, unknown class or attribute ids, empty masks) are recorded
here; image and RLE problems are found by the builder's workers when they decode.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from fashionseg.data.sources.records import (
    DROP_ATTRIBUTE, DROP_INSTANCE, RawImage, RawInstance, Source, Problem, SourceError,
)
from fashionseg.data.vocab import Vocab, VocabError

COLUMNS = ("ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds")


def looks_like(src: Path) -> bool:
    return (src.is_dir() and (src / "train.csv").is_file()) or (src.is_file() and src.suffix.lower() == ".csv")


def _int(text: str) -> int | None:
    """An integer field; integral floats ("512.0", as pandas writes int columns with gaps) count."""
    t = str(text).strip()
    if "_" in t:  # int() reads "6_28" as 628: a 2019 ClassId must never pass as a number
        return None
    try:
        return int(t)
    except (TypeError, ValueError):
        pass
    try:
        f = float(t)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() else None


_EMPTY_ATTRS = {"", "nan", "none", "null", "[]"}  # how spreadsheet/pandas exports spell "no attributes"


def read(src: str | Path, images_dir: str | Path | None = None, layout: str | None = None) -> Source:
    """SRC is the dataset folder (or its train.csv); layout "kaggle" (2020), "kaggle2019" or None
    (from the header). Raises SourceError on fatal input."""
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
            source = _read_rows(reader, csv_path, vocab, image_dir, layout)
        except UnicodeDecodeError as e:
            raise SourceError(f"{csv_path}: not UTF-8 text (byte {e.object[e.start]:#04x}); "
                              "re-export it as UTF-8 CSV") from e
        except csv.Error as e:
            raise SourceError(f"{csv_path} line {reader.line_num}: not readable as CSV ({e}); re-export it as UTF-8 CSV") from e
    _resolve_images(source, image_dir)
    return source


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _resolve_images(source: Source, image_dir: Path) -> None:
    """Point each image at its file: `<ImageId>.jpg`, else `<ImageId>` when the CSV's ids carry their
    extension, else `<ImageId>.<other image extension>` (any case). Missing files stay missing: the
    builder reports them per image. Raises SourceError when the folder holds none of them."""
    if not source.images:
        return
    if not image_dir.is_dir():
        raise SourceError(f"{image_dir}: no image folder (nothing valid to build); the Kaggle layout keeps images in "
                          "SRC/train/<ImageId>.jpg: pass the folder holding them with --images DIR")
    by_stem: dict[str, str] | None = None
    found = 0
    for img in source.images:
        if Path(img.path).is_file():
            found += 1
            continue
        if by_stem is None:  # listed once, only when some file is not where the layout says
            by_stem = {}
            for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in IMAGE_SUFFIXES:
                    by_stem.setdefault(stem, entry.name)
        direct = image_dir / img.source_id
        name = img.source_id if Path(img.source_id).suffix.lower() in IMAGE_SUFFIXES and direct.is_file() else by_stem.get(img.source_id)
        if name is not None:
            img.path = str(image_dir / name)
            found += 1
    if found == 0:
        raise SourceError(f"{image_dir}: none of the {len(source.images)} images listed in {source.path.name} is here "
                          f"(e.g. {source.images[0].source_id}.jpg; nothing valid to build); pass the folder holding them with --images DIR")


def _read_rows(reader: csv.DictReader, csv_path: Path, vocab: Vocab, image_dir: Path, layout: str | None) -> Source:
    problems: list[Problem] = []
    images: dict[str, RawImage] = {}
    named: set[str] = set()  # every ImageId of the CSV, for the integer ids
    num_rows = 0
    # tolerate " EncodedPixels" and quoted/padded header names
    reader.fieldnames = [(h or "").strip() for h in (reader.fieldnames or [])]
    header = reader.fieldnames
    for col in COLUMNS[:-1]:
        if col not in header:
            raise SourceError(f"{csv_path}: column '{col}' is missing (header is {','.join(header) or 'empty'}); "
                              f"train.csv needs {','.join(COLUMNS)}")
    has_attrs = "AttributesIds" in header
    if layout == "kaggle2019" and has_attrs:
        raise SourceError(f"{csv_path}: has an AttributesIds column, so it is the 2020 layout, not 2019; build with --format kaggle")
    in_classid = not has_attrs and layout != "kaggle"  # 2019: attributes ride in ClassId
    looks_2019 = layout == "kaggle2019"
    for row in reader:
        num_rows += 1
        where = f"{csv_path.name} line {reader.line_num}"
        image_id = (row.get("ImageId") or "").strip()
        if not image_id:
            problems.append(Problem(DROP_INSTANCE, "empty ImageId", None, where))
            continue
        named.add(image_id)
        class_text = (row.get("ClassId") or "").strip()
        cls_part, _, attr_part = class_text.partition("_")
        looks_2019 = looks_2019 or bool(attr_part) or Path(image_id).suffix.lower() in IMAGE_SUFFIXES
        h, w, cls = _int(row["Height"]), _int(row["Width"]), _int(cls_part)
        if h is None or w is None or h <= 0 or w <= 0:
            problems.append(Problem(DROP_INSTANCE, f"bad Height/Width {row['Height']!r}x{row['Width']!r}", image_id, where))
            continue
        img = images.get(image_id)
        if img is None:
            img = images[image_id] = RawImage(image_id, str(image_dir / f"{image_id}.jpg"), h, w)
        if attr_part and not in_classid:
            problems.append(Problem(DROP_INSTANCE, f"ClassId {class_text!r} carries attribute ids (the Kaggle 2019 layout); "
                                                   "build with --format kaggle2019 (or auto)", image_id, where))
            continue
        if cls is None or not vocab.has_category(cls):
            problems.append(Problem(DROP_INSTANCE, f"unknown ClassId {row['ClassId']!r}", image_id, where))
            continue
        encoded = (row.get("EncodedPixels") or "").strip()
        if not encoded:
            problems.append(Problem(DROP_INSTANCE, "empty EncodedPixels", image_id, where))
            continue
        if in_classid:
            tokens = attr_part.split("_") if attr_part else []
        else:
            attr_text = "".join((row.get("AttributesIds") or "").split())
            tokens = [] if attr_text.lower() in _EMPTY_ATTRS else attr_text.strip("[]").split(",")
        attrs: list[int] = []
        for tok in tokens:
            if not tok:
                if in_classid:  # "6__28" or "6_": an empty field between underscores
                    problems.append(Problem(DROP_ATTRIBUTE, f"empty attribute id in ClassId {class_text!r} (instance kept)",
                                            image_id, where, bad=False))
                continue
            a = _int(tok)
            if a is None or not vocab.has_attribute(a):
                problems.append(Problem(DROP_ATTRIBUTE, f"unknown attribute id {tok!r} (instance kept)", image_id, where, bad=False))
                continue
            attrs.append(a)
        img.instances.append(RawInstance(where, cls, sorted(set(attrs)), h, w, kaggle_rle=encoded))
    assign_ids(images.values(), named)
    fmt = "kaggle2019" if in_classid and looks_2019 else "kaggle"
    if not has_attrs and fmt == "kaggle":  # e.g. a category-only export: train without attribute labels
        problems.insert(0, Problem(DROP_ATTRIBUTE, "no AttributesIds column: every instance has no attributes", None,
                                   csv_path.name, bad=False))
    return Source(fmt, csv_path, vocab, list(images.values()), problems, num_rows)


def assign_ids(images, names: set[str]) -> None:
    """Kaggle ImageIds are strings: image `i` of the sorted distinct ImageIds of the CSV gets
    integer id i + 1, whatever the row order and whichever rows turn out bad."""
    ids = {name: i + 1 for i, name in enumerate(sorted(names))}
    for img in images:
        img.image_id = ids[img.source_id]
