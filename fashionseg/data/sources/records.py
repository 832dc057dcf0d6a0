"""What a source reader hands the shard builder: images with their raw instances, and problems.

Readers (kaggle.py, coco.py) do the cheap checks (columns, ids, sizes as written); the builder's
workers do the expensive ones (decode the image, the RLE or polygons). Both record problems the
same way so report.json lists every skipped or repaired row with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fashionseg.data.vocab import Vocab

# Problem actions.
DROP_IMAGE = "dropped image"
DROP_INSTANCE = "dropped instance"
DROP_ATTRIBUTE = "dropped attribute"
REPAIRED = "repaired"


class SourceError(ValueError):
    """Fatal input: nothing sensible can be built (message names the path and what to do)."""


@dataclass
class RawInstance:
    where: str  # locator for the report: "train.csv row 17" / "annotation id 5"
    category_id: int
    attribute_ids: list[int]
    height: int  # the grid the mask is defined on, as the source states it
    width: int
    kaggle_rle: str | None = None  # Kaggle EncodedPixels (column-major, 1-based)
    segmentation: Any = None  # COCO polygons / RLE dict


@dataclass
class RawImage:
    source_id: str  # the source's name for the image: Kaggle ImageId, COCO file_name without extension
    path: str
    height: int | None  # size the source states (None when the source does not say)
    width: int | None
    instances: list[RawInstance] = field(default_factory=list)
    image_id: int = 0  # integer id: COCO images[].id, or assigned by the reader (docs/formats.md "Image ids")


@dataclass
class Source:
    format: str  # "kaggle" | "coco"
    path: Path  # the CSV or JSON read
    vocab: Vocab
    images: list[RawImage]
    problems: list[dict]  # found while reading (unknown ids, malformed rows)
    num_rows: int  # source instances (CSV rows / annotations), for the bad fraction


def problem(action: str, reason: str, image_id: str | None = None, where: str | None = None, bad: bool = True) -> dict:
    """One report entry. `bad` problems count towards --max-bad-fraction; repairs do not."""
    p = {"action": action, "reason": reason}
    if image_id is not None:
        p["image_id"] = image_id
    if where is not None:
        p["where"] = where
    p["bad"] = bad
    return p
