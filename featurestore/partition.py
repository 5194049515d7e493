"""Epoch partition plan: which rows each DDP rank reads, as a pure function (:func:`plan_shuffled`).

The one planner of the project: the student loader (rows grouped by the stored shard that holds
their view), the distiller (GSF rows grouped by block of storage order) and
``EntryReader.iter_epoch`` (an entry's rows grouped by shard) all plan their epochs with it. Rows
are grouped into *blocks* — the unit a reader fetches whole — so reads stay large, while a
shuffle window of several blocks, permuted row by row, mixes rows from far apart:

1. Blocks are visited in an order drawn from ``(seed, epoch)``, the same on every rank. This
   sequence covers every row exactly once.
2. Ranks get equal, contiguous pieces of that sequence. When the rows are not a multiple of the
   world size, the default **pads**: the sequence is extended by cycling it from its start, and
   those extra rows are flagged ``pad`` so training masks them out of losses and metrics. Every
   row is then read exactly once as a non-pad row, and each rank gets ``ceil(rows / world_size)``
   rows. With ``drop_last`` the tail is dropped instead (``floor`` rows per rank); which rows are
   dropped changes with the epoch. Explicit per-rank ``shares`` serve a global batch that the
   world size does not divide.
3. A rank's piece is cut into windows of ``window_blocks`` blocks, each permuted row by row.
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


def rows_per_rank(num_rows: int, world_size: int, drop_last: bool = False) -> int:
    return num_rows // world_size if drop_last else math.ceil(num_rows / world_size)


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
    2. Ranks take equal, contiguous pieces of that sequence, padded (``pad=True`` rows repeat
       real ones and carry weight 0); ``drop_last`` drops instead.
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
