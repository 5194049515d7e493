"""Properties of the epoch partition plan over many (rows, block size, world, window, seed, epoch)."""

from __future__ import annotations

from collections import Counter

from hypothesis import assume, given, settings
from hypothesis import strategies as st

import numpy as np

from featurestore.partition import World, plan_shuffled, rows_per_rank

def test_world_indices():
    w = World(rank=5, world_size=8, worker=1, num_workers=2, ranks_per_node=4)
    assert (w.node, w.local_rank) == (1, 1)
    assert rows_per_rank(10, 4) == 3 and rows_per_rank(10, 4, drop_last=True) == 2


shuffled_plans = st.tuples(st.integers(0, 400), st.integers(1, 40), st.integers(1, 6), st.integers(1, 5),
                           st.integers(0, 2**32 - 1), st.integers(0, 50), st.booleans())


def _blocks(rows: int, block_rows: int, seed: int) -> np.ndarray:
    """A block id per position, blocks of ``block_rows`` positions in a scrambled position order
    (the caller's rows need not be sorted by where they are stored)."""
    return np.random.default_rng(seed).permutation(np.arange(rows) // block_rows)


@settings(max_examples=300, deadline=None)
@given(shuffled_plans)
def test_shuffled_epoch_visits_every_position_exactly_once_with_equal_rank_counts(params):
    rows, block_rows, world, window, seed, epoch, drop_last = params
    blocks = _blocks(rows, block_rows, seed)
    epochs = [plan_shuffled(blocks, World(rank, world), seed, epoch, window, drop_last) for rank in range(world)]
    real = Counter(int(p) for e in epochs for p in e.positions[~e.pad])
    assert [len(e) for e in epochs] == [rows_per_rank(rows, world, drop_last)] * world
    if drop_last:
        assert not any(e.pad.any() for e in epochs) and len(real) == world * (rows // world)
    else:
        assert sorted(real) == list(range(rows))
    assert set(real.values()) <= {1}


@settings(max_examples=200, deadline=None)
@given(shuffled_plans)
def test_a_shuffle_window_holds_at_most_window_blocks_blocks(params):
    rows, block_rows, world, window, seed, epoch, drop_last = params
    blocks = _blocks(rows, block_rows, seed)
    for rank in range(world):
        e = plan_shuffled(blocks, World(rank, world), seed, epoch, window, drop_last)
        assert e.window_starts[0] == 0 and e.window_starts[-1] == len(e)
        for part in e.windows():
            # a block repeated as padding counts as one more block
            assert 1 <= len({(int(b), bool(p)) for b, p in zip(blocks[e.positions[part]], e.pad[part])}) <= window


@settings(max_examples=100, deadline=None)
@given(shuffled_plans)
def test_shuffled_epoch_is_a_pure_function(params):
    rows, block_rows, world, window, seed, epoch, drop_last = params
    blocks = _blocks(rows, block_rows, seed)
    a = plan_shuffled(blocks, World(seed % world, world), seed, epoch, window, drop_last)
    b = plan_shuffled(blocks.copy(), World(seed % world, world), seed, epoch, window, drop_last)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.pad, b.pad)
    assert np.array_equal(a.window_starts, b.window_starts)


def test_shuffled_batches_differ_between_epochs_and_mix_blocks():
    """The same row set never forms a batch in two consecutive epochs, and a batch draws on
    several blocks (not 16 neighbours of one shard, as a span plan gives)."""
    blocks = np.arange(4096) // 64
    batches = {}
    for epoch in (0, 1):
        e = plan_shuffled(blocks, World(0, 2), seed=3, epoch=epoch, window_blocks=8)
        batches[epoch] = [frozenset(e.positions[i:i + 16].tolist()) for i in range(0, len(e), 16)]
    assert not set(batches[0]) & set(batches[1])
    assert np.mean([len({int(p) // 64 for p in batch}) for batch in batches[0]]) > 4


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 9), st.one_of(st.none(), st.integers(1, 8)),
       st.integers(0, 2**32 - 1))
def test_a_global_batch_over_any_world_size_visits_every_row_once_in_equal_steps(rows, global_batch, world, micro,
                                                                               seed):
    """``trainers.student_data.BatchPlan`` shares with ``plan_shuffled``: every row exactly once,
    every rank the same number of micro-batches, each step exactly the global batch."""
    from trainers.student_data import BatchPlanError, _cuts, batch_plan

    try:
        plan = batch_plan(global_batch, world, micro)
    except BatchPlanError:
        assume(False)
    blocks = _blocks(rows, 7, seed)
    epochs = [plan_shuffled(blocks, World(r, world), seed, 1, 3, shares=plan.shares(rows)) for r in range(world)]
    real = Counter(int(p) for e in epochs for p in e.positions[~e.pad])
    assert sorted(real) == list(range(rows)) and set(real.values()) == {1}
    cuts = [_cuts(len(e), plan.micro_sizes(r)) for r, e in enumerate(epochs)]
    assert len({len(c) for c in cuts}) == 1 and len(cuts[0]) % plan.accumulation == 0
    for step in range(len(cuts[0]) // plan.accumulation):
        micro_batches = [c[step * plan.accumulation:(step + 1) * plan.accumulation] for c in cuts]
        assert sum(b - a for rank in micro_batches for a, b in rank) == global_batch
