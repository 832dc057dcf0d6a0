"""Read Fashionpedia / COCO JSON (docs/formats.md, "COCO") into records.

SRC is the annotation JSON or a folder holding exactly one. Images are found by `file_name`
beside the JSON, under `images/` next to it, or under `--images DIR`. The vocabulary is the
file's own `categories` / `attributes` (Fashionpedia releases differ in size).
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from fashionseg.data.sources.records import (
    DROP_ATTRIBUTE, DROP_IMAGE, DROP_INSTANCE, RawImage, RawInstance, Source, Problem, SourceError,
)
from fashionseg.data.vocab import Vocab, VocabError


def find_json(src: Path) -> Path | None:
    if src.is_file():
        return src
    if src.is_dir():
        found = sorted(p for p in src.glob("*.json") if p.name != "label_descriptions.json")
        if len(found) > 1:
            raise SourceError(f"{src}: several JSON files ({', '.join(p.name for p in found)}); pass the annotation file itself as SRC")
        return found[0] if found else None
    return None


def looks_like(src: Path) -> bool:
    try:
        return find_json(src) is not None and not (src.is_dir() and (src / "train.csv").is_file())
    except SourceError:
        return True


def _image_dir(json_path: Path, file_names: list[str], images_dir: str | Path | None) -> Path:
    """Where `file_name` resolves: --images, else beside the JSON, under images/, or a sibling folder
    (Fashionpedia unzips to train/ and val/; COCO keeps JSONs in annotations/ beside train2017/).

    Raises SourceError when none of the first images listed exists in any candidate (a wrong
    folder would otherwise drop every image one by one)."""
    sample = [fn for fn in file_names if fn][:50]
    if images_dir:
        cands = [Path(images_dir)]
    else:
        bases = [json_path.parent] + ([json_path.parent.parent] if json_path.parent.name == "annotations" else [])
        cands = []
        for base in bases:
            cands += [base, base / "images"]
            for sub in (base, base / "images"):
                if sub.is_dir():
                    cands += sorted(d for d in sub.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not sample:
        return cands[0]
    found = [(sum((c / fn).is_file() for fn in sample), -i, c) for i, c in enumerate(dict.fromkeys(cands))]
    best = max(found)
    if best[0] == 0:
        tried = ", ".join(str(c) for _, _, c in found[:6]) + (" ..." if len(found) > 6 else "")
        raise SourceError(f"{json_path}: none of its images (e.g. {sample[0]!r}) is under {tried} (nothing valid to build); "
                          "pass the folder holding them with --images DIR")
    return best[2]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_id(v) -> bool:
    """COCO ids are integers; strings are accepted too (some exporters write them)."""
    return _is_int(v) or isinstance(v, str)


def posix_name(file_name: str) -> str:
    """Windows exporters write `train\\x.jpg`: the same relative path with `/`."""
    return file_name.replace("\\", "/")


def image_id_of(file_name: str) -> str:
    """`file_name` without its extension, subfolders kept: `a/x.jpg` and `b/x.jpg` stay apart."""
    p = PurePosixPath(posix_name(file_name))
    return str(p.with_suffix("")) if p.suffix else str(p)


def read(src: str | Path, images_dir: str | Path | None = None) -> Source:
    src = Path(src)
    json_path = find_json(src)
    if json_path is None:
        raise SourceError(f"{src}: no COCO annotation JSON here; pass the instances_attributes_*.json file as SRC")
    try:
        d = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{json_path}: cannot read the annotation JSON ({e})") from e
    if not isinstance(d, dict):
        raise SourceError(f"{json_path}: not a COCO annotation file (top level is not an object)")
    try:
        vocab = Vocab.from_dict(d, str(json_path))
    except VocabError as e:
        raise SourceError(f"{e}; a COCO file needs 'categories' (and 'attributes') lists") from e
    for key in ("images", "annotations"):
        if not isinstance(d.get(key), list):
            raise SourceError(f"{json_path}: no '{key}' list: this is not a COCO instances file")

    problems: list[Problem] = []
    images: dict[int, RawImage] = {}
    file_names = [posix_name(str(im.get("file_name", ""))) for im in d["images"] if isinstance(im, dict)]
    root = _image_dir(json_path, file_names, images_dir)
    for i, im in enumerate(d["images"]):
        if not isinstance(im, dict) or not _is_id(im.get("id")) or not isinstance(im.get("file_name"), str) or not im["file_name"]:
            problems.append(Problem(DROP_IMAGE, "image entry without an integer/string id or a file_name", None, f"images[{i}]", instances=0))
            continue
        if im["id"] in images:
            problems.append(Problem(DROP_IMAGE, f"duplicate image id {im['id']!r} (the first entry is kept)", None, f"images[{i}]", instances=0))
            continue
        h, w = im.get("height"), im.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
            h = w = None  # taken from the decoded image
        images[im["id"]] = RawImage(image_id_of(im["file_name"]), str(root / posix_name(im["file_name"])), h, w,
                                    image_id=im["id"] if _is_int(im["id"]) else 0)
    if not all(_is_int(k) for k in images):  # string ids (some exporters): 1..N in the file's order
        for n, img in enumerate(images.values()):
            img.image_id = n + 1

    for i, ann in enumerate(d["annotations"]):
        where = f"annotation id {ann.get('id', f'#{i}')}" if isinstance(ann, dict) else f"annotations[{i}]"
        if not isinstance(ann, dict):
            problems.append(Problem(DROP_INSTANCE, "annotation is not an object", None, where))
            continue
        img = images.get(ann.get("image_id")) if _is_id(ann.get("image_id")) else None
        if img is None:
            problems.append(Problem(DROP_INSTANCE, f"image_id {ann.get('image_id')!r} is not in 'images'", None, where))
            continue
        cls = ann.get("category_id")
        if not _is_int(cls) or not vocab.has_category(cls):
            problems.append(Problem(DROP_INSTANCE, f"unknown category_id {cls!r}", img.source_id, where))
            continue
        seg = ann.get("segmentation")
        if not seg:
            problems.append(Problem(DROP_INSTANCE, "no segmentation", img.source_id, where))
            continue
        if ann.get("iscrowd") in (1, True):
            # a crowd region is not an instance: torchvision's references drop these for training
            problems.append(Problem(DROP_INSTANCE, "iscrowd annotation (a crowd region, not an instance)", img.source_id, where, bad=False))
            continue
        raw_attrs = ann.get("attribute_ids") or []
        if not isinstance(raw_attrs, list):
            problems.append(Problem(DROP_ATTRIBUTE, f"attribute_ids is {type(raw_attrs).__name__}, not a list (ignored, instance kept)",
                                    img.source_id, where, bad=False))
            raw_attrs = []
        attrs: list[int] = []
        for a in raw_attrs:
            if not _is_int(a) or not vocab.has_attribute(a):
                problems.append(Problem(DROP_ATTRIBUTE, f"unknown attribute id {a!r} (instance kept)", img.source_id, where, bad=False))
                continue
            attrs.append(a)
        img.instances.append(RawInstance(where, cls, sorted(set(attrs)), img.height or 0, img.width or 0, segmentation=seg))
    return Source("coco", json_path, vocab, list(images.values()), problems, len(d["annotations"]))
