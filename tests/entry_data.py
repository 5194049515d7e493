"""Deterministic test entries: any process can rebuild the same spec, layout and rows."""

from __future__ import annotations

import numpy as np

from featurestore.layout import ArraySpec, EntryLayout
from featurestore.specs import EntrySpec

WIDTH = 48


def make_spec(tag: str = "test") -> EntrySpec:
    return EntrySpec(kind="gsf", identity={"dataset": tag, "width": WIDTH})


def make_layout(rows: int = 100, shard_rows: int = 32, chunk_rows: int = 8, codec: dict | None = None) -> EntryLayout:
    return EntryLayout(rows=rows, shard_rows=shard_rows, chunk_rows=chunk_rows, codec=codec,
                       arrays=(ArraySpec("gsf", WIDTH, "float16"), ArraySpec("dist", 10, "float32")))


def make_rows(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Non-negative heavy-tailed float16 'features' and normalised float32 'distributions'."""
    rng = np.random.default_rng(seed)
    gsf = (rng.lognormal(-1, 1, size=(rows, WIDTH)) * (rng.random((rows, WIDTH)) > 0.1)).astype(np.float16)
    dist = rng.dirichlet(np.ones(10), size=rows).astype(np.float32)
    return {"gsf": gsf, "dist": dist}


def failures_for(start: int, stop: int) -> dict[int, str]:
    """Every 7th row fails, with a reason naming it."""
    return {r: f"decode error in image {r}" for r in range(start, stop) if r % 7 == 3}


def write_shards(writer, data: dict[str, np.ndarray], shards) -> None:
    for shard in shards:
        start, stop = writer.layout.shard_range(shard)
        failures = failures_for(start, stop)
        block = {k: v[start:stop].copy() for k, v in data.items()}
        for r in failures:  # failed rows hold zeros
            for v in block.values():
                v[r - start] = 0
        writer.write_shard(shard, block, failures=failures)


def expected_rows(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in data.items()}
    for r in failures_for(0, len(data["gsf"])):
        for v in out.values():
            v[r] = 0
    return out
