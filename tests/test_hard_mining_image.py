"""Per-image hard mining (train/image_mining.py): what the pool keeps, the batches it replays, the
same trigger on every rank, the ceiling, and exact resume from its state."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hard_mining import assert_resumes_exactly, roundtrip_json, roundtrip_torch

from fashionseg.train import config
from fashionseg.train.hard_mining import HardMiningConfig
from fashionseg.train.image_mining import ImageMiner, build_miner, load_replay


def make(batch_size=2, warmup=0, **kw) -> ImageMiner:
    miner = build_miner(HardMiningConfig(enabled=True, unit="image", **kw), warmup_steps=warmup, batch_size=batch_size)
    assert isinstance(miner, ImageMiner)
    return miner


def keys_of(step: int, n: int) -> list[str]:
    return [f"s{step:05d}_{i}" for i in range(n)]


def drive(miner: ImageMiner, losses: list[list[float]], first_step: int = 1) -> list[tuple]:
    """The loop's protocol over data steps first_step.. with per-image total losses; returns
    (step, keys, epochs, fallback) of every replay."""
    out = []
    for i, per_image in enumerate(losses):
        step = first_step + i
        keys = keys_of(step, len(per_image))
        images = [{"loss_mask": v / 2, "loss_box_reg": v / 2} for v in per_image]
        miner.observe(step, keys, step // 7, {"loss": sum(per_image) / len(per_image)}, images)
        if miner.should_replay(step):
            for _ in range(miner.replays_per_trigger):
                r = miner.pop()
                miner.record_replay(r.loss, r.loss * 0.9)
                out.append((step, r.keys, r.key_epochs(), r.fallback))
    return out


def test_replays_the_hardest_images_of_the_window_as_full_batches():
    miner = make(batch_size=2, every=3, top_k=1)
    replays = drive(miner, [[1.0, 9.0], [5.0, 2.0], [8.0, 0.5],    # window 1: 9 (s1), 8 (s3)
                            [0.1, 0.2], [7.0, 0.3], [0.4, 6.0]])   # window 2: 7 (s5), 6 (s6)
    assert replays == [(3, ["s00001_1", "s00003_0"], [0, 0], False), (6, ["s00005_0", "s00006_1"], [0, 0], False)]


def test_top_k_batches_hardest_first_and_the_pool_is_bounded():
    miner = make(batch_size=3, every=4, top_k=2)
    losses = [[float(10 * s + i) for i in range(3)] for s in range(4)]  # later steps and images are harder
    replays = drive(miner, losses)
    assert [r[1] for r in replays] == [["s00004_2", "s00004_1", "s00004_0"], ["s00003_2", "s00003_1", "s00003_0"]]
    drive(miner, [[float(i)] * 3 for i in range(200)], first_step=5)
    s = miner.stats()
    assert s["images_held"] <= (2 + 2) * 3 and s["window_size"] <= 2 * 3


@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.lists(st.floats(0.0, 100.0), min_size=2, max_size=2), min_size=20, max_size=20),
       b=st.lists(st.lists(st.floats(0.0, 100.0), min_size=4, max_size=4), min_size=20, max_size=20),
       every=st.integers(1, 6), top_k=st.integers(1, 3), max_loss=st.none() | st.floats(1.0, 50.0))
def test_ranks_replay_at_the_same_steps_with_their_own_batch_size(a, b, every, top_k, max_loss):
    """Two ranks (batch sizes 2 and 4) with different losses and a ceiling that may empty one's
    pool replay at the same steps, the same number of times, each a batch of its own size."""
    ranks = [make(batch_size=n, every=every, top_k=top_k, max_loss=max_loss, start_after=3) for n in (2, 4)]
    runs = [drive(m, losses) for m, losses in zip(ranks, (a, b))]
    assert [r[0] for r in runs[0]] == [r[0] for r in runs[1]]
    assert [r[0] for r in runs[0]] == [s for s in range(4, 21) if (s - 3) % every == 0 for _ in range(top_k)]
    assert all(len(r[1]) == 2 for r in runs[0]) and all(len(r[1]) == 4 for r in runs[1])


def test_ceiling_drops_noisy_images_and_a_short_pool_is_topped_up_with_recent_clean_images():
    miner = make(batch_size=2, every=2, max_loss=5.0)
    replays = drive(miner, [[1.0, 9.0], [3.0, 50.0],    # window 1: only 3.0 and 1.0 are under the ceiling
                            [8.0, 2.0], [7.0, 6.0]])    # window 2: only 2.0 (s3_1), topped up
    assert replays[0] == (2, ["s00002_0", "s00001_0"], [0, 0], False)
    # the most recent images under the ceiling: s3_1 (already in), then s2_0
    assert replays[1] == (4, ["s00003_1", "s00002_0"], [0, 0], True)
    s = miner.stats()
    assert s["skipped_above_max"] == 5 and s["fallback_replays"] == 1 and s["fallback_images"] == 1


def test_a_rank_without_clean_images_replays_its_latest():
    miner = make(batch_size=2, every=2, max_loss=1.0)
    replays = drive(miner, [[3.0, 4.0], [float("nan"), 5.0]])
    assert replays == [(2, ["s00002_1", "s00002_0"], [0, 0], True)]
    assert miner.stats()["skipped_nonfinite"] == 1


def test_loss_term_and_per_image_losses_are_required():
    miner = make(batch_size=1, every=2, loss="loss_mask")
    miner.observe(1, ["a"], 0, {}, [{"loss_mask": 3.0, "loss_classifier": 0.1}])
    miner.observe(2, ["b"], 0, {}, [{"loss_mask": 1.0, "loss_classifier": 9.0}])
    assert miner.pop().keys == ["a"]
    with pytest.raises(ValueError, match="one loss dict per image"):
        make().observe(1, ["a", "b"], 0, {"loss": 1.0})


def test_replay_batches_mix_epochs_and_load_each_sample_with_its_own():
    miner = make(batch_size=2, every=2)
    miner.observe(1, ["a", "b"], 4, {}, [{"loss": 9.0}, {"loss": 1.0}])
    miner.observe(2, ["c", "d"], 5, {}, [{"loss": 8.0}, {"loss": 2.0}])
    replay = miner.pop()
    assert replay.keys == ["a", "c"] and replay.key_epochs() == [4, 5]

    class Loader:
        def load_batch(self, keys, epoch):
            return [f"img:{k}@{epoch}" for k in keys], [{"key": k, "epoch": epoch} for k in keys]

    images, targets = load_replay(Loader(), replay)
    assert images == ["img:a@4", "img:c@5"] and [t["key"] for t in targets] == ["a", "c"]


@pytest.mark.parametrize("roundtrip", [roundtrip_json, roundtrip_torch])
@settings(max_examples=25, deadline=None)
@given(losses=st.lists(st.lists(st.floats(0.0, 10.0) | st.just(float("nan")), min_size=3, max_size=3),
                       min_size=2, max_size=25),
       cut=st.integers(0, 24), top_k=st.integers(1, 3), max_loss=st.none() | st.floats(1.0, 9.0))
def test_state_round_trip_resumes_exactly(roundtrip, losses, cut, top_k, max_loss):
    kw = dict(batch_size=3, every=3, top_k=top_k, max_loss=max_loss, start_after=1)
    assert_resumes_exactly(make, drive, roundtrip, losses, cut, kw)


def test_resume_refuses_another_unit():
    image_state = make(every=4).state_dict()
    batch = build_miner(HardMiningConfig(enabled=True, every=4), warmup_steps=0, batch_size=2)
    with pytest.raises(ValueError, match="hard_mining.unit='image'"):
        batch.load_state_dict(image_state)
    with pytest.raises(ValueError, match="hard_mining.unit='batch'"):
        make(every=4).load_state_dict(batch.state_dict())


def test_config_unit_is_validated_and_batch_stays_the_batch_miner():
    cfg = config.from_dict({}, ["hard_mining.enabled=true", "hard_mining.unit=image"])
    assert cfg.hard_mining.unit == "image"
    with pytest.raises(config.ConfigError, match="unit"):
        config.from_dict({}, ["hard_mining.unit=images"])
    batch = build_miner(HardMiningConfig(enabled=True), warmup_steps=0, batch_size=2)
    assert type(batch).__name__ == "HardMiner"
    assert build_miner(HardMiningConfig(unit="image"), warmup_steps=0, batch_size=2) is None
    assert isinstance(build_miner(HardMiningConfig(enabled=True, unit="image"), warmup_steps=0, batch_size=2), ImageMiner)


def test_stepper_returns_each_local_images_terms_in_key_order():
    """With image_losses=True the Stepper hands back one dict of terms (+ "loss", their sum) per
    local image, aligned with `keys`, across micro-batches; the batch losses are unchanged."""
    import contextlib

    from fashionseg.train.step import Stepper

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, images, targets, image_losses=False):
            x = torch.stack([im.float().mean() for im in images]) * self.w
            per_image = {"loss_a": x.detach(), "loss_b": 2 * x.detach()}
            losses = {"loss_a": x.mean(), "loss_b": 2 * x.mean()}
            return (losses, per_image) if image_losses else losses

    class Backend:
        def micro(self, last):
            return contextlib.nullcontext()

        def backward(self, loss, last):
            loss.backward()

        def step(self, skip):
            return not skip

    def batch(values):
        return [torch.full((1, 2, 2), float(v)) for v in values], [{"key": f"k{v}"} for v in values]

    stepper = Stepper(Model(), Backend(), torch.device("cpu"), 1.0, 1, lambda: False, image_losses=True)
    out = stepper(iter([batch([1, 2]), batch([3, 4])]), 2)
    assert out.keys == ["k1", "k2", "k3", "k4"]
    assert [d["loss_a"] for d in out.image_losses] == [1.0, 2.0, 3.0, 4.0]
    assert [d["loss"] for d in out.image_losses] == [3.0, 6.0, 9.0, 12.0]
    assert out.losses == {"loss_a": 2.5, "loss_b": 5.0, "loss": 7.5}
    plain = Stepper(Model(), Backend(), torch.device("cpu"), 1.0, 1, lambda: False)(iter([batch([1, 2])]), 1)
    assert plain.image_losses == [] and plain.losses == {"loss_a": 1.5, "loss_b": 3.0, "loss": 4.5}


@pytest.mark.parametrize("unit", ["batch", "image"])
def test_a_skipped_step_is_never_mined_whatever_the_loss_term(unit):
    from types import SimpleNamespace

    from fashionseg.train.hooks import HardMiningReplay
    from fashionseg.train.step import StepOutput

    miner = build_miner(HardMiningConfig(enabled=True, unit=unit, loss="loss_mask", every=100), 0, batch_size=2)
    trainer = SimpleNamespace(state=SimpleNamespace(step=1), data=SimpleNamespace(epoch=0))
    terms = {"loss_mask": 1.0, "loss": 2.0}
    out = StepOutput(None, True, False, 2, 0.0, ["a", "b"], terms, [terms, terms] if unit == "image" else [])
    HardMiningReplay(miner, loader=None).after_step(trainer, out)
    assert miner.stats()["skipped_nonfinite"] == (2 if unit == "image" else 1)
