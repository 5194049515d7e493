"""Epoch partition plan: which rows each (node, rank, dataloader worker) reads, as a pure function.

The plan works on *spans* — contiguous row ranges inside one shard — so a reader fetches whole
shards (or large pieces of them) and never scatters small reads over the store.

For an epoch:

1. Shards are visited in an order drawn from ``(seed, epoch)``; rows inside a shard stay in
   order. This row sequence covers every row exactly once.
2. Ranks get equal, contiguous pieces of that sequence. When ``num_rows`` is not a multiple of
   the world size, the default **pads**: the sequence is extended by cycling it from its start,
   and those extra spans are flagged ``pad=True`` so training can mask them out of losses and
   metrics. Every row is then read exactly once as a non-pad row, and each rank gets
   ``ceil(num_rows / world_size)`` rows. With ``drop_last=True`` the tail of the sequence is
   dropped instead (``floor`` rows per rank); which rows are dropped changes with the epoch.
3. Inside a rank, dataloader workers get contiguous, near-equal pieces (sizes differ by ≤ 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class World:
    """Where a reader sits: global rank among ``world_size`` ranks, and its dataloader worker.

    ``node`` and ``local_rank`` are derived from the global rank and ``ranks_per_node``; the plan
    only needs the global rank, but logs and caches want the node.
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    ranks_per_node: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")
        if not (0 <= self.worker < self.num_workers):
            raise ValueError(f"worker {self.worker} outside {self.num_workers} dataloader workers")
        if self.ranks_per_node < 1:
            raise ValueError("ranks_per_node must be ≥ 1")

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node



@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of shard ``shard`` (global row indices); ``pad`` marks padding repeats."""

    shard: int
    start: int
    stop: int
    pad: bool = False

    def __len__(self) -> int:
        return self.stop - self.start


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of shards visited in ``epoch``; a new order each epoch, same for every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def rows_per_rank(num_rows: int, world_size: int, drop_last: bool = False) -> int:
    return num_rows // world_size if drop_last else math.ceil(num_rows / world_size)


def _cut(sequence: list[Span], offsets: np.ndarray, start: int, stop: int) -> list[Span]:
    """Spans covering positions ``[start, stop)`` of the sequence, cycling past its end as padding."""
    total = int(offsets[-1])
    out: list[Span] = []
    pos = start
    while pos < stop:
        lap, at = divmod(pos, total)
        i = int(np.searchsorted(offsets, at, side="right")) - 1
        span = sequence[i]
        begin = span.start + (at - int(offsets[i]))
        take = min(span.stop - begin, stop - pos)
        out.append(Span(span.shard, begin, begin + take, pad=lap > 0))
        pos += take
    return out


def plan_epoch(num_rows: int, shard_rows: int, world_size: int, num_workers: int, seed: int,
               epoch: int, drop_last: bool = False) -> list[list[list[Span]]]:
    """The whole epoch's plan: ``plan[rank][worker]`` is the list of spans that reader visits."""
    if num_rows < 0 or shard_rows < 1 or world_size < 1 or num_workers < 1:
        raise ValueError("need num_rows ≥ 0, shard_rows ≥ 1, world_size ≥ 1, num_workers ≥ 1")
    num_shards = math.ceil(num_rows / shard_rows)
    sequence = [Span(int(s), int(s) * shard_rows, min((int(s) + 1) * shard_rows, num_rows))
                for s in shard_order(num_shards, seed, epoch)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequence], dtype=np.int64)])
    per_rank = rows_per_rank(num_rows, world_size, drop_last)
    plan = []
    for rank in range(world_size):
        rank_start = rank * per_rank
        worker_plan = []
        for worker in range(num_workers):
            lo = rank_start + (per_rank * worker) // num_workers
            hi = rank_start + (per_rank * (worker + 1)) // num_workers
            worker_plan.append(_cut(sequence, offsets, lo, hi) if num_rows else [])
        plan.append(worker_plan)
    return plan


