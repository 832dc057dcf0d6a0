"""Run-length encodings: Kaggle's column-major `start length` pairs and COCO compressed RLE.

Kaggle numbers pixels from 1, top to bottom first, then left to right (pixel = x*H + y + 1).
COCO RLE also runs in column-major order, as alternating 0/1 run lengths that start with 0s.
So the two convert into each other exactly, without ever materialising the mask; a decoder
that gets the transpose wrong yields a plausible but wrong mask, which the tests guard against.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util


class RLEError(ValueError):
    """An encoding that cannot describe a mask on its grid (the message says why)."""


def parse_kaggle(encoded: str, height: int, width: int) -> tuple[np.ndarray, bool]:
    """`start length ...` -> (runs as an int64 array [K, 2] of 0-based start/length, repaired).

    Raises RLEError for malformed text, non-positive lengths or runs that leave the grid.
    Unsorted or overlapping runs are merged (their union is the mask) and `repaired` is True.
    """
    if height <= 0 or width <= 0:
        raise RLEError(f"bad grid {height}x{width}")
    parts = str(encoded).split()
    if not parts:
        raise RLEError("empty EncodedPixels")
    if len(parts) % 2:
        raise RLEError(f"odd number of values ({len(parts)}): EncodedPixels must be 'start length' pairs")
    try:
        runs = np.asarray(parts, dtype=np.int64).reshape(-1, 2)
    except ValueError as e:
        raise RLEError(f"non-integer value in EncodedPixels ({e})") from None
    except OverflowError:
        raise RLEError("a value in EncodedPixels is too large for any image") from None
    starts, lengths = runs[:, 0] - 1, runs[:, 1]
    if (lengths <= 0).any():
        raise RLEError("a run has length <= 0")
    if (starts < 0).any():
        raise RLEError("a run starts before pixel 1")
    total = height * width
    if (starts >= total).any() or (lengths > total).any():  # checked first: start + length could wrap int64
        raise RLEError(f"a run leaves the {height}x{width} grid (a start or length exceeds {total} pixels)")
    if (starts + lengths > total).any():
        raise RLEError(f"a run leaves the {height}x{width} grid (last pixel {int((starts + lengths).max())} > {total})")
    order = np.argsort(starts, kind="stable")
    starts, lengths = starts[order], lengths[order]
    ends = starts + lengths
    repaired = bool((order != np.arange(len(order))).any())
    if len(starts) > 1 and (starts[1:] <= ends[:-1]).any():
        # overlapping or touching runs: merge into their union
        repaired = repaired or bool((starts[1:] < ends[:-1]).any())
        merged_s, merged_e = [int(starts[0])], [int(ends[0])]
        for s, e in zip(starts[1:].tolist(), ends[1:].tolist()):
            if s <= merged_e[-1]:
                merged_e[-1] = max(merged_e[-1], e)
            else:
                merged_s.append(s)
                merged_e.append(e)
        starts, ends = np.asarray(merged_s, np.int64), np.asarray(merged_e, np.int64)
        lengths = ends - starts
    return np.stack([starts, lengths], axis=1), repaired


def runs_to_counts(runs: np.ndarray, height: int, width: int) -> list[int]:
    """Sorted, disjoint 0-based runs -> COCO uncompressed counts (alternating 0s/1s, 0s first)."""
    counts: list[int] = []
    pos = 0
    for s, n in runs.tolist():
        counts.append(s - pos)
        counts.append(n)
        pos = s + n
    if height * width - pos > 0 or not counts:  # pycocotools ends on the last non-empty run
        counts.append(height * width - pos)
    return counts


def counts_to_coco(counts: list[int], height: int, width: int) -> dict:
    """Uncompressed counts -> COCO compressed RLE with a str `counts` (JSON-safe)."""
    rle = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def kaggle_to_coco(encoded: str, height: int, width: int) -> tuple[dict, bool]:
    """Kaggle `EncodedPixels` -> (COCO compressed RLE, repaired), bit-exact, no mask decode."""
    runs, repaired = parse_kaggle(encoded, height, width)
    return counts_to_coco(runs_to_counts(runs, height, width), height, width), repaired


def decode_kaggle(encoded: str, height: int, width: int) -> np.ndarray:
    """Kaggle `EncodedPixels` -> uint8 mask [H, W] (reference decoder, plain numpy)."""
    runs, _ = parse_kaggle(encoded, height, width)
    flat = np.zeros(height * width, dtype=np.uint8)
    for s, n in runs.tolist():
        flat[s : s + n] = 1
    return flat.reshape(width, height).T.copy()


def encode_kaggle(mask: np.ndarray) -> str:
    """uint8/bool mask [H, W] -> Kaggle `EncodedPixels` ('' for an empty mask)."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist()))


def encode_coco(mask: np.ndarray) -> dict:
    """uint8/bool mask [H, W] -> COCO compressed RLE with a str `counts`."""
    return _json_rle(mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8))))


def encode_coco_many(masks: np.ndarray) -> list[dict]:
    """uint8/bool masks [N, H, W] -> COCO compressed RLEs with str `counts` (one pycocotools call)."""
    if len(masks) == 0:
        return []
    stacked = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))
    return [_json_rle(r) for r in mask_util.encode(stacked)]


def _json_rle(rle: dict) -> dict:
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_coco(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes or uncompressed list counts) -> uint8 mask [H, W]."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_util.frPyObjects(rle, h, w)
    elif isinstance(counts, str):
        rle = {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_util.decode(rle)
