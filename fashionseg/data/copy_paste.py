"""Instance copy-paste (Ghiasi et al. 2021, "Simple Copy-Paste"): `data.copy_paste=<prob>`.

With probability `prob` a training sample gets instances of a partner sample pasted on top.
Why it is built this way:
- The partner and everything random about the paste (whether to paste, which partner instances)
  come from (seed, epoch, key) and the epoch's sample set (the split's pool) only, never from the
  rank, world size, batch or worker count: `load_batch(keys, epoch)` (hard-mining replay) and a
  resume on another layout re-make exactly the same tensors. The draws use their own hash stream,
  so a sample's own augmentation (transforms.aug_params) is the same with and without the feature,
  and `prob=0` never builds this object (bit-identical to the feature absent).
- The partner is decoded with its own (seed, epoch, partner key) augmentation (flip, jitter) but
  straight at the target's output size (resize in the RLE domain, as every sample): the paste is
  at the same scale and position, no second resize of painted masks. A random non-empty subset of
  its instances is pasted (each kept with probability 1/2, as Ghiasi et al. pick a subset).
- Masks stay exact: pasted pixels leave every mask beneath; pasted masks are the partner's masks
  bit for bit; boxes are recomputed from the masks (exclusive max edges, as transforms.mask_runs);
  an occluded instance whose visible area falls under `min_area` pixels is dropped with its label
  and attributes (a sliver is no longer an object a detector can learn; instances that were not
  covered are never dropped). No blending: a hard edge, like Ghiasi et al.'s default.
- It works on what workers send (`SampleTransform.decode`: uint8 image, MaskRuns) and returns the
  same kinds, so the loader's output keeps its dtypes and memory layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashionseg.data.plan import Pool
from fashionseg.data.shards.reader import read_samples
from fashionseg.data.transforms import MaskRuns, SampleTransform, sample_rng


@dataclass
class PasteDraw:
    """What a sample gets in one epoch: the partner's pool index and a draw per partner instance."""

    partner: int
    keep: np.ndarray  # float [64] uniform draws; partner instance j is pasted when keep[j % 64] < 0.5
    first: float  # picks the one pasted instance when the draws pick none


def paste_draw(seed: int, epoch: int, key: str, index: int, pool_size: int, prob: float) -> PasteDraw | None:
    """None (no paste) or the paste of sample `key` (pool index `index`) in `epoch`: a pure function."""
    if prob <= 0 or pool_size < 2:
        return None
    rng = sample_rng(seed, epoch, f"copy_paste:{key}")
    u = rng.random(2)
    if u[0] >= prob:
        return None
    partner = int(u[1] * (pool_size - 1))  # any other sample of the pool, uniformly
    partner += partner >= index
    return PasteDraw(partner, rng.random(64), float(rng.random()))


def runs_of(masks: np.ndarray, height: int, width: int) -> MaskRuns:
    """bool [K, W, H] -> MaskRuns (alternate 0/1 run lengths from a 0-run, as transforms.mask_runs)."""
    flat = masks.reshape(-1)
    if flat.size == 0:
        return MaskRuns(np.zeros(1, np.int64), 0, height, width)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    lens = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat[0]:
        lens = np.concatenate([[0], lens])
    return MaskRuns(lens.astype(np.int32 if flat.size < 2**31 else np.int64), masks.shape[0], height, width)


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """bool [K, W, H] -> float32 [K, 4] xyxy with exclusive max edges (empty masks: zeros)."""
    cols, rows = masks.any(2), masks.any(1)  # [K, W], [K, H]
    boxes = np.stack([cols.argmax(1), rows.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1),
                      rows.shape[1] - rows[:, ::-1].argmax(1)], axis=1).astype(np.float32)
    boxes[~cols.any(1)] = 0
    return boxes.reshape(-1, 4)


def paste(img: np.ndarray, wire: dict, src_img: np.ndarray, src: dict, chosen: np.ndarray, min_area: int) -> tuple[np.ndarray, dict]:
    """Paste instances `chosen` of (src_img, src) onto (img, wire) (both `SampleTransform.decode`
    outputs of one size). Returns the new pair; `wire` keeps its key, image id and original size."""
    masks, pasted = wire["masks"].planes(), src["masks"].planes()[chosen]
    cover = pasted.any(0)  # [W, H]
    out = img.copy()
    out[:, cover.T] = src_img[:, cover.T]
    before = masks.sum((1, 2))
    masks &= ~cover
    after = masks.sum((1, 2))
    keep = (after == before) | (after >= min_area)  # uncovered instances always stay
    all_masks = np.concatenate([masks[keep], pasted])
    return out, {
        **wire,
        "boxes": boxes_of(all_masks),
        "labels": np.concatenate([wire["labels"][keep], src["labels"][chosen]]),
        "masks": runs_of(all_masks, wire["masks"].height, wire["masks"].width),
        "attributes": np.concatenate([wire["attributes"][keep], src["attributes"][chosen]]),
    }


@dataclass
class CopyPaste:
    """Applies copy-paste to decoded samples of one split (picklable: it travels to loader workers)."""

    prob: float
    min_area: int
    shard_dir: Path
    pool: Pool
    transform: SampleTransform

    def __post_init__(self) -> None:
        self._index = {k: i for i, k in enumerate(self.pool.keys)}

    def partner(self, key: str, epoch: int, size: tuple[int, int]) -> tuple[np.ndarray, dict, np.ndarray] | None:
        """None, or what sample `key` gets pasted in `epoch`: the partner decoded at `size` (its image,
        its wire dict) and the indices of the partner instances to paste."""
        draw = paste_draw(self.transform.seed, epoch, key, self._index[key], len(self.pool), self.prob)
        if draw is None:
            return None
        pkey, jpg, meta = read_samples(self.shard_dir, self.pool, [draw.partner])[draw.partner]
        src_img, src = self.transform.decode(pkey, jpg, meta, epoch=epoch, image_id=draw.partner, size=size)
        n = src["masks"].count
        if n == 0:
            return None
        chosen = np.flatnonzero(draw.keep[np.arange(n) % draw.keep.size] < 0.5)
        if chosen.size == 0:
            chosen = np.array([min(int(draw.first * n), n - 1)])
        return src_img, src, chosen

    def __call__(self, decoded: tuple[np.ndarray, dict], epoch: int) -> tuple[np.ndarray, dict]:
        img, wire = decoded
        got = self.partner(wire["key"], epoch, tuple(img.shape[1:]))
        return decoded if got is None else paste(img, wire, *got, self.min_area)
