"""Decode a shard sample into a training pair: image tensor + torchvision detection target.

Why it is built this way (figures in bench/loader.py):
- JPEG: `torchvision.io.decode_image` (libjpeg-turbo) then torchvision's uint8 bilinear resize
  (antialiased, vectorised): measured faster than PIL decode + PIL resize. When the image
  shrinks by 2x or more, PIL's `draft` decodes it at 1/2..1/8 scale in the DCT domain first
  (torchvision's decoder cannot), which skips most of the decode of large originals. This is
  `decode_resized`, the one decode-and-resize: eval and predict (data/eval_source.py) use it too.
- Images stay uint8 to the model, which converts them on its device (float()/255 + its
  normalisation): a quarter of the bytes through the loader, pinned memory and the bus.
- Masks never exist at the stored size. Resize (nearest, half-pixel centres like
  `interpolate(mode="nearest-exact")`) and horizontal flip are done on the COCO RLE itself,
  all instances of an image in one vectorised numpy pass: a source run inside one column maps
  to one run of output rows, a source column to a range of output columns, so the output masks
  are again runs (MaskRuns), written once at the output size with `np.repeat` (memset speed).
  Boxes come from the same runs. The result equals decoding each mask and then resizing and
  flipping it (tests/test_transforms.py checks this bit-exactly, with hypothesis).
- Masks come out as column-major memory, like pycocotools' own decode: `masks` is an
  [N, H, W] uint8 view with strides (H*W, 1, H). Every torch op accepts it (Mask R-CNN's
  roi_align makes it contiguous on the device); call `.contiguous()` if you need row-major.
- Split in two for DataLoader workers: `SampleTransform.decode` does the work and returns what
  is cheap to send between processes (uint8 image, mask runs, numpy arrays, no tensors);
  `finish_sample` (in the training process) paints the masks and wraps the arrays as tensors.
  Sending painted masks and images through shared memory cost more than decoding them
  (measured: ~20 ms per two 1-Mpx images with ~12 instances each).
- Photometric jitter is brightness, contrast and saturation (torchvision ColorJitter's
  definitions, applied in that order) folded into one 3x3 colour matrix plus offset, clamped
  and rounded once at the end: one pass over the image instead of three.
- All randomness of a sample comes from (seed, epoch, key) (`aug_params`), so a batch can be
  re-decoded later from its keys alone and give the same tensors (hard-example replay, resume).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from fashionseg.data.vocab import Vocab

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


class SampleError(ValueError):
    """A sample whose image or annotation cannot be decoded (the message names the key)."""


SHARD_HINT = "; run `shard verify`"


# -- RLE ----------------------------------------------------------------------------------------
def _segmented_cumsum(x: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Cumulative sum of x restarting wherever `first` is True."""
    cs = np.cumsum(x)
    base = (cs - x)[first]
    return cs - base[np.cumsum(first) - 1]


