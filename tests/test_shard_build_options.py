"""`shard build` options, output folders, dead workers, corrupt manifests, high-bit-depth images."""
from __future__ import annotations

import io
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from fashionseg.data import rle
from fashionseg.data.shards import build as build_mod
from fashionseg.data.shards import process
from fashionseg.data.shards.split import assign_keys
from fashionseg.data.shards.build import BuildConfig, WorkerDied, build
from fashionseg.data.shards.manifest import ManifestError
from fashionseg.data.shards.reader import read_manifest
from fashionseg.data.sources.records import SourceError


@pytest.mark.parametrize("kw, match", [({"max_size": -5}, "--max-size must be a positive"), ({"max_size": 0}, "--max-size"),
                                        ({"workers": -1}, "--workers must be >= 0")])
def test_bad_build_options_are_refused(synth_src, tmp_path, kw, match):
    """Bug: --max-size -5 silently wrote 1x1 images; --workers -1 was accepted."""
    with pytest.raises(SourceError, match=match):
        build(BuildConfig(str(synth_src), str(tmp_path / "out"), progress=False, **kw))


def test_out_that_is_a_file_is_a_clear_error(synth_src, tmp_path, capsys):
    """Bug: OUT being a file (or not creatable) ended in a FileExistsError traceback."""
    from argparse import Namespace

    f = tmp_path / "afile"
    f.write_text("x")
    args = Namespace(src=str(synth_src), out=str(f), format="auto", val_fraction=0.1, max_size=None, samples_per_shard=4,
                     workers=1, seed=0, images=None, max_bad_fraction=0.05, no_progress=True)
    assert build_mod.run(args) == 2
    assert f"{f}: exists and is not a folder" in capsys.readouterr().err


def test_dead_worker_ends_the_build_instead_of_hanging(synth_src, tmp_path, monkeypatch):
    """Bug: with multiprocessing.Pool a worker killed by the OS (OOM) or crashing in native code
    made the build wait forever. The workers are forked, so they inherit this patched function."""
    real = process.process_image

    def killed(key, img, max_size):
        if key == sorted_keys[3]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(key, img, max_size)

    source = build_mod.read_source(BuildConfig(str(synth_src), "unused"))
    sorted_keys = sorted(assign_keys(source.images))
    monkeypatch.setattr(process, "process_image", killed)
    with pytest.raises(WorkerDied, match="fewer --workers"):
        build(BuildConfig(str(synth_src), str(tmp_path / "out"), workers=2, samples_per_shard=4, progress=False))


@pytest.fixture()
def shard_copy(synth_shards, tmp_path):
    import shutil

    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out)
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["splits"]["val"]["shards"][0]["samples"].__setitem__(0, {}), r"sample #0 needs key, offset"),
    (lambda m: m["splits"]["val"]["shards"][0]["samples"][0].__setitem__("categories", None), r"sample #0 needs"),
    (lambda m: m["splits"]["val"]["shards"][0].__setitem__("name", "../elsewhere/val-000000.tar"), "must be a file name"),
    (lambda m: m["splits"]["val"]["shards"].append(5), r"shard #\d+ is not an object"),
])
def test_corrupt_manifest_is_a_manifest_error(shard_copy, edit, match):
    """Bug: sample entries were not validated (verify crashed with KeyError / AttributeError) and a
    shard name could point outside the shard folder."""
    p = shard_copy / "manifest.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))
    with pytest.raises(ManifestError, match=match):
        read_manifest(shard_copy)
    from fashionseg.data.shards.verify import run as verify_run
    from argparse import Namespace

    assert verify_run(Namespace(out=str(shard_copy))) == 2


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(tmp_path, mode):
    """Bug: a 16-bit PNG behind a .jpg name came out white (PIL's convert clips I;16 to 0..255),
    a float 0..1 image black. The stored JPEG must keep the picture's levels."""
    from fashionseg.data.shards.process import process_image
    from fashionseg.data.sources.records import RawImage, RawInstance

    grey = np.tile(np.linspace(0, 255, 30), (20, 1))
    if mode == "I;16":
        im, fmt = Image.fromarray((grey * 257).astype(np.uint16)).convert("I;16"), "PNG"
    elif mode == "I":
        im, fmt = Image.fromarray((grey * 257).astype(np.int32), "I"), "TIFF"
    else:
        im, fmt = Image.fromarray((grey / 255).astype(np.float32), "F"), "TIFF"
    path = tmp_path / "x.jpg"
    im.save(path, fmt)
    m = np.zeros((20, 30), np.uint8)
    m[2:6, 3:9] = 1
    r = process_image("x", RawImage("x", str(path), 20, 30, [RawInstance("w", 1, [], 20, 30, kaggle_rle=rle.encode_kaggle(m))]), None)
    stored = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("L"), dtype=np.float64)
    assert np.abs(stored - grey).mean() < 3, np.abs(stored - grey).mean()
