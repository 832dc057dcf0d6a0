"""`shard verify` names the damaged shard and sample; `shard inspect` counts what the shards hold."""
from __future__ import annotations

import json
import re
import shutil
from argparse import Namespace

from PIL import Image

from fashionseg.data.shards import inspect as inspect_mod
from fashionseg.data.shards import verify as verify_mod
from fashionseg.data.shards.reader import read_manifest


def test_verify_intact(synth_shards, capsys):
    assert verify_mod.run(Namespace(out=str(synth_shards))) == 0
    assert "intact" in capsys.readouterr().out


def test_verify_names_damaged_shard_and_sample(synth_shards, tmp_path, capsys):
    out = tmp_path / "s"
    shutil.copytree(synth_shards, out)
    m = read_manifest(out)
    shard = m["splits"]["train"]["shards"][1]
    path = out / shard["name"]
    data = path.read_bytes()
    # change one digit of the second sample's first "area" (same length: the tar stays readable)
    second = shard["samples"][1]
    at = data.index(b'"area":', second["offset"]) + len(b'"area":')
    digit = data[at : at + 1]
    path.write_bytes(data[:at] + (b"1" if digit != b"1" else b"2") + data[at + 1 :])
    # and move an offset in another shard's manifest entry
    m["splits"]["val"]["shards"][0]["samples"][1]["offset"] += 512
    (out / "manifest.json").write_text(json.dumps(m))
    code = verify_mod.run(Namespace(out=str(out)))
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(rf"{shard['name']}: sha256 .* != manifest", err)
    assert re.search(rf"{shard['name']}: sample 1 '{second['key']}': instance 0: mask area \d+ != stated \d+", err)
    assert re.search(r"val-000000.tar: sample 1 '.*': header at byte \d+, manifest offset \d+", err)
    (out / shard["name"]).unlink()
    assert verify_mod.run(Namespace(out=str(out))) == 1
    assert f"{shard['name']}: file is missing" in capsys.readouterr().err


def test_inspect_tables_and_contact_sheet(synth_shards, tmp_path, capsys):
    m = read_manifest(synth_shards)
    stats = inspect_mod.collect(synth_shards, ["train", "val"])
    for split in ("train", "val"):
        assert stats["images"][split] == m["splits"][split]["num_samples"]
        assert stats["instances"][split] == m["splits"][split]["num_instances"]
    sheet = tmp_path / "sheet.png"
    code = inspect_mod.run(Namespace(out=str(synth_shards), split="val", sheet=str(sheet), num=4, top=10))
    text = capsys.readouterr().out
    assert code == 0
    for title in ("instances per category", "attribute frequencies", "image sizes", "sleeve"):
        assert title in text
    im = Image.open(sheet)
    assert im.format == "PNG" and im.size == (4 * 256, 256)
    assert inspect_mod.run(Namespace(out=str(synth_shards), split="test", sheet=None, num=4, top=10)) == 2


def test_verify_checks_original_grid_masks():
    """The original-grid masks of a --max-size build: on the original grid, not empty."""
    meta = {"orig_height": 4, "orig_width": 3,
            "instances": [{"orig_segmentation": {"size": [4, 3], "counts": "057"}}],  # 5 pixels set: intact
            "orig_only": [{"orig_segmentation": {"size": [4, 3], "counts": "<"}},  # 12 zeros: empty
                          {"orig_segmentation": {"size": [3, 4], "counts": "<"}}]}
    assert verify_mod._check_original_grid(meta) == ["orig_only 0: original-grid mask is empty",
                                                     "orig_only 1: original-grid mask size [3, 4] != original 4x3"]
