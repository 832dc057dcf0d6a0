"""Hand-made Kaggle sources unlike the synthetic set, and a plain-tarfile reader of shards."""
from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image



def vocab_dict(n_cats: int = 48, n_attrs: int = 320) -> dict:
    """Older-Fashionpedia-sized vocabulary with sparse attribute ids."""
    attr_ids = sorted(np.random.default_rng(1).choice(400, n_attrs, replace=False).tolist())
    return {"categories": [{"id": i, "name": f"c{i}", "supercategory": "s", "level": 1} for i in range(n_cats)],
            "attributes": [{"id": int(a), "name": f"a{a}", "supercategory": "x", "level": 1} for a in attr_ids]}


def encode_column_major(m: np.ndarray) -> str:
    """Independent Kaggle encoder (plain loops), so the test does not trust rle.py."""
    h, w = m.shape
    flat = [int(m[y, x]) for x in range(w) for y in range(h)]
    runs, i = [], 0
    while i < len(flat):
        if flat[i]:
            j = i
            while j < len(flat) and flat[j]:
                j += 1
            runs += [i + 1, j - i]
            i = j
        else:
            i += 1
    return " ".join(map(str, runs))


def read_all(out: Path) -> dict[str, dict]:
    """image_id -> sample json, read with plain tarfile."""
    got = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        got[meta["source_id"]] = meta
    return got


def kaggle_src(root: Path, rows, images: dict[str, tuple[int, int]], header: list[str]) -> Path:
    src = root / "kag"
    (src / "train").mkdir(parents=True)
    (src / "label_descriptions.json").write_text(json.dumps(vocab_dict()))
    rng = np.random.default_rng(0)
    for iid, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / "train" / f"{iid}.jpg")
    with open(src / "train.csv", "w", newline="", encoding="utf-8-sig") as f:  # BOM
        wr = csv.writer(f, lineterminator="\r\n")  # CRLF
        wr.writerow(header)
        wr.writerows(rows)
    return src
