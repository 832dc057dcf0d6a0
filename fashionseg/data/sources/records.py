"""What a source reader hands the shard builder: images with their raw instances, and problems.

Readers (kaggle.py, coco.py) do the cheap checks (columns, ids, sizes as written); the builder's
workers do the expensive ones (decode the image, the RLE or polygons). Both record problems the
same way so report.json lists every skipped or repaired row with its reason.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    format: str  # "kaggle" | "kaggle2019" | "coco"
    path: Path  # the CSV or JSON read
    vocab: Vocab
    images: list[RawImage]
    problems: list[Problem]  # found while reading (unknown ids, malformed rows)
    num_rows: int  # source instances (CSV rows / annotations), for the bad fraction


@dataclass(frozen=True)
class Problem:
    """One report entry: a source row, annotation or image skipped or repaired, and why.
    `bad` problems count towards --max-bad-fraction; repairs and deliberate skips do not."""

    action: str  # DROP_IMAGE / DROP_INSTANCE / DROP_ATTRIBUTE / REPAIRED
    reason: str
    image_id: str | None = None  # the source's name for the image (source_id), when known
    where: str | None = None  # "train.csv line 17", "annotation id 5", an image path
    bad: bool = True
    instances: int = -1  # source instances this entry lost; -1: 1 for a dropped instance, else 0

    def __post_init__(self) -> None:
        if self.instances < 0:
            object.__setattr__(self, "instances", 1 if self.action == DROP_INSTANCE else 0)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Problem":
        return cls(**d)
