"""Reading an entry: rows by index, contiguous ranges, and a partitioned, prefetching epoch stream."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import zarr

from .backends import Backend
from .layout import (STATUS_ARRAY, STATUS_FAILED, EntryLayout, blob_path, commit_path, doc_path,
                     entry_path, manifest_path, shard_object_path)
from .partition import Span, World, plan_for
from .shardcodec import ShardDecoder
from .specs import EntrySpec


class EntryNotFound(LookupError):
    """No entry with that key in the store (or it is not complete and completeness was required)."""


@dataclass
class Block:
    """Rows read together: global row indices, padding flags, and one array per requested name."""

    rows: np.ndarray
    pad: np.ndarray
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)


class EntryReader:
    """Read access to one entry. Open it with :meth:`FeatureStore.open`."""

    def __init__(self, backend: Backend, key: str, require_complete: bool = True):
        self.backend, self.key = backend, key
        record = backend.read_json(entry_path(key))
        if record is None:
            raise EntryNotFound(f"no entry {key!r} in store {backend.url}; list entries with "
                                f"`python -m featurestore ls {backend.url}`")
        self.spec = EntrySpec.from_json(record["spec"])
        self.layout = EntryLayout.from_json(record["layout"])
        self.attrs: dict[str, Any] = record.get("attrs", {})
        self.manifest: dict[str, Any] | None = backend.read_json(manifest_path(key))
        if require_complete and self.manifest is None:
            raise EntryNotFound(f"entry {key!r} in store {backend.url} is incomplete (no final manifest); "
                                "rerun the job that writes it to finish the missing shards")
        self._arrays: dict[str, zarr.Array] = {}
        self._decoders: dict[str, ShardDecoder | None] = {}
        self._pool: ThreadPoolExecutor | None = None

    @property
    def rows(self) -> int:
        return self.layout.rows

    @property
    def array_names(self) -> list[str]:
        return [a.name for a in self.layout.arrays]

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if name not in self.array_names and name != STATUS_ARRAY:
                raise KeyError(f"entry {self.key} has no array {name!r}; it has {self.array_names}")
            self._arrays[name] = zarr.open_array(self.backend.zarr_store, path=f"{self.key}/{name}", mode="r")
        return self._arrays[name]

    def _names(self, arrays: Sequence[str] | None) -> list[str]:
        return list(self.array_names if arrays is None else arrays)

    # -- random access ---------------------------------------------------------------------------

    def read_range(self, start: int, stop: int, arrays: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)``; whole shards take the one-GET fast path (shardcodec.py)."""
        if not (0 <= start <= stop <= self.rows):
            raise IndexError(f"row range [{start}, {stop}) outside entry of {self.rows} rows")
        return {name: self._read_range(name, start, stop) for name in self._names(arrays)}

    def _read_range(self, name: str, start: int, stop: int) -> np.ndarray:
        shard = start // self.layout.shard_rows
        whole_shard = start < self.rows and (start, stop) == self.layout.shard_range(shard)
        decoder = self._decoder(name) if whole_shard else None
        if decoder is None:
            return self.array(name)[start:stop]
        spec = {a.name: a for a in self.layout.all_arrays}[name]
        data = self.backend.read_buffer(shard_object_path(self.key, spec, shard))
        if data is None:
            raise FileNotFoundError(f"entry {self.key}: shard {shard} of {name!r} is missing from the store; "
                                    f"run `python -m featurestore verify {self.backend.url} {self.key}`")
        return decoder.decode(data, stop - start)

    def _decoder(self, name: str) -> ShardDecoder | None:
        if name not in self._decoders:
            meta = self.backend.read_json(f"{self.key}/{name}/zarr.json")
            self._decoders[name] = ShardDecoder.from_metadata(meta) if meta else None
        return self._decoders[name]

    def read_rows(self, rows: Sequence[int] | np.ndarray, arrays: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows by index, in the order given (duplicates allowed); each needed inner chunk is read once."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row indices outside entry of {self.rows} rows")
        unique, inverse = np.unique(rows, return_inverse=True)
        out = {}
        for name in self._names(arrays):
            arr = self.array(name)
            selection = (unique,) + (slice(None),) * (arr.ndim - 1)
            out[name] = arr.get_orthogonal_selection(selection)[inverse] if rows.size else \
                np.empty((0,) + arr.shape[1:], arr.dtype)
        return out

    def read_span(self, span: Span, arrays: Sequence[str] | None = None) -> Block:
        data = self.read_range(span.start, span.stop, arrays)
        return Block(np.arange(span.start, span.stop, dtype=np.int64), np.full(len(span), span.pad), data)

    # -- per-row status and documents ---------------------------------------------------------------

    def status(self) -> np.ndarray:
        return self.array(STATUS_ARRAY)[:]

    def failures(self) -> dict[int, str]:
        """Global row → reason, for every failed row (from the shards' commit records)."""
        failed = np.flatnonzero(self.status() == STATUS_FAILED)
        reasons: dict[int, str] = {}
        for shard in np.unique(self.layout.shard_of(failed)):
            record = self.backend.read_json(commit_path(self.key, int(shard))) or {}
            reasons.update({int(k): v for k, v in record.get("failures", {}).items()})
        return reasons

    def read_document(self, name: str) -> Any:
        doc = self.backend.read_json(doc_path(self.key, name))
        if doc is None:
            raise KeyError(f"entry {self.key} has no document {name!r}")
        return doc

    def read_blob(self, name: str) -> bytes:
        data = self.backend.read_bytes(blob_path(self.key, name))
        if data is None:
            raise KeyError(f"entry {self.key} has no blob {name!r}")
        return data

    # -- streaming -------------------------------------------------------------------------------

    def iter_epoch(self, world: World = World(), seed: int = 0, epoch: int = 0,
                   arrays: Sequence[str] | None = None, prefetch: int = 2, drop_last: bool = False,
                   shuffle_rows: bool = True) -> Iterator[Block]:
        """This reader's share of one epoch, one block per planned span (see partition.py).

        Up to ``prefetch`` spans are read ahead on background threads, so memory stays bounded
        by ``prefetch + 1`` shards. With ``shuffle_rows`` the rows inside each span are permuted
        (seeded by seed, epoch and span), on top of the plan's per-epoch shard order.
        """
        spans = plan_for(world, self.rows, self.layout.shard_rows, seed, epoch, drop_last)
        names = self._names(arrays)
        for name in names:  # open on this thread: metadata reads are not worth racing
            self._decoder(name)
        pool = self._prefetch_pool(prefetch)
        pending: deque = deque()
        position = 0
        try:
            while position < len(spans) or pending:
                while position < len(spans) and len(pending) < max(1, prefetch):
                    pending.append(pool.submit(self.read_span, spans[position], names))
                    position += 1
                block = pending.popleft().result()
                if shuffle_rows:
                    first = int(block.rows[0]) if len(block) else 0
                    order = np.random.default_rng([seed, epoch, first]).permutation(len(block))
                    block = Block(block.rows[order], block.pad[order], {k: v[order] for k, v in block.arrays.items()})
                yield block
        finally:
            for future in pending:  # a consumer that stops early leaves no reads running
                future.cancel()

    def _prefetch_pool(self, size: int) -> ThreadPoolExecutor:
        """One pool per reader, kept across epochs: starting threads per epoch costs real time."""
        size = max(1, size)
        if self._pool is None or self._pool._max_workers < size:
            self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"prefetch-{self.key[:12]}")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
