"""Sample keys and the train/val split of a source's images (deterministic for a seed)."""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

from fashionseg.data.shards import manifest as manifest_lib
from fashionseg.data.sources.records import RawImage


def assign_keys(images: list[RawImage]) -> list[str]:
    seen: set[str] = set()
    keys = []
    for img in images:
        key = base = manifest_lib.safe_key(img.source_id)
        n = 1
        while key in seen:
            key = f"{base}_{n}"
            n += 1
        seen.add(key)
        keys.append(key)
    return keys


def rank(seed: int, text: str) -> str:
    return hashlib.sha1(f"{seed}:{text}".encode("utf-8")).hexdigest()


def stratified_split(cats: list[set[int]], ids: list[str], val_fraction: float, seed: int) -> list[str]:
    """Per-image 'train'/'val', deterministic; each category gets about val_fraction of its images
    in val, and a category with >= 2 images lands in both splits (iterative stratification:
    rarest category first, each image goes where that category is needed most).

    With val_fraction > 0 and >= 2 images neither split is ever empty: per-category rounding
    can send every image one way (2 images of different categories at 0.5: round(0.5) == 0), so
    one image then moves over, the first in seed order whose categories all stay in the split it
    leaves (else simply the first)."""
    n = len(ids)
    if val_fraction <= 0 or n < 2:
        return ["train"] * n
    count = Counter(c for cs in cats for c in cs)
    need = {"val": {}, "train": {}}
    for c, k in count.items():
        v = round(k * val_fraction)
        if k >= 2:
            v = min(max(v, 1), k - 1)
        need["val"][c], need["train"][c] = v, k - v
    total = {"val": round(n * val_fraction), "train": n - round(n * val_fraction)}
    total["val"] = min(max(total["val"], 1), n - 1)
    total["train"] = n - total["val"]
    order = sorted(range(n), key=lambda i: rank(seed, ids[i]))
    split: list[str | None] = [None] * n
    by_cat: dict[int, list[int]] = defaultdict(list)
    for i in order:
        for c in cats[i]:
            by_cat[c].append(i)
    remaining = dict(count)

    def place(i: int, c: int | None) -> None:
        if c is not None and need["val"][c] != need["train"][c]:
            s = "val" if need["val"][c] > need["train"][c] else "train"
        else:  # tie: the split furthest from its overall share
            s = "val" if total["val"] / (n * val_fraction) > total["train"] / (n * (1 - val_fraction)) else "train"
        split[i] = s
        total[s] -= 1
        for cc in cats[i]:
            need[s][cc] -= 1
            remaining[cc] -= 1

    while True:
        live = [(k, c) for c, k in remaining.items() if k > 0]
        if not live:
            break
        _, c = min(live)
        for i in by_cat[c]:
            if split[i] is None:
                place(i, c)
    for i in order:  # images without categories
        if split[i] is None:
            place(i, None)
    _never_empty(split, cats, order)  # type: ignore[arg-type]
    return split  # type: ignore[return-value]


def _never_empty(split: list[str], cats: list[set[int]], order: list[int]) -> None:
    for empty, full in (("val", "train"), ("train", "val")):
        if empty in split:
            continue
        left = Counter(c for cs in cats for c in cs)  # every image is in `full`
        movable = [i for i in order if all(left[c] >= 2 for c in cats[i])]
        split[(movable or order)[0]] = empty