def decode_counts(strings: Sequence[str | bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """COCO compressed RLE count strings (as pycocotools writes them) of several masks ->
    (counts, owner, m): all run lengths concatenated (each mask's alternate 0s and 1s, starting
    with 0s), the mask each belongs to and its index inside that mask. One vectorised pass over
    all masks: a port of pycocotools' rleFrString (5-bit groups, sign bit, delta to counts[m-2])."""
    bs = [x.encode("ascii") if isinstance(x, str) else bytes(x) for x in strings]
    a = np.frombuffer(b"".join(bs), np.uint8).astype(np.int64) - 48
    if a.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    last = (a & 0x20) == 0  # last character of a number
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    num = np.concatenate([[0], np.cumsum(last)[:-1]])
    k = np.arange(a.size) - starts[num]
    x = np.add.reduceat((a & 0x1F) << (5 * k), starts)
    neg = (a[ends] & 0x10) != 0
    x[neg] -= np.left_shift(1, 5 * (k[ends][neg] + 1))
    owner = np.repeat(np.arange(len(bs)), [len(b) for b in bs])[starts]
    m = np.arange(x.size) - np.searchsorted(owner, owner, "left")
    for chain in ((m % 2 == 1), (m >= 2) & (m % 2 == 0)):  # counts[m] += counts[m - 2] for m > 2
        xs, o = x[chain], owner[chain]
        if xs.size:
            x[chain] = _segmented_cumsum(xs, np.concatenate([[True], o[1:] != o[:-1]]))
    return x, owner, m


def rle_counts(counts: str | bytes | list) -> np.ndarray:
    """Run lengths of one mask (compressed string or a list of ints)."""
    if isinstance(counts, list):
        return np.asarray(counts, np.int64)
    return decode_counts([counts])[0]


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for nearest resize with half-pixel centres."""
    return ((2 * np.arange(n_out, dtype=np.int64) + 1) * n_in) // (2 * n_out)


@dataclass
class Geometry:
    """Where an output pixel comes from: nearest rows/columns of the stored grid, maybe mirrored."""

    height: int  # stored grid
    width: int
    out_height: int
    out_width: int
    flip: bool

    def __post_init__(self) -> None:
        self.sy = nearest_index(self.out_height, self.height)
        sx = nearest_index(self.out_width, self.width)
        cols = np.arange(self.width)
        self.col_lo = np.searchsorted(sx, cols, "left")  # output columns [lo, hi) read source column c
        self.col_hi = np.searchsorted(sx, cols, "right")


def _expand(lo: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [lo_i, lo_i + n_i): (index i of each element, the element)."""
    i = np.repeat(np.arange(n.size), n)
    return i, lo[i] + (np.arange(i.size) - np.repeat(np.cumsum(n) - n, n))


def mask_runs(strings: Sequence[str | bytes], g: Geometry) -> tuple["MaskRuns", np.ndarray, np.ndarray]:
    """COCO RLE strings of N masks on g's stored grid -> (the K masks that did not vanish, as runs
    (MaskRuns) at g's output size, resized (nearest) and mirrored as g says; boxes int64 [K, 4]
    xyxy with exclusive max edges; kept: int64 [K] indices of those masks).

    A 1-run inside one source column covers a row interval, which maps to one interval of output
    rows; a source column maps to a range of output columns. So the output is built as runs and
    written once with np.repeat, all masks in one vectorised pass."""
    H, oh, ow = g.height, g.out_height, g.out_width
    counts, owner, m = decode_counts(strings)
    first = m == 0
    cum = _segmented_cumsum(counts, first) if counts.size else counts
    ones = (m % 2 == 1) & (counts > 0)
    e, inst = cum[ones], owner[ones]
    s = e - counts[ones]
    over = e > H * g.width
    if over.any():
        j = int(inst[over][0])
        raise SampleError(f"instance {j}: its RLE covers {int(e[over].max())} pixels, the {g.height}x{g.width} grid has {H * g.width}")
    c0, c1 = s // H, (e - 1) // H
    run, col = _expand(c0, c1 - c0 + 1)  # one piece per (run, source column)
    r0 = np.where(col == c0[run], s[run] % H, 0)
    r1 = np.where(col == c1[run], (e[run] - 1) % H + 1, H)
    y0 = np.searchsorted(g.sy, r0, "left")
    y1 = np.searchsorted(g.sy, r1, "left")
    lo, hi = g.col_lo[col], g.col_hi[col]
    keep = (y1 > y0) & (hi > lo)
    piece, x = _expand(lo[keep], (hi - lo)[keep])  # one piece per output column
    y0, y1, inst = y0[keep][piece], y1[keep][piece], inst[run][keep][piece]
    if g.flip:
        x = ow - 1 - x
    if x.size == 0:
        return MaskRuns(np.zeros(1, np.int64), 0, oh, ow), np.zeros((0, 4), np.int64), np.zeros(0, np.int64)
    kept = np.unique(inst)
    new = np.searchsorted(kept, inst)
    K, plane = kept.size, oh * ow
    st = new * plane + x * oh + y0
    order = np.argsort(st, kind="stable")
    st, new, x, y0, y1 = st[order], new[order], x[order], y0[order], y1[order]
    en = st + (y1 - y0)
    lens = np.empty(2 * st.size + 1, np.int64)
    lens[0:-1:2] = st - np.concatenate([[0], en[:-1]])
    lens[1::2] = en - st
    lens[-1] = K * plane - en[-1]
    seg = np.searchsorted(new, np.arange(K), "left")
    boxes = np.stack([np.minimum.reduceat(x, seg), np.minimum.reduceat(y0, seg),
                      np.maximum.reduceat(x, seg) + 1, np.maximum.reduceat(y1, seg)], axis=1)
    return MaskRuns(lens.astype(np.int32 if K * plane < 2**31 else np.int64), K, oh, ow), boxes, kept


@dataclass
class MaskRuns:
    """K masks as alternating 0/1 run lengths over their column-major pixels: what a worker
    sends instead of K*H*W bytes (a few hundred KB instead of tens of MB per image, and no
    shared-memory segment to fault in); `paint()` makes the tensor in the consuming process."""

    lens: np.ndarray
    count: int
    height: int
    width: int

    def planes(self) -> np.ndarray:
        """bool [K, W, H]: the masks in the runs' own column-major order (copy-paste edits these)."""
        vals = np.zeros(self.lens.size, bool)
        vals[1::2] = True
        return np.repeat(vals, self.lens).reshape(self.count, self.width, self.height)  # memset speed: long runs

    def paint(self) -> torch.Tensor:
        if self.count == 0:
            return torch.zeros((0, self.height, self.width), dtype=torch.uint8)
        return torch.from_numpy(self.planes().view(np.uint8)).transpose(1, 2)


# -- augmentation parameters ----------------------------------------------------------------------
@dataclass(frozen=True)
class AugParams:
    min_size: int
    flip: bool
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{key}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def aug_params(seed: int, epoch: int, key: str, *, min_size: Sequence[int], hflip: float, color_jitter: float) -> AugParams:
    """The augmentation of one sample in one epoch: a pure function of (seed, epoch, key)."""
    rng = sample_rng(seed, epoch, key)
    u = rng.random(5)  # always five draws, whatever is switched on
    size = int(min_size[min(int(u[0] * len(min_size)), len(min_size) - 1)])
    jitter = None
    if color_jitter > 0:
        jitter = tuple(float(max(0.0, 1.0 + color_jitter * (2 * v - 1))) for v in u[2:5])
    return AugParams(size, bool(u[1] < hflip), jitter)  # type: ignore[arg-type]


def output_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Shorter side to `min_size` unless the longer side would pass `max_size` (detectron2's
    ResizeShortestEdge)."""
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def apply_jitter(img: torch.Tensor, factors: tuple[float, float, float]) -> torch.Tensor:
    """uint8 [3,H,W] -> jittered uint8 (rounded, as torchvision's ColorJitter on uint8 images).

    brightness b, contrast c, saturation s in that order are one affine map per pixel:
    out = c*b*s * x + c*b*(1-s) * gray(x) + b*(1-c) * mean(gray(x)), clamped and rounded once.
    A few elementwise passes (a 1x1 convolution was slower and erratic on one CPU thread)."""
    b, c, s = factors
    x = img.to(torch.float32)  # (mixed-dtype ops are ~20x slower than converting first)
    gray = torch.mul(x[0], GRAY[0]).add_(x[1], alpha=GRAY[1]).add_(x[2], alpha=GRAY[2])
    offset = b * (1 - c) * float(gray.mean()) + 0.5  # +0.5, then truncation = rounding
    plane = gray.mul_(c * b * (1 - s)).add_(offset)
    torch.add(plane[None], x, alpha=c * b * s, out=x)
    return x.clamp_(0, 255.49).to(torch.uint8)


def decode_reduced(where: str, jpg: bytes, h: int, w: int, oh: int, ow: int, hint: str = "",
                   stated: str = "its json says") -> torch.Tensor | None:
    """JPEG decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaling, via PIL's
    `draft`), never below the output size: for a shrink by 2x or more this skips most of the
    decode. None when the bytes are not a JPEG (the caller decodes them in full)."""
    if not jpg.startswith(b"\xff\xd8"):
        return None
    try:
        im = Image.open(io.BytesIO(jpg))
        size = im.size
        if size == (w, h):
            im.draft("RGB", (ow, oh))
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError(f"{where}: cannot decode the image ({e}){hint}") from e
    if size != (w, h):
        raise SampleError(f"{where}: image is {size[0]}x{size[1]}, {stated} {w}x{h}{hint}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # one copy, writable


def decode_rgb(where: str, data: bytes, hint: str = "") -> torch.Tensor:
    """Image bytes -> uint8 [3, H, W] on the file's own pixel grid (no EXIF rotation, the grid
    Kaggle's Height/Width and the shards use). torchvision's decoder (libjpeg-turbo, PNG, WebP,
    GIF), PIL for what it cannot read (BMP, TIFF, ...); 16-bit images scaled to 8 bits."""
    if len(data) == 0:
        raise SampleError(f"{where}: empty file (0 bytes), not an image{hint}")
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        try:
            pil = Image.open(io.BytesIO(data))
            pil.load()  # truncated data fails here, not later
            return torch.from_numpy(np.ascontiguousarray(np.asarray(pil.convert("RGB")).transpose(2, 0, 1)))
        except Exception:  # PIL raises many types for corrupt data: report torchvision's reason
            raise SampleError(f"{where}: cannot decode the image ({e}){hint}") from e
    if img.dtype != torch.uint8:
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def decode_resized(where: str, data: bytes, size: tuple[int, int], out: tuple[int, int], hint: str = "",
                   stated: str = "its json says") -> torch.Tensor:
    """Image bytes whose stated size is `size` (h, w) -> uint8 [3, oh, ow]: the one decode-and-
    resize of the project, used by training (SampleTransform), eval (eval_source) and predict.
    A shrink by 2x or more decodes at reduced scale first (`decode_reduced`); the last step is
    torchvision's uint8 bilinear resize with antialias."""
    (h, w), (oh, ow) = size, out
    img = decode_reduced(where, data, h, w, oh, ow, hint, stated) if 2 * oh <= h and 2 * ow <= w else None
    if img is None:
        img = decode_rgb(where, data, hint)
        if tuple(img.shape[1:]) != (h, w):
            raise SampleError(f"{where}: image is {img.shape[2]}x{img.shape[1]}, {stated} {w}x{h}{hint}")
    if tuple(img.shape[1:]) != (oh, ow):
        img = F.resize(img, [oh, ow], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return img


# -- the transform -------------------------------------------------------------------------------
@dataclass
class SampleTransform:
    """jpg bytes + sample json -> (image uint8 [3,H,W], target dict); the model converts to float.

    Train: multi-scale resize (shorter side drawn from `min_size`), flip, jitter, from
    `aug_params(seed, epoch, key)`. Eval (`train=False`): resize to `test_size` only.
    """

    vocab: Vocab
    min_size: Sequence[int]
    max_size: int
    hflip: float = 0.5
    color_jitter: float = 0.0
    train: bool = True
    seed: int = 0
    test_size: int | None = None

    def params(self, epoch: int, key: str) -> AugParams:
        if not self.train:
            return AugParams(int(self.test_size or max(self.min_size)), False, None)
        return aug_params(self.seed, epoch, key, min_size=self.min_size, hflip=self.hflip, color_jitter=self.color_jitter)

    def __call__(self, key: str, jpg: bytes, meta: dict, *, epoch: int, image_id: int) -> tuple[torch.Tensor, dict]:
        return finish_sample(*self.decode(key, jpg, meta, epoch=epoch, image_id=image_id))

    def decode(self, key: str, jpg: bytes, meta: dict, *, epoch: int, image_id: int,
               size: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
        """All the work but the last memory-bound step, with a result that is cheap to send between
        processes: the image as a uint8 numpy array, masks as runs
        (MaskRuns), small arrays as numpy; all pickled inline through the worker's pipe instead of
        one shared-memory segment per tensor (measured: faulting those segments in, on both
        sides, cost more than the copies). `finish_sample`, in the consuming process, makes the
        training pair of it. `size` (oh, ow) replaces the output size the augmentation draws (a
        copy-paste partner is decoded at its target's size: data/copy_paste.py)."""
        p = self.params(epoch, key)
        h, w = int(meta["height"]), int(meta["width"])
        oh, ow = size or output_size(h, w, p.min_size, self.max_size)
        img = decode_resized(f"sample '{key}'", jpg, (h, w), (oh, ow), SHARD_HINT)
        if p.flip:
            img = img.flip(-1)
        if p.jitter is not None:
            img = apply_jitter(img, p.jitter)
        return img.numpy(), self.target(key, meta, p, oh, ow, image_id)

    def target(self, key: str, meta: dict, p: AugParams, oh: int, ow: int, image_id: int) -> dict:
        h, w = int(meta["height"]), int(meta["width"])
        instances = meta.get("instances", ())
        A = self.vocab.num_attributes
        strings, labels, attrs = [], [], []
        for j, inst in enumerate(instances):
            seg = inst["segmentation"]
            if list(seg["size"]) != [h, w] or not isinstance(seg.get("counts"), (str, bytes)):
                raise SampleError(f"sample '{key}' instance {j}: the mask is not compressed COCO RLE on the image's [{h}, {w}] grid")
            cid = inst["category_id"]
            if not self.vocab.has_category(cid):
                raise SampleError(f"sample '{key}' instance {j}: category id {cid} is not in the manifest's vocabulary")
            for aid in inst.get("attribute_ids", ()):
                if not self.vocab.has_attribute(aid):
                    raise SampleError(f"sample '{key}' instance {j}: attribute id {aid} is not in the manifest's vocabulary")
            strings.append(seg["counts"])
            labels.append(self.vocab.category_index(cid))
            attrs.append([self.vocab.attribute_index(a) for a in inst.get("attribute_ids", ())])
        try:
            masks, boxes, kept = mask_runs(strings, Geometry(h, w, oh, ow, p.flip))
        except SampleError as e:
            raise SampleError(f"sample '{key}' {e}") from None
        multi_hot = np.zeros((len(kept), A), dtype=np.float32)
        for row, j in enumerate(kept.tolist()):
            multi_hot[row, attrs[j]] = 1.0
        return {
            "boxes": boxes.astype(np.float32).reshape(-1, 4),
            "labels": np.asarray([labels[j] for j in kept.tolist()], dtype=np.int64),
            "masks": masks,
            "attributes": multi_hot,
            "image_id": int(image_id),
            "key": key,
            "orig_size": (h, w),
        }


def finish_sample(img: np.ndarray, wire: dict) -> tuple[torch.Tensor, dict]:
    """`SampleTransform.decode` output -> (uint8 image [3, H, W], target of torch tensors).
    The image stays uint8: the model converts it on its device (a quarter of the bytes to copy)."""
    return torch.from_numpy(img), {
        "boxes": torch.from_numpy(wire["boxes"]),
        "labels": torch.from_numpy(wire["labels"]),
        "masks": wire["masks"].paint(),
        "attributes": torch.from_numpy(wire["attributes"]),
        "image_id": torch.tensor(wire["image_id"], dtype=torch.int64),
        "key": wire["key"],
        "orig_size": wire["orig_size"],
    }
