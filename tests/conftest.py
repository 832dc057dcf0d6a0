"""Shared fixtures: a small synthetic Kaggle dataset and the shards built from it (both < 1 s)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

SYNTH_IMAGES, SYNTH_SIZE, SYNTH_SEED = 24, 96, 0


@pytest.fixture(scope="session")
def synth_src(tmp_path_factory):
    """`shard synth` output: Kaggle layout (train.csv, label_descriptions.json, train/), 24 images
    of height 96 px, seed 0. Read-only: copy it before corrupting anything."""
    from fashionseg.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth_src"), SYNTH_IMAGES, seed=SYNTH_SEED, size=SYNTH_SIZE, progress=False)


@pytest.fixture(scope="session")
def synth_shards(synth_src, tmp_path_factory):
    """Shards built from `synth_src`: 4 samples per shard, val fraction 0.25 (18 train / 6 val
    images), no resize. Read-only."""
    from fashionseg.data.shards.build import BuildConfig, build

    out = tmp_path_factory.mktemp("synth_shards")
    code, report = build(BuildConfig(src=str(synth_src), out=str(out), samples_per_shard=4, val_fraction=0.25,
                                     workers=1, progress=False))
    assert code == 0, report.get("error")
    return out
