"""The shards are plain webdataset: a stock `webdataset.WebDataset(urls).decode()` pipeline (the
recipe in docs/formats.md) yields every sample of the manifest, with its image size and masks."""
from __future__ import annotations

import io

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_util

from fashionseg.data import rle
from fashionseg.data.shards.reader import read_manifest

from test_eval_source import kaggle_rows


def test_stock_webdataset_reads_every_sample_size_and_mask(synth_src, synth_shards):
    manifest = read_manifest(synth_shards)
    rows = kaggle_rows(synth_src)
    for split, info in manifest["splits"].items():
        urls = [str(synth_shards / s["name"]) for s in info["shards"]]
        listed = [s for sh in info["shards"] for s in sh["samples"]]
        got = list(wds.WebDataset(urls, shardshuffle=False).decode())
        assert [s["__key__"] for s in got] == [s["key"] for s in listed]
        for sample, want in zip(got, listed):
            meta = sample["json"]
            assert Image.open(io.BytesIO(sample["jpg"])).size == (want["width"], want["height"])
            assert (meta["image_id"], meta["source_id"]) == (want["image_id"], want["source_id"])
            src = rows[meta["source_id"]]
            h, w = want["height"], want["width"]
            masks = [mask_util.decode({"size": i["segmentation"]["size"], "counts": i["segmentation"]["counts"].encode()})
                     for i in meta["instances"]]
            assert [m.tobytes() for m in masks] == [rle.decode_kaggle(r["EncodedPixels"], h, w).tobytes() for r in src]
            assert sorted({i["category_id"] for i in meta["instances"]}) == want["categories"]
        assert len(got) == info["num_samples"] > 0
        assert sum(len(s["json"]["instances"]) for s in got) == info["num_instances"]
        # the recipe of docs/formats.md: decoded images and masks straight from the pipeline
        for sample, want in zip(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"), listed):
            image, meta = sample["jpg"], sample["json"]
            masks = mask_util.decode([i["segmentation"] for i in meta["instances"]])
            assert image.shape == (want["height"], want["width"], 3) and image.dtype == np.uint8
            assert masks.shape == (want["height"], want["width"], len(meta["instances"]))
