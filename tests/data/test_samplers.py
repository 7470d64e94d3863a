"""Sampler semantics: XTuner's length grouping, the rank split, seeds and exact resume."""

import numpy as np
import pytest

from tuneforge.data.samplers import RowSampler, length_grouped_order


def drain(sampler, count):
    out = []
    while (rows := sampler.take(count)) is not None:
        out.append(rows.tolist())
    return out


def test_length_grouped_megabatches_sorted_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=400)
    group = 2 * 2  # per-device batch x world
    order = length_grouped_order(lengths, group, np.random.default_rng(5))
    assert sorted(order.tolist()) == list(range(400))
    size = min(400 // (4 * group), 50) * group  # = 100
    assert lengths[order[0]] == lengths.max()  # the longest sample comes first overall
    for start in range(0, 400, size):
        mb = lengths[order[start: start + size]]
        tail = mb[1:] if start == 0 else mb  # the first megabatch's head was swapped in
        assert (np.diff(tail) <= 0).all()


def test_length_grouped_small_dataset_uses_one_group():
    lengths = np.array([5, 1, 9, 3, 7])
    order = length_grouped_order(lengths, group=4, rng=np.random.default_rng(0))
    # mult = max(min(5 // 16, 50), 1) = 1 -> megabatches of 4 rows, each sorted
    assert lengths[order[0]] == 9 and sorted(order.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["random", "sequential", "length_grouped"])
def test_ranks_split_one_global_order(kind):
    lengths = np.arange(1, 23)
    single = RowSampler(lengths, kind, rank=0, world=1, seed=7, batch_per_rank=4)
    ranks = [RowSampler(lengths, kind, rank=r, world=2, seed=7, batch_per_rank=2) for r in range(2)]
    if kind != "length_grouped":  # grouping depends on B*W, which is equal here (4 == 2*2)
        pass
    g = single.global_order(0)
    parts = [s.rank_order(0) for s in ranks]
    assert sorted(np.concatenate(parts).tolist()) == sorted(np.concatenate([g, g[: len(parts[0]) * 2 - len(g)]]).tolist())
    # every step of 2 rows per rank covers a contiguous block of the global order
    order2 = ranks[0].global_order(0)
    for step in range(len(parts[0]) // 2):
        block = sorted(np.concatenate([p[2 * step: 2 * step + 2] for p in parts]).tolist())
        assert block == sorted(order2[4 * step: 4 * step + 4].tolist())


def test_random_is_seeded_and_differs_by_epoch():
    lengths = np.ones(50)
    a = RowSampler(lengths, "random", rank=0, world=1, seed=1)
    b = RowSampler(lengths, "random", rank=0, world=1, seed=1)
    c = RowSampler(lengths, "random", rank=0, world=1, seed=2)
    assert np.array_equal(a.rank_order(0), b.rank_order(0))
    assert not np.array_equal(a.rank_order(0), a.rank_order(1))
    assert not np.array_equal(a.rank_order(0), c.rank_order(0))
    assert np.array_equal(RowSampler(lengths, "sequential", rank=0, world=1, seed=1).rank_order(3), np.arange(50))


@pytest.mark.parametrize("kind", ["random", "length_grouped"])
def test_resume_continues_with_exactly_the_next_batch(kind):
    lengths = np.random.default_rng(0).integers(1, 50, size=37)
    full = RowSampler(lengths, kind, rank=1, world=2, seed=3, batch_per_rank=3)
    reference = []
    for epoch in range(2):
        full.set_epoch(epoch)
        reference += drain(full, 3)
    first = RowSampler(lengths, kind, rank=1, world=2, seed=3, batch_per_rank=3)
    got = [first.take(3).tolist() for _ in range(4)]
    state = first.state_dict()
    resumed = RowSampler(lengths, kind, rank=1, world=2, seed=3, batch_per_rank=3)
    resumed.load_state_dict(state)
    got += drain(resumed, 3)
    resumed.set_epoch(1)
    got += drain(resumed, 3)
    assert got == reference


def test_state_from_other_data_is_refused():
    s = RowSampler(np.ones(10), "random", rank=0, world=1, seed=0)
    with pytest.raises(ValueError, match="10 rows"):
        RowSampler(np.ones(11), "random", rank=0, world=1, seed=0).load_state_dict(s.state_dict())
