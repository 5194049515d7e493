"""Decode a whole Zarr v3 shard in one pass, for streaming reads.

zarr-python reads a shard through an async pipeline that handles every inner chunk as a separate
request with its own Python overhead; at GSF row widths that caps local streaming at a fraction
of disk speed. Streaming reads want the opposite: one GET per shard, then every inner chunk
decompressed straight into one preallocated block, in parallel (Blosc and Zstd release the GIL).

This module implements only that, for the layouts this store writes (row-chunked arrays,
``sharding_indexed`` with ``bytes`` + one compressor inside, index at the end protected by
CRC32C — see the Zarr v3 sharding spec). :meth:`ShardDecoder.from_metadata` returns ``None``
for anything else, and callers fall back to zarr. Tests check it bit-exact against zarr.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import google_crc32c
import numpy as np
from numcodecs import Blosc, Zstd

_EMPTY = np.uint64(2**64 - 1)  # offset and length of an inner chunk that was never written
_POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="shard-decode")
_SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


class CorruptShard(ValueError):
    """A shard object whose index or chunks do not decode."""


def _compressor(codec: Mapping[str, Any]):
    """The numcodecs decoder for a zarr v3 compressor entry (``False`` if unsupported)."""
    config = codec.get("configuration", {})
    if codec["name"] == "blosc":
        return Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=_SHUFFLES[config["shuffle"]])
    if codec["name"] == "zstd":
        return Zstd(level=config.get("level", 0))
    return False


@dataclass(frozen=True)
class ShardDecoder:
    """Decodes shards of one array: ``[shard_rows, *row_shape]`` made of ``chunk_rows`` chunks."""

    dtype: np.dtype
    row_shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    compressor: Any  # None: chunks are stored raw

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ShardDecoder | None:
        """A decoder for an array's ``zarr.json``, or ``None`` when its layout is not one we write."""
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        sharding = codecs[0]["configuration"]
        inner, index = sharding["codecs"], sharding["index_codecs"]
        shard_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk_shape = sharding["chunk_shape"]
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        if (sharding.get("index_location", "end") != "end" or index != [little, {"name": "crc32c"}]
                or len(inner) not in (1, 2) or inner[0]["name"] != "bytes"
                or inner[0].get("configuration", {}).get("endian", "little") != "little"
                or list(chunk_shape[1:]) != list(meta["shape"][1:])
                or list(shard_shape[1:]) != list(meta["shape"][1:])
                or meta.get("fill_value") not in (0, 0.0)):
            return None
        compressor = _compressor(inner[1]) if len(inner) == 2 else None
        if compressor is False:
            return None
        return cls(dtype=np.dtype(meta["data_type"]).newbyteorder("<"), row_shape=tuple(meta["shape"][1:]),
                   shard_rows=shard_shape[0], chunk_rows=chunk_shape[0], compressor=compressor)

    @property
    def num_chunks(self) -> int:
        return self.shard_rows // self.chunk_rows

    def index(self, data: memoryview) -> np.ndarray:
        """The ``[num_chunks, 2]`` (offset, length) table at the end of a shard, CRC-checked."""
        size = self.num_chunks * 16
        if len(data) < size + 4:
            raise CorruptShard(f"shard object of {len(data)} bytes is shorter than its index")
        raw = data[len(data) - size - 4:len(data) - 4]
        crc = int.from_bytes(data[len(data) - 4:], "little")
        if google_crc32c.value(bytes(raw)) != crc:
            raise CorruptShard("shard index checksum mismatch (truncated or overwritten object)")
        return np.frombuffer(raw, dtype="<u8").reshape(self.num_chunks, 2)

    def decode(self, data: bytes | memoryview, rows: int) -> np.ndarray:
        """The first ``rows`` rows of a shard object (a shard at the array's end holds fewer)."""
        view = memoryview(data).cast("B")
        table = self.index(view)
        needed = -(-rows // self.chunk_rows)
        chunk_bytes = self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        if self.compressor is None and np.array_equal(table[:needed, 0], np.arange(needed) * chunk_bytes) \
                and np.all(table[:needed, 1] == chunk_bytes):
            # raw chunks laid out in order: the shard's data section *is* the block
            block = np.frombuffer(view, self.dtype, count=needed * chunk_bytes // self.dtype.itemsize)
            block = block.reshape(-1, *self.row_shape)[:rows]
            return block if not view.readonly else block.copy()
        out = np.empty((needed * self.chunk_rows, *self.row_shape), self.dtype)

        def decode_chunk(i: int) -> None:
            offset, length = table[i]
            if offset == _EMPTY:  # never written: the fill value
                out[i * self.chunk_rows:(i + 1) * self.chunk_rows] = 0
                return
            if offset + length > len(view) - self.num_chunks * 16 - 4:
                raise CorruptShard(f"inner chunk {i} points past the end of the shard data")
            target = out[i * self.chunk_rows:(i + 1) * self.chunk_rows]
            chunk = view[int(offset):int(offset + length)]
            if self.compressor is None:
                if length != chunk_bytes:
                    raise CorruptShard(f"raw inner chunk {i} has {length} bytes, expected {chunk_bytes}")
                target.reshape(-1).view(np.uint8)[:] = np.frombuffer(chunk, np.uint8)
            elif np.asarray(self.compressor.decode(chunk, out=target)).nbytes != chunk_bytes:
                raise CorruptShard(f"inner chunk {i} decoded to the wrong size")

        for future in [_POOL.submit(decode_chunk, i) for i in range(needed)]:
            future.result()
        return out[:rows]
