"""Run configs: validation with a suggestion, dotted overrides, round trip, LR scaling, schedule."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from fashionseg.train import config as config_lib
from fashionseg.train.config import ConfigError
from fashionseg.train.distributed import loss_weight, resolve_precision, resolved_lr
from fashionseg.train.schedule import LRFactor, default_warmup_iters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config_lib.load(path)
    for key in ("batch_size", "max_steps", "checkpoint_every", "seed", "lr"):
        assert hasattr(cfg.train, key)


def test_typo_names_key_and_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_szie: 4\n")
    with pytest.raises(ConfigError) as e:
        config_lib.load(p)
    assert "train.batch_szie" in str(e.value) and "train.batch_size" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        config_lib.load(None, ["trian.lr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'model.backbone'"):
        config_lib.load(None, ["model.backbon=resnet18_fpn"])


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="train.max_steps.*integer"):
        config_lib.load(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        config_lib.load(None, ["train.optimizer=adamW"])
    with pytest.raises(ConfigError, match="train.lr"):
        config_lib.load(None, ["train.lr=fast"])


def test_overrides_are_yaml_values(tmp_path):
    cfg = config_lib.load(ROOT / "configs" / "debug.yaml",
                          ["train.batch_sizes=[1,3]", "train.lr=1e-3", "train.clip_grad_norm=null",
                           "log.log_with=[]", "train.max_steps=7", "data.shards=/x/y"])
    assert cfg.train.batch_sizes == [1, 3]
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.clip_grad_norm is None and cfg.log.log_with == [] and cfg.train.max_steps == 7
    assert cfg.shards == "/x/y"
    # the resolved config round-trips through its YAML
    out = tmp_path / "config.yaml"
    cfg.save(out)
    again = config_lib.from_dict(yaml.safe_load(out.read_text()))
    assert again.to_dict() == cfg.to_dict()


def test_lr_auto_scales_with_global_batch():
    cfg = config_lib.load(ROOT / "configs" / "fashionpedia_r50.yaml")
    assert cfg.train.lr == "auto"
    assert resolved_lr(cfg.train, 16)[0] == pytest.approx(0.02)
    assert resolved_lr(cfg.train, 8 * 2 + 2 * 3)[0] == pytest.approx(0.02 * 22 / 16)


def test_loss_weights_make_ddp_mean_the_global_mean():
    sizes = [1, 3, 2]
    w = [loss_weight(sizes, r) for r in range(3)]
    # DDP averages: (1/W) sum_r w_r * mean_r = sum_r b_r mean_r / B
    means = [0.5, 2.0, 1.0]
    assert sum(wr * m for wr, m in zip(w, means)) / 3 == pytest.approx(sum(b * m for b, m in zip(sizes, means)) / 6)
    assert loss_weight([2, 2], 0) == 1.0


def test_warmup_and_multistep_match_seed_recipe():
    cfg = config_lib.load(None, ["train.max_steps=1000", "train.milestones=[0.5,0.8]"]).train
    assert default_warmup_iters(cfg, 22812) == 1000 and default_warmup_iters(cfg, 50) == 49
    f = LRFactor(cfg, 1000, 100)
    assert f(0) == pytest.approx(0.001)
    assert f(50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert f(100) == 1.0 and f(499) == 1.0 and f(500) == pytest.approx(0.1) and f(800) == pytest.approx(0.01)
    cos = LRFactor(config_lib.load(None, ["train.schedule=cosine", "train.max_steps=100"]).train, 100, 10)
    assert cos(10) == pytest.approx(1.0) and cos(100) == pytest.approx(0.0, abs=1e-12)
    assert cos(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_fp16_on_cpu_falls_back_with_one_line():
    p = resolve_precision("fp16", cuda=False)
    assert p.mixed_precision == "no" and "fp32" in p.note and "\n" not in p.note
    assert resolve_precision("auto", cuda=False).mixed_precision == "no"
    assert resolve_precision("fp32", cuda=True).note is None


def test_nested_override_at_any_depth():
    cfg = config_lib.load(ROOT / "configs" / "debug.yaml", ["model.loss_weights.loss_mask=2.0"])
    assert cfg.model.loss_weights["loss_mask"] == 2.0 and cfg.model.loss_weights["loss_classifier"] == 1.0
    with pytest.raises(ConfigError, match=r"model.loss_weights.*loss_msk"):
        config_lib.load(None, ["model.loss_weights.loss_msk=2.0"])   # the component validates its own keys
    with pytest.raises(ConfigError, match=r"'train.lr' is a value, not a section"):
        config_lib.load(None, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        config_lib.load(None, ["lr=1"])


def test_values_are_checked_where_they_are_defined():
    with pytest.raises(ConfigError, match="train.checkpoint_every must be >= 1"):
        config_lib.load(None, ["train.checkpoint_every=0"])
    with pytest.raises(ConfigError, match="hard_mining.every must be >= 1"):
        config_lib.load(None, ["hard_mining.every=0"])
    with pytest.raises(ConfigError, match=r"'log.log_with.0'.*(did you mean 'tensorboard')"):
        config_lib.load(None, ["log.log_with=[tensorbord]"])


def test_a_key_of_a_disabled_component_warns(caplog):
    with caplog.at_level("WARNING", logger="fashionseg"):
        cfg = config_lib.load(None, ["hard_mining.every=2"])
    assert not cfg.hard_mining.enabled and cfg.hard_mining.every == 2
    assert "hard_mining.every set but hard_mining.enabled is false" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fashionseg"):
        config_lib.load(None, ["hard_mining.every=2", "hard_mining.enabled=true"])
    assert caplog.text == ""


def test_schedule_command_reproduces_seed_000(capsys, tmp_path):
    """The seed's log after the scheduler update: lr 0.000102 at iteration 100, 0.000202 at 200,
    0.000501 at 500 (22812 steps per epoch, warmup 1000 from 1/1000, base lr 0.001)."""
    from fashionseg.cli import main
    png = tmp_path / "lr.png"
    assert main(["schedule", "--config", str(ROOT / "configs" / "seed000.yaml"), "--steps-per-epoch", "22812",
                 "--png", str(png)]) == 0
    rows = {int(line.split()[0]): line.split()[2] for line in capsys.readouterr().out.splitlines()
            if line.strip() and line.split()[0].isdigit()}
    assert rows[100] == "0.000102" and rows[200] == "0.000202" and rows[500] == "0.000501"
    assert png.read_bytes()[:4] == b"\x89PNG"
