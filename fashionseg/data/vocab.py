"""Category and attribute vocabularies, and the contiguous indices the model uses.

Source ids are sparse (attributes 0..340 with gaps) and differ between releases
(46/294 for 2020, 48/320 for older Fashionpedia files), so counts are never hard-coded:
they come from the file a dataset ships or from a shard manifest.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


class VocabError(ValueError):
    pass


@dataclass(frozen=True)
class Vocab:
    categories: list[dict]  # [{id, name, supercategory, level}] in source order
    attributes: list[dict]
    _cat_index: dict[int, int] = field(init=False, repr=False, compare=False)
    _attr_index: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for kind, items in (("categories", self.categories), ("attributes", self.attributes)):
            if any(not isinstance(it, dict) for it in items):
                raise VocabError(f"every entry of '{kind}' must be an object with an 'id'")
            ids = [it.get("id") for it in items]
            bad = [i for i, v in enumerate(ids) if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                raise VocabError(f"{kind}[{bad[0]}] needs an integer 'id' (has {ids[bad[0]]!r})")
            dup = sorted(k for k, n in Counter(ids).items() if n > 1)
            if dup:
                raise VocabError(f"duplicate ids in '{kind}': {', '.join(map(str, dup[:10]))}")
        object.__setattr__(self, "_cat_index", {c["id"]: i + 1 for i, c in enumerate(self.categories)})
        object.__setattr__(self, "_attr_index", {a["id"]: i for i, a in enumerate(self.attributes)})

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Vocab":
        if not isinstance(d, dict) or not isinstance(d.get("categories"), list) or not d["categories"]:
            raise VocabError(f"{source}: no 'categories' list: this is not a label vocabulary")
        if not isinstance(d.get("attributes") or [], list):
            raise VocabError(f"{source}: 'attributes' is not a list")
        try:
            return cls(list(d["categories"]), list(d.get("attributes") or []))
        except VocabError as e:
            raise VocabError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VocabError(f"{path}: cannot read the vocabulary ({e})") from e
        return cls.from_dict(d, str(path))

    @classmethod
    def default(cls) -> "Vocab":
        """The real 2020 vocabulary (46 categories, 294 attributes) shipped in the package."""
        text = resources.files("fashionseg.data").joinpath("label_descriptions.json").read_text()
        return cls.from_dict(json.loads(text), "fashionseg/data/label_descriptions.json")

    def to_dict(self) -> dict[str, list[dict]]:
        return {"categories": self.categories, "attributes": self.attributes}

    # -- indices ------------------------------------------------------------------------------
    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def num_classes(self) -> int:
        """Categories + background: the size of the detector's class head."""
        return len(self.categories) + 1

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    def has_category(self, cat_id: int) -> bool:
        return cat_id in self._cat_index

    def has_attribute(self, attr_id: int) -> bool:
        return attr_id in self._attr_index

    def category_index(self, cat_id: int) -> int:
        """Source category id -> contiguous label 1..C (0 is background)."""
        return self._cat_index[cat_id]

    def category_id(self, index: int) -> int:
        return self.categories[index - 1]["id"]

    def attribute_index(self, attr_id: int) -> int:
        """Source attribute id -> contiguous index 0..A-1."""
        return self._attr_index[attr_id]

    def attribute_id(self, index: int) -> int:
        return self.attributes[index]["id"]

    def category_name(self, cat_id: int) -> str:
        return self.categories[self._cat_index[cat_id] - 1]["name"]

    def attribute_name(self, attr_id: int) -> str:
        return self.attributes[self._attr_index[attr_id]]["name"]
