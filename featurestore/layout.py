"""Where an entry's pieces live inside a store, and how its arrays are chunked and compressed.

One entry = one Zarr v3 group named by its key::

    <key>/entry.json             the EntrySpec (kind, identity, parent, producer) + layout; created first
    <key>/zarr.json              the Zarr group (attributes mirror entry.json for plain-zarr readers)
    <key>/<array>/...            row-sharded arrays: [rows, width] or [rows]
    <key>/status/...             per-row uint8: 0 never written, 1 ok, 2 failed (reason in the commit record)
    <key>/docs/<name>.json       JSON documents (dataset manifest, metrics, ...)
    <key>/blobs/<name>           opaque files (e.g. safetensors weights)
    <key>/_attempts/<shard>/<attempt>/<array>
                                 one write attempt's encoded shard objects, staged before its claim
    <key>/_claims/<shard>.json   one per shard, created-if-absent: names the attempt whose bytes win
    <key>/_commits/<shard>.json  one per shard, created after the winner's objects are in place
    <key>/manifest.json          the final manifest, created last: the entry is complete iff it exists

Every array shares the same row sharding, so shard ``i`` is rows
``[i * shard_rows, min((i+1) * shard_rows, rows))`` of all of them and is written by one writer
in one go. Inside a shard, rows are split into inner chunks of ``chunk_rows`` so a reader can
fetch a few rows with byte-range reads instead of the whole shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

STATUS_MISSING, STATUS_OK, STATUS_FAILED = 0, 1, 2
STATUS_ARRAY = "status"

# Chosen by measurement (benchmarks/codec_choice.py, benchmarks/store_read.py, RESULTS.md):
# float16 pooled activations are nearly incompressible (10 noisy mantissa bits per value; the
# best lossless codec saves 1-11%), while decoding costs 2-5x of warm read throughput. GSFs are
# written once and streamed every epoch, so the default stores chunks raw. Entries record their
# codec, so a deployment on a slow link can choose {"name": "zstd", "level": 1} per job.
DEFAULT_CODEC: dict[str, Any] = {"name": "none"}


def make_compressors(config: Mapping[str, Any]) -> list:
    """zarr v3 compressors from their JSON description (kept in the entry's layout)."""
    kind = config["name"]
    if kind == "none":
        return []
    if kind == "blosc":
        return [BloscCodec(cname=config["cname"], clevel=config["clevel"], shuffle=config["shuffle"])]
    if kind == "zstd":
        return [ZstdCodec(level=config["level"])]
    raise ValueError(f"unknown codec {kind!r}; known: none, blosc, zstd")


@dataclass(frozen=True)
class ArraySpec:
    """A row-aligned array: ``width`` 0 means one value per row (shape ``[rows]``)."""

    name: str
    width: int
    dtype: str

    def shape(self, rows: int) -> tuple[int, ...]:
        return (rows, self.width) if self.width else (rows,)


@dataclass(frozen=True)
class EntryLayout:
    """Row count, row sharding and the arrays of an entry (plus the per-row status array)."""

    rows: int
    shard_rows: int
    arrays: tuple[ArraySpec, ...]
    chunk_rows: int = 32
    codec: Mapping[str, Any] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.codec is None:
            object.__setattr__(self, "codec", dict(DEFAULT_CODEC))
        if self.rows < 0 or self.shard_rows < 1 or self.chunk_rows < 1:
            raise ValueError("rows must be ≥ 0 and shard_rows, chunk_rows ≥ 1")
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        names = [a.name for a in self.arrays]
        if STATUS_ARRAY in names or len(set(names)) != len(names):
            raise ValueError(f"array names must be unique and not {STATUS_ARRAY!r}: {names}")

    @property
    def all_arrays(self) -> tuple[ArraySpec, ...]:
        return self.arrays + (ArraySpec(STATUS_ARRAY, 0, "uint8"),)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.rows / self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        if not (0 <= shard < self.num_shards):
            raise IndexError(f"shard {shard} outside 0..{self.num_shards - 1}")
        return shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.rows)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows) // self.shard_rows

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "shard_rows": self.shard_rows, "chunk_rows": self.chunk_rows,
                "codec": dict(self.codec),
                "arrays": [{"name": a.name, "width": a.width, "dtype": a.dtype} for a in self.arrays]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EntryLayout:
        return cls(rows=data["rows"], shard_rows=data["shard_rows"], chunk_rows=data["chunk_rows"],
                   codec=dict(data["codec"]), arrays=tuple(ArraySpec(**a) for a in data["arrays"]))


def default_shard_rows(row_bytes: int, target_bytes: int = 16 << 20, chunk_rows: int = 32) -> int:
    """Rows per shard so a shard holds about ``target_bytes`` uncompressed (a good S3 object size)."""
    rows = max(chunk_rows, target_bytes // max(row_bytes, 1))
    return (rows // chunk_rows) * chunk_rows


# -- paths inside the store ---------------------------------------------------------------------

def entry_path(key: str) -> str:
    return f"{key}/entry.json"


def manifest_path(key: str) -> str:
    return f"{key}/manifest.json"


def commit_path(key: str, shard: int) -> str:
    return f"{key}/_commits/{shard:06d}.json"


def commits_prefix(key: str) -> str:
    return f"{key}/_commits/"


def claim_path(key: str, shard: int) -> str:
    """The record naming the one write attempt whose bytes become shard ``shard`` (writer.py)."""
    return f"{key}/_claims/{shard:06d}.json"


def attempts_prefix(key: str, shard: int | None = None) -> str:
    """Staged objects of write attempts: of one shard, or (``None``) of every shard."""
    return f"{key}/_attempts/" if shard is None else f"{key}/_attempts/{shard:06d}/"


def attempt_object_path(key: str, shard: int, attempt: str, array: ArraySpec) -> str:
    """One attempt's staged copy of one array's shard object (same bytes as the zarr object)."""
    return f"{attempts_prefix(key, shard)}{attempt}/{array.name}"


def doc_path(key: str, name: str) -> str:
    return f"{key}/docs/{name}.json"


def blob_path(key: str, name: str) -> str:
    return f"{key}/blobs/{name}"


def shard_object_path(key: str, array: ArraySpec, shard: int) -> str:
    """The object holding one shard of one array (zarr v3 default chunk key encoding)."""
    return f"{key}/{array.name}/c/{shard}/0" if array.width else f"{key}/{array.name}/c/{shard}"
