"""The rest of an epoch re-planned on another layout: whatever layouts A and B and wherever A
stopped, A's steps plus B's plan use every stream item of the epoch exactly once plus the
duplicates the two plans counted, and B gives every rank the same number of full steps."""
from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fashionseg.data.plan import PlanConfig, PlanError, build_plan
from test_plan import make_split

layout = st.fixed_dictionaries({
    "world": st.integers(1, 6),
    "bs": st.lists(st.integers(1, 4), min_size=6, max_size=6),
    "workers": st.integers(0, 3),
})


def _plan(split, lay, cfg, consumed=None, seed=3, epoch=1):
    return build_plan(split, seed=seed, epoch=epoch, batch_sizes=lay["bs"][: lay["world"]], workers=lay["workers"],
                      cfg=cfg, consumed=consumed)


def _taken(plan, steps):
    """Pool indices every rank takes in its first `steps` steps, and the rank step counts."""
    return Counter(i for r in range(plan.world_size) for b in plan.rank_batches(r)[:steps] for i in b)


def _check_rest(plan):
    steps = plan.rank_steps[0]
    assert plan.rank_steps == [steps] * plan.world_size, "every rank runs the same number of steps"
    for r, b in enumerate(plan.batch_sizes):
        assert all(len(x) == b for x in plan.rank_batches(r)), "full batches on every rank"
    assert plan.duplicates < sum(plan.batch_sizes)


@settings(max_examples=300, deadline=None)
@given(shards=st.lists(st.integers(1, 30), min_size=1, max_size=5), a=layout, b=layout, c=layout,
       group=st.booleans(), rfs=st.sampled_from([0.0, 0.3]), chunk=st.integers(1, 6), data=st.data())
def test_consumed_on_a_plus_rest_on_b_is_the_epoch(shards, a, b, c, group, rfs, chunk, data):
    split = make_split(shards, seed=sum(shards))
    cfg = PlanConfig(chunk_size=chunk, mix_chunks=2, group_aspect_ratio=group, repeat_factor_threshold=rfs)
    try:
        pa = _plan(split, a, cfg)
        for lay in (b, c):
            _plan(split, lay, cfg)
    except PlanError:
        return  # a layout whose global batch exceeds the epoch: refused up front, as for a fresh run
    epoch_items = Counter(pa.stream_pool[: pa.originals].tolist())  # the layout-free stream's multiset
    cut = data.draw(st.integers(0, pa.rank_steps[0]), label="cut on A")
    mask, dups_a = pa.consumed_after(cut)
    seen = _taken(pa, cut)
    assert sum(seen.values()) == cut * sum(pa.batch_sizes) == int(mask.sum()) + dups_a

    pb = _plan(split, b, cfg, consumed=mask)
    _check_rest(pb)
    assert pb.originals == len(mask) - int(mask.sum())
    assert pb.rank_steps[0] == -(-pb.originals // sum(pb.batch_sizes))
    cut_b = data.draw(st.integers(0, pb.rank_steps[0]), label="cut on B")
    mask_b, dups_b = pb.consumed_after(cut_b)
    assert (mask_b >= mask).all(), "the consumed set only grows"
    seen += _taken(pb, cut_b)

    pc = _plan(split, c, cfg, consumed=mask_b)  # and once more, from B's own re-plan
    _check_rest(pc)
    seen += _taken(pc, pc.rank_steps[0])
    extra = seen - epoch_items
    assert not (epoch_items - seen), "every stream item of the epoch is used"
    assert sum(extra.values()) == dups_a + dups_b + pc.duplicates, "nothing twice except the counted duplicates"
    if rfs == 0:
        assert set(epoch_items.values()) == {1} and set(seen) == set(range(len(pa.pool)))


@settings(max_examples=100, deadline=None)
@given(shards=st.lists(st.integers(1, 30), min_size=1, max_size=5), a=layout, data=st.data())
def test_same_layout_rest_is_the_uninterrupted_plan(shards, a, data):
    """A->A: continuing the plan at step k gives what the uninterrupted plan gives from k on, and
    a plan over an empty consumed set is the plan of the full epoch."""
    split = make_split(shards, seed=len(shards))
    try:
        full = _plan(split, a, PlanConfig())
    except PlanError:
        return
    none = _plan(split, a, PlanConfig(), consumed=np.zeros(full.stream_len, bool))
    for r in range(full.world_size):
        assert none.rank_batches(r) == full.rank_batches(r)
    cut = data.draw(st.integers(0, full.rank_steps[0]))
    mask, dups = full.consumed_after(cut)
    end_mask, end_dups = full.consumed_after(full.rank_steps[0])
    assert end_mask.all() and end_dups == full.duplicates
    rest = _plan(split, a, PlanConfig(), consumed=mask)
    assert rest.rank_steps[0] <= full.rank_steps[0] - cut + 1  # a re-plan never needs more than one extra step


def test_the_end_of_an_epoch_with_few_items_left():
    """3 items left for a global batch of 8: one step, the copies cycle over the 3 (5 duplicates)."""
    split = make_split([20])
    full = build_plan(split, seed=0, epoch=0, batch_sizes=[4], workers=0)
    mask, _ = full.consumed_after(4)  # 16 used, 4 left
    mask[np.flatnonzero(~mask)[0]] = True  # and one more: 3 left
    rest = build_plan(split, seed=0, epoch=0, batch_sizes=[4, 4], workers=1, consumed=mask)
    assert rest.rank_steps == [1, 1] and rest.originals == 3 and rest.duplicates == 5
    used = Counter(i for r in range(2) for b in rest.rank_batches(r) for i in b)
    assert set(used) == set(full.stream_pool[~mask].tolist()) and sorted(used.values()) == [2, 3, 3]
    done = build_plan(split, seed=0, epoch=0, batch_sizes=[4, 4], workers=1, consumed=np.ones(20, bool))
    assert done.rank_steps == [0, 0] and done.duplicates == 0
