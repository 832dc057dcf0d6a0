"""Unit tests of the hard-example miner: what it keeps, when it fires, and that it resumes exactly."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fashionseg.train.hard_mining import HardMiner, HardMiningConfig
from fashionseg.train.image_mining import build_miner


def make(**kw) -> HardMiner:
    warmup = kw.pop("warmup", 0)
    miner = build_miner(HardMiningConfig(enabled=True, **kw), warmup_steps=warmup, batch_size=2)
    assert miner is not None
    return miner


def keys_of(step: int, n: int = 2) -> list[str]:
    return [f"s{step:05d}_{i}" for i in range(n)]


def drive(miner: HardMiner, losses: list[float], first_step: int = 1) -> list[tuple]:
    """Run the loop's protocol over data steps first_step.. with the given total losses; return
    (step, keys, epoch, loss, fallback) of every replay."""
    out = []
    for i, loss in enumerate(losses):
        step = first_step + i
        keys = keys_of(step)
        miner.observe(step, keys, step // 7, {"loss_mask": loss / 2, "loss_box_reg": loss / 2})
        if miner.should_replay(step):
            for _ in range(miner.replays_per_trigger):
                r = miner.pop()
                miner.record_replay(r.loss, r.loss * 0.9)
                out.append((step, r.keys, r.epoch, r.loss, r.fallback))
    return out


def test_disabled_builds_nothing():
    assert build_miner(HardMiningConfig(), warmup_steps=10, batch_size=2) is None


@pytest.mark.parametrize("bad", [dict(every=0), dict(top_k=0), dict(start_after=-1), dict(max_loss=0.0),
                                 dict(max_loss=float("inf")), dict(loss="")])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="hard_mining"):
        HardMiningConfig(enabled=True, **bad)


@settings(max_examples=60, deadline=None)
@given(losses=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=40), top_k=st.integers(1, 4),
       every=st.integers(1, 8), start_after=st.integers(0, 10))
def test_replays_the_top_k_of_each_window_hardest_first(losses, top_k, every, start_after):
    miner = make(top_k=top_k, every=every, start_after=start_after)
    replays = drive(miner, losses)
    # Expected, computed independently: windows (start_after + (j-1)*every, start_after + j*every].
    expected = []
    for end in range(start_after + every, len(losses) + 1, every):
        window = [(losses[s - 1], s) for s in range(end - every + 1, end + 1)]
        ranked = sorted(window, reverse=True)[:top_k]
        for loss, s in ranked:
            expected.append((end, keys_of(s), s // 7, pytest.approx(loss / 2 + loss / 2), False))
        fallbacks = top_k - len(ranked)
        expected += [(end, keys_of(end), end // 7, pytest.approx(losses[end - 1]), True)] * fallbacks
    assert replays == expected


@settings(max_examples=40, deadline=None)
@given(a=st.lists(st.floats(0.0, 100.0), min_size=30, max_size=30),
       b=st.lists(st.floats(0.0, 100.0), min_size=30, max_size=30),
       every=st.integers(1, 6), top_k=st.integers(1, 3), max_loss=st.none() | st.floats(1.0, 50.0))
def test_trigger_is_identical_on_ranks_with_different_losses(a, b, every, top_k, max_loss):
    """Two 'ranks' seeing different losses (and a ceiling that may reject all of one rank's
    batches) replay at the same steps, the same number of times."""
    ranks = [make(every=every, top_k=top_k, max_loss=max_loss, start_after=3) for _ in range(2)]
    steps = [[r[0] for r in drive(m, losses)] for m, losses in zip(ranks, (a, b))]
    assert steps[0] == steps[1]
    assert steps[0] == [s for s in range(4, 31) if (s - 3) % every == 0 for _ in range(top_k)]
    assert ranks[0].stats()["replays"] == ranks[1].stats()["replays"] == len(steps[0])


def test_start_after_defaults_to_warmup():
    miner = make(every=5, warmup=12)
    assert miner.start_after == 12
    assert [s for s in range(1, 40) if miner.should_replay(s)] == [17, 22, 27, 32, 37]
    # batches during warmup are never mined: the first window is steps 13..17
    replays = drive(miner, [100.0] * 12 + [1.0, 2.0, 5.0, 3.0, 1.0])
    assert replays == [(17, keys_of(15), 15 // 7, 5.0, False)]


def test_ceiling_skips_label_noise_and_falls_back_to_recent_clean_batch():
    miner = make(every=4, max_loss=5.0)
    replays = drive(miner, [1.0, 9.0, 2.0, 3.0,      # window 1: 9.0 is above the ceiling -> 3.0 wins
                            8.0, 7.0, 6.0, 50.0])    # window 2: all above -> fallback to step 4
    assert replays == [(4, keys_of(4), 0, 3.0, False), (8, keys_of(4), 0, 3.0, True)]
    s = miner.stats()
    assert s["skipped_above_max"] == 5 and s["fallback_replays"] == 1 and s["replays"] == 2


def test_rank_that_never_saw_a_clean_batch_replays_its_latest():
    miner = make(every=2, max_loss=1.0)
    replays = drive(miner, [3.0, float("nan")])
    assert [(r[0], r[1], r[4]) for r in replays] == [(2, keys_of(2), True)]
    assert math.isnan(replays[0][3])
    assert miner.stats()["skipped_nonfinite"] == 1


def test_pop_before_observe_is_a_clear_error():
    with pytest.raises(RuntimeError, match="observe"):
        make().pop()


def test_loss_term_selection():
    miner = make(loss="loss_mask", every=2)
    miner.observe(1, ["a"], 0, {"loss_mask": 3.0, "loss_classifier": 0.1})
    miner.observe(2, ["b"], 0, {"loss_mask": 1.0, "loss_classifier": 9.0})
    assert list(miner.pop()) == [["a"], 0, 3.0]
    total = make()
    assert total.score({"loss": 2.5, "loss_mask": 1.0, "loss_box_reg": 1.5}) == 2.5   # the loop's total
    assert total.score({"loss_mask": 1.0, "loss_box_reg": 1.5}) == 2.5              # sum of the terms
    with pytest.raises(KeyError, match="loss_mask"):
        make(loss="loss_maks").observe(1, ["a"], 0, {"loss_mask": 1.0})


def test_memory_is_bounded_and_reported():
    miner = make(every=50, top_k=3)
    drive(miner, [float(i % 17) for i in range(1000)])
    s = miner.stats()
    per_batch = sum(len(k.encode()) for k in keys_of(1))
    assert s["batches_held"] <= 3 + 2
    assert 0 < s["bytes_held"] <= (3 + 2) * per_batch


def roundtrip_json(state):
    return json.loads(json.dumps(state))


def roundtrip_torch(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("roundtrip", [roundtrip_json, roundtrip_torch])
@settings(max_examples=25, deadline=None)
@given(losses=st.lists(st.floats(0.0, 10.0) | st.just(float("nan")), min_size=2, max_size=30),
       cut=st.integers(0, 29), top_k=st.integers(1, 3), max_loss=st.none() | st.floats(1.0, 9.0))
def test_state_round_trip_resumes_exactly(roundtrip, losses, cut, top_k, max_loss):
    assert_resumes_exactly(make, drive, roundtrip, losses, cut, dict(every=3, top_k=top_k, max_loss=max_loss, start_after=1))


def assert_resumes_exactly(make, drive, roundtrip, losses, cut, kw) -> None:
    """A miner restored from another's state after step `cut` replays, reports and saves exactly as
    one that never stopped."""
    cut = min(cut, len(losses) - 1)
    whole = make(**kw)
    expected = drive(whole, losses)
    first = make(**kw)
    before = drive(first, losses[:cut])
    resumed = make(**kw)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    after = drive(resumed, losses[cut:], first_step=cut + 1)
    assert repr(before + after) == repr(expected)           # repr: nan == nan
    assert repr(resumed.stats()) == repr(whole.stats())
    assert json.dumps(resumed.state_dict()) == json.dumps(whole.state_dict())


def test_resume_refuses_a_changed_schedule():
    state = make(every=4).state_dict()
    with pytest.raises(ValueError, match="count_in_schedule"):
        make(every=4, count_in_schedule=True).load_state_dict(state)
    with pytest.raises(ValueError, match="hard_mining.every=4"):
        make(every=5).load_state_dict(state)
    make(every=4, top_k=2, max_loss=3.0).load_state_dict(state)  # what to keep may change


def test_config_section_composes():
    """The run config knows the section: dotted overrides reach HardMiningConfig, typos are named."""
    from fashionseg.train import config

    cfg = config.from_dict({}, ["hard_mining.enabled=true", "hard_mining.every=2", "hard_mining.max_loss=4"])
    hm = cfg.hard_mining
    assert (hm.enabled, hm.every, hm.max_loss, hm.count_in_schedule) == (True, 2, 4.0, False)
    with pytest.raises(config.ConfigError, match="top_k"):
        config.from_dict({}, ["hard_mining.topk=2"])
    with pytest.raises(config.ConfigError, match="unknown key 'hard_mining.store'"):
        config.from_dict({}, ["hard_mining.store=keys"])  # the keys+bytes store is gone: keys is the only way
