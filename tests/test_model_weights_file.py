"""model_final.pth: save/read/load round trip, old files with the model's resize keys, folding on load."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fashionseg.model.build import REMOVED_KEYS, ModelConfig, build_model
from fashionseg.model.weights_file import WeightsError, WeightsFile, load_model, save_weights

torch.set_num_threads(1)


def small(**kw) -> ModelConfig:
    return ModelConfig(backbone="resnet18_fpn", anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_test=100,
                       rpn_post_nms_top_n_test=50, mask_head_hidden=32, attribute_hidden=32, score_thresh=0.0, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model with non-trivial BatchNorm statistics (a few train-mode forwards), saved."""
    torch.manual_seed(0)
    cfg = small()
    model = build_model(cfg, 8, 24)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model.backbone(torch.rand(2, 3, 64, 64) * 3)
    model.eval()
    wf = WeightsFile(model.state_dict(), {"model": dataclasses.asdict(cfg)},
                     [{"id": i, "name": f"c{i}"} for i in range(7)], [{"id": i, "name": f"a{i}"} for i in range(24)])
    folder = tmp_path_factory.mktemp("run")
    return model, wf, save_weights(folder / "model_final.pth", wf)


def image() -> torch.Tensor:
    return torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_round_trip_without_folding_is_exact(trained):
    model, wf, path = trained
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_final.pth"]  # atomic: no temporary left
    loaded, wf2, cfg = load_model(path, fold=False)
    assert not loaded.training and not loaded.folded and cfg == ModelConfig(**wf.config["model"])
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert wf2.categories == wf.categories and wf2.attributes == wf.attributes
    with torch.no_grad():
        (a,), (b,) = model([image()]), loaded([image()])
    assert len(a["boxes"]) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_load_folds_by_default_and_matches_within_1e_4(trained):
    model, _, path = trained
    folded, _, _ = load_model(path)
    assert folded.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        (a,), (b,) = model([image()]), folded([image()])
    assert len(a["boxes"]) > 0 and torch.equal(a["labels"], b["labels"])
    assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=0) for k in ("boxes", "scores", "masks", "attribute_scores"))


def test_files_with_the_old_resize_keys_load_with_them_dropped(trained, tmp_path):
    """The model's min_size/max_size/resize_in_train moved to the data layer: an older file
    that carries them loads (silently mapped), and the model is the same."""
    model, wf, _ = trained
    old = dataclasses.replace(wf, config={"model": {**wf.config["model"], "min_size": [800], "max_size": 1333,
                                                    "resize_in_train": False}})
    assert set(REMOVED_KEYS) <= set(old.config["model"])
    loaded, _, cfg = load_model(save_weights(tmp_path / "old.pth", old), fold=False)
    assert not any(hasattr(cfg, k) for k in REMOVED_KEYS)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    newer = dataclasses.replace(wf, config={"model": {**wf.config["model"], "fancy_head": True}})
    with pytest.raises(WeightsError, match=r"does not know: \['fancy_head'\]"):
        load_model(save_weights(tmp_path / "newer.pth", newer))