def plan_for(world: World, num_rows: int, shard_rows: int, seed: int, epoch: int,
             drop_last: bool = False) -> list[Span]:
    """The spans one reader visits in ``epoch``."""
    plan = plan_epoch(num_rows, shard_rows, world.world_size, world.num_workers, seed, epoch, drop_last)
    return plan[world.rank][world.worker]


@dataclass(frozen=True, eq=False)
class ShuffledEpoch:
    """One rank's epoch as a shuffle-buffered sequence: ``positions`` (into the caller's rows) in
    visiting order, their ``pad`` flags, and ``window_starts``: where each shuffle window begins
    (ending with ``len(positions)``). A reader holds one window's blocks (and prefetches the next)."""

    positions: np.ndarray
    pad: np.ndarray
    window_starts: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    def windows(self) -> list[slice]:
        return [slice(int(a), int(b)) for a, b in zip(self.window_starts[:-1], self.window_starts[1:])]


def plan_shuffled(block_of: np.ndarray, world: World, seed: int, epoch: int, window_blocks: int,
                  drop_last: bool = False, shares: Sequence[int] | None = None) -> ShuffledEpoch:
    """Shuffle-buffered epoch over ``len(block_of)`` positions, each stored in block ``block_of[i]``
    (e.g. the shard holding it): a pure function of its arguments.

    1. Positions are grouped by block; the blocks are visited in an order drawn from
       ``(seed, epoch)``, the same on every rank.
    2. Ranks take equal, contiguous pieces of that sequence, padded as in :func:`plan_epoch`
       (``pad=True`` rows repeat real ones and carry weight 0); ``drop_last`` drops instead.
       With ``shares`` rank r takes ``shares[r]`` rows instead (their sum ≥ the rows; a global
       batch that the world size does not divide gives ranks unequal quotas per step).
    3. A rank's piece is cut into windows of ``window_blocks`` consecutive blocks, and each window
       is permuted row by row, seeded by ``(seed, epoch, rank, window)``.

    So every real position is visited exactly once per epoch, a batch mixes rows from up to
    ``window_blocks`` blocks, and batches differ from epoch to epoch, while a reader needs only
    the blocks of one window at a time (memory bounded by the window, not by the dataset).
    """
    block_of = np.asarray(block_of)
    if window_blocks < 1:
        raise ValueError("window_blocks must be ≥ 1")
    n = len(block_of)
    order = np.argsort(block_of, kind="stable")
    starts = np.flatnonzero(np.r_[True, block_of[order][1:] != block_of[order][:-1]]) if n else np.zeros(0, np.int64)
    bounds = np.r_[starts, n]
    rng = np.random.default_rng([seed, epoch])
    visit = rng.permutation(len(starts))
    sequence = np.concatenate([order[bounds[b]:bounds[b + 1]] for b in visit]) if n else np.zeros(0, np.int64)
    piece_of = np.repeat(np.arange(len(visit)), np.diff(bounds)[visit]) if n else np.zeros(0, np.int64)
    if shares is None:
        shares = [rows_per_rank(n, world.world_size, drop_last)] * world.world_size
    if len(shares) != world.world_size or (sum(shares) < n and not drop_last):
        raise ValueError(f"shares {list(shares)} must give each of {world.world_size} ranks a count, {n} rows in all")
    first = int(sum(shares[:world.rank]))
    at = np.arange(first, first + int(shares[world.rank]), dtype=np.int64)
    if n == 0:
        at = at[:0]
    lap, index = (at // n, at % n) if n else (at, at)
    positions, pad = sequence[index], lap > 0
    piece = piece_of[index] + lap * len(visit)  # a repeated block is a new piece
    piece_starts = np.flatnonzero(np.r_[True, piece[1:] != piece[:-1]]) if len(piece) else np.zeros(0, np.int64)
    window_starts = np.r_[piece_starts[::window_blocks], len(positions)].astype(np.int64)
    for w, (a, b) in enumerate(zip(window_starts[:-1], window_starts[1:])):
        perm = np.random.default_rng([seed, epoch, world.rank, w]).permutation(int(b - a)) + a
        positions[a:b], pad[a:b] = positions[perm], pad[perm]
    return ShuffledEpoch(positions.astype(np.int64), pad, window_starts)
