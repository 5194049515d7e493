"""Reading an entry: rows by index, contiguous ranges, and a partitioned, prefetching epoch stream.

There is one read path. :meth:`EntryReader.read_rows` serves any subset of rows: per shard one
GET of the whole shard when the rows are dense in it, runs of inner chunks when they are sparse,
shards in parallel. Epochs are planned by :func:`featurestore.partition.plan_shuffled` (every row
exactly once, shards grouped into shuffle windows) and read window by window with
:func:`read_ahead`, which keeps a bounded number of windows loading ahead of the consumer. The
student loader, the distiller, :meth:`EntryReader.iter_epoch` and the Ray Data source
(``raydata.py``, whole shards) all read through it.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import obstore
import zarr
from obstore.exceptions import NotFoundError
from zarr.storage import WrapperStore

from .backends import Backend
from .errors import UserError
from .layout import (STATUS_ARRAY, STATUS_FAILED, ArraySpec, EntryLayout, blob_path, commit_path,
                     commits_prefix, doc_path, entry_path, manifest_path, shard_object_path)
from .partition import World, plan_shuffled
from .shardcodec import CorruptShard, ShardDecoder
from .specs import EntrySpec
from .writer import block_checksum


_UNCOMMITTED_TTL_S = 1.0  # how long "shard not committed" is trusted (writers may commit it any time)
#: ``read_rows`` fetches a whole shard (one GET) when it needs at least 1/WHOLE_SHARD_SHARE of its rows.
WHOLE_SHARD_SHARE = 4
#: Inner chunks per range read when rows are sparse in a shard: bounded temporaries.
RUN_CHUNKS = 16
READ_THREADS = 8

Item, Loaded = TypeVar("Item"), TypeVar("Loaded")
_END = object()


def read_ahead(items: Iterable[Item], load: Callable[[Item], Loaded], ahead: int,
               pool: ThreadPoolExecutor) -> Iterator[Loaded]:
    """``load(item)`` for each item, in order, with up to ``ahead`` loads running on ``pool``
    while the consumer works on the last one: memory is bounded by ``ahead + 1`` loads. A
    consumer that stops early leaves no load running."""
    pending: deque[Future] = deque()
    upcoming = iter(items)

    def top_up() -> None:
        while len(pending) < max(1, ahead) and (item := next(upcoming, _END)) is not _END:
            pending.append(pool.submit(load, item))
    try:
        top_up()
        while pending:
            loaded = pending.popleft().result()
            top_up()
            yield loaded
    finally:
        for future in pending:
            future.cancel()


class EntryNotFound(UserError, LookupError):
    """No entry with that key in the store (or it is not complete and completeness was required)."""


class CorruptEntry(UserError, RuntimeError):
    """A *committed* shard of an entry cannot be read as committed: its object is missing,
    truncated, of the wrong size, undecodable or (with ``verify_checksums``) differs from its
    commit record. Reads never substitute fill values for committed data; they raise this.

    ``store``, ``key``, ``array``, ``shard`` and ``problem`` say what and where; the message tells
    what to do. ``array`` is ``None`` when the problem is the shard's commit record itself.
    """

    def __init__(self, store: str, key: str, array: str | None, shard: int, problem: str):
        self.store, self.key, self.array, self.shard, self.problem = store, key, array, shard, problem
        where = f"array {array!r} shard {shard}" if array is not None else f"shard {shard}"
        super().__init__(f"store {store}: entry {key}: {where}: {problem}. The entry is damaged; run "
                         f"`featurestore verify {store} {key}` and rewrite the entry (delete it and "
                         "rerun the job that writes it)")

    def __reduce__(self):  # picklable across processes (Ray tasks) with its fields intact
        return type(self), (self.store, self.key, self.array, self.shard, self.problem)


class _CheckedStore(WrapperStore):
    """The zarr store under an entry's arrays: a committed shard whose object is absent raises
    :class:`CorruptEntry` instead of reading back as fill values (zarr's rule for absent chunks)."""

    def __init__(self, store, reader: EntryReader):
        super().__init__(store)
        self._reader = reader
        names = "|".join(re.escape(a.name) for a in reader.layout.all_arrays)
        self._pattern = re.compile(rf"{re.escape(reader.key)}/({names})/c/(\d+)(?:/0)?")

    def _with_store(self, store):
        return type(self)(store, self._reader)

    async def _check_size(self, key: str) -> tuple[str, int] | None:
        """For a shard object key: its (array, shard), size-checked once per reader. The read
        methods check before calling zarr, so this costs a set lookup unless zarr is used directly."""
        match = self._pattern.fullmatch(key)
        if match is None:
            return None
        name, shard = match.group(1), int(match.group(2))
        reader = self._reader
        if (name, shard) not in reader._checked and reader._expected_size(name, shard) is not None:
            try:
                size = await self._store.getsize(key)
            except (NotFoundError, FileNotFoundError):
                size = None
            reader._check_size(name, shard, size)
            reader._checked.add((name, shard))
        return name, shard

    def _check_absent(self, shard_of_key: tuple[str, int] | None) -> None:
        if shard_of_key is not None:  # absent since it was checked: deleted while being read
            self._reader._raise_if_committed(*shard_of_key, "is missing from the store")

    async def get(self, key, prototype, byte_range=None):
        shard_of_key = await self._check_size(key)
        value = await self._store.get(key, prototype, byte_range)
        if value is None:
            self._check_absent(shard_of_key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        shards_of_keys = [await self._check_size(key) for key, _ in key_ranges]
        values = await self._store.get_partial_values(prototype, key_ranges)
        for shard_of_key, value in zip(shards_of_keys, values):
            if value is None:
                self._check_absent(shard_of_key)
        return values


@dataclass
class Block:
    """Rows read together: global row indices, padding flags, and one array per requested name."""

    rows: np.ndarray
    pad: np.ndarray
    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)


#: Set to 1 to check content checksums on every whole-shard read (see EntryReader).
VERIFY_ENV = "AKD_VERIFY_CHECKSUMS"


class EntryReader:
    """Read access to one entry. Open it with :meth:`FeatureStore.open`.

    Every read checks the shard objects it touches against the shards' commit records (cached
    per reader): a committed shard whose object is missing, truncated or of another size raises
    :class:`CorruptEntry`, never fill values. Whole-shard streaming reads get that check from the
    bytes they fetch; other reads HEAD each touched object once per reader. With
    ``verify_checksums`` whole-shard reads (and :meth:`status`) also compare the content
    checksum with the commit record, at the cost of hashing every byte: off by default, since
    it keeps only 13–25% of local read throughput (benchmarks/read_checksums.py); ``None``
    takes it from ``AKD_VERIFY_CHECKSUMS=1`` so a whole job (and its workers) can turn it on.
    """

    def __init__(self, backend: Backend, key: str, require_complete: bool = True,
                 verify_checksums: bool | None = None):
        self.backend, self.key = backend, key
        self.verify_checksums = os.environ.get(VERIFY_ENV) == "1" if verify_checksums is None else verify_checksums
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
        self._pool: ThreadPoolExecutor | None = None  # epoch read-ahead
        self._read_pool: ThreadPoolExecutor | None = None  # the shards of one read_rows call
        self._lock = threading.Lock()
        self._specs: dict[str, ArraySpec] = {a.name: a for a in self.layout.all_arrays}
        self._commits: dict[int, dict[str, Any]] = {}  # shard → commit record (immutable once created)
        self._checked: set[tuple[str, int]] = set()  # (array, shard) whose object size matched
        self._uncommitted: dict[int, float] = {}  # shard → when it was last seen without a record

    # -- integrity of committed shards -----------------------------------------------------------

    def _corrupt(self, array: str | None, shard: int, problem: str) -> CorruptEntry:
        return CorruptEntry(str(self.backend.url), self.key, array, shard, problem)

    def _commit(self, shard: int) -> dict[str, Any] | None:
        """The shard's commit record, or ``None`` if it is not committed (an incomplete entry).
        In a complete entry every shard is committed, so a missing record is corruption."""
        record = self._commits.get(shard)
        if record is None:
            seen = self._uncommitted.get(shard)
            if seen is not None and time.monotonic() - seen < _UNCOMMITTED_TTL_S:
                return None  # a scan of an incomplete entry asks once, not once per inner chunk
            record = self.backend.read_json(commit_path(self.key, shard))
            if record is None:
                if self.manifest is not None:
                    raise self._corrupt(None, shard, f"its commit record {commit_path(self.key, shard)} is "
                                                     "missing although the entry is complete")
                self._uncommitted[shard] = time.monotonic()
                return None
            if not isinstance(record.get("stored_bytes"), dict) or not isinstance(record.get("checksums"), dict):
                raise self._corrupt(None, shard, f"its commit record {commit_path(self.key, shard)} is malformed")
            self._commits[shard] = record
        return record

    def _expected_size(self, name: str, shard: int) -> int | None:
        """``stored_bytes`` of a committed shard's object, ``None`` for an uncommitted shard."""
        record = self._commit(shard)
        if record is None:
            return None
        if name not in record["stored_bytes"]:
            raise self._corrupt(name, shard, "its commit record has no stored size for this array")
        return int(record["stored_bytes"][name])

    def _raise_if_committed(self, name: str, shard: int, problem: str) -> None:
        if self._expected_size(name, shard) is not None:
            path = shard_object_path(self.key, self._specs[name], shard)
            raise self._corrupt(name, shard, f"object {path} {problem}")

    def _check_size(self, name: str, shard: int, size: int | None) -> int | None:
        """Raise unless a committed shard's object has its committed size (``None``: absent)."""
        expected = self._expected_size(name, shard)
        if expected is None:
            return None
        path = shard_object_path(self.key, self._specs[name], shard)
        if size is None:
            raise self._corrupt(name, shard, f"object {path} is missing from the store")
        if size != expected:
            raise self._corrupt(name, shard, f"object {path} has {size} bytes, its commit record says "
                                             f"{expected} (truncated or overwritten)")
        return expected

    def _check_objects(self, name: str, shards: Iterable[int]) -> None:
        """HEAD each committed shard's object once per reader and compare it with its record."""
        for shard in shards:
            shard = int(shard)
            if (name, shard) in self._checked:
                continue
            if self._expected_size(name, shard) is None:
                continue  # not committed: zarr's fill value is the truth ("never written")
            path = shard_object_path(self.key, self._specs[name], shard)
            try:
                size = int(obstore.head(self.backend.objects, path)["size"])
            except (NotFoundError, FileNotFoundError):
                size = None
            self._check_size(name, shard, size)
            self._checked.add((name, shard))

    def _zarr_read(self, name: str, shards: Iterable[int], read, checked: bool = False) -> np.ndarray:
        """``read(zarr array)`` after checking the objects of ``shards``. If zarr fails (e.g. an
        index CRC error: the object changed since this reader checked it), the objects are
        checked afresh so that damage surfaces as :class:`CorruptEntry`."""
        shards = [int(s) for s in shards]
        if not checked:
            self._check_objects(name, shards)
        try:
            return read(self.array(name))
        except CorruptEntry:
            raise
        except Exception:
            self._checked.difference_update((name, s) for s in shards)
            self._check_objects(name, shards)
            raise

    def _check_all_objects(self) -> list[int]:
        """Every array's object of every committed shard exists with its committed size (one
        listing per array, commit records fetched in parallel). Returns the committed shards."""
        if self.manifest is not None:
            shards = list(range(self.layout.num_shards))
        else:
            shards = sorted(int(o["path"].rsplit("/", 1)[-1].split(".")[0])
                            for o in self.backend.list(commits_prefix(self.key)))
            shards = [s for s in shards if s < self.layout.num_shards]
        todo = [s for s in shards if s not in self._commits]
        if len(todo) > 1:
            with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                list(pool.map(self._commit, todo))
        for spec in self.layout.all_arrays:
            if all((spec.name, s) in self._checked for s in shards):
                continue
            sizes = {o["path"]: int(o["size"]) for o in self.backend.list(f"{self.key}/{spec.name}/c/")}
            for shard in shards:
                self._check_size(spec.name, shard, sizes.get(shard_object_path(self.key, spec, shard)))
                self._checked.add((spec.name, shard))
        return shards

    def _check_checksum(self, name: str, shard: int, block: np.ndarray) -> None:
        record = self._commit(shard)
        if record is None:
            return
        expected = record["checksums"].get(name)
        if expected is None or block_checksum(block) != expected:
            raise self._corrupt(name, shard, "its content checksum differs from the commit record "
                                             "(the object was overwritten or bits flipped)")

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
            self._arrays[name] = zarr.open_array(_CheckedStore(self.backend.zarr_store, self),
                                                 path=f"{self.key}/{name}", mode="r")
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
        whole_shard = start < self.rows and (start, stop) == self.layout.shard_range(shard) and \
            (self.manifest is not None or self._commit(shard) is not None)  # unwritten: fill values, as zarr
        decoder = self._decoder(name) if whole_shard else None
        if decoder is None:
            shards = range(shard, (stop - 1) // self.layout.shard_rows + 1) if start < stop else range(0)
            block = self._zarr_read(name, shards, lambda arr: arr[start:stop])
        else:
            block = self._read_whole_shard(name, shard, decoder, stop - start)
        if whole_shard and self.verify_checksums:
            self._check_checksum(name, shard, block)
        return block

    def _read_whole_shard(self, name: str, shard: int, decoder: ShardDecoder, rows: int) -> np.ndarray:
        """The fast path for a committed shard: one GET, its length checked against the commit
        record (a missing or resized object is :class:`CorruptEntry`), one decode."""
        path = shard_object_path(self.key, self._specs[name], shard)
        data = self.backend.read_buffer(path)
        self._check_size(name, shard, None if data is None else len(data))
        if data is None:  # a record without this array's size
            raise self._corrupt(name, shard, f"object {path} is missing from the store")
        try:
            return decoder.decode(data, rows)
        except CorruptShard as exc:
            raise self._corrupt(name, shard, f"object {path} does not decode: {exc}") from None

    def _decoder(self, name: str) -> ShardDecoder | None:
        if name not in self._decoders:
            meta = self.backend.read_json(f"{self.key}/{name}/zarr.json")
            self._decoders[name] = ShardDecoder.from_metadata(meta) if meta else None
        return self._decoders[name]

    def read_rows(self, rows: Sequence[int] | np.ndarray, arrays: Sequence[str] | None = None,
                  columns: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Rows by index, in the order given (duplicates allowed); of 2-D arrays only ``columns``
        when given.

        Per shard: one GET of the whole shard when the rows cover at least 1/WHOLE_SHARD_SHARE of
        it, else runs of whole inner chunks as range reads (never zarr's fancy indexing, whose
        index arrays are the size of the selection: gigabytes at GSF width). Shards are read in
        parallel; memory beyond the result is a few shards.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row indices outside entry of {self.rows} rows")
        names = self._names(arrays)
        unique, inverse = np.unique(rows, return_inverse=True)
        distinct = len(unique) == len(rows)
        # where each unique row lands: directly in the result when rows do not repeat
        target = np.argsort(rows, kind="stable") if distinct else np.arange(len(unique))
        def gather(block: np.ndarray, at: np.ndarray) -> np.ndarray:
            return block[np.ix_(at, columns)] if columns is not None and block.ndim == 2 else block[at]

        def read(piece: tuple[np.ndarray, int, int]) -> None:
            picked, start, stop = piece
            block = self.read_range(start, stop, names)
            for name in names:
                out[name][target[picked]] = gather(block[name], unique[picked] - start)

        pieces = self._pieces(unique)
        if len(pieces) == 1:  # one gather straight into the result, in the order asked
            _, start, stop = pieces[0]
            block = self.read_range(start, stop, names)
            return {name: gather(block[name], rows - start) for name in names}
        out = {}
        for name in names:
            spec = self._specs[name]
            width = len(columns) if columns is not None and spec.width else spec.width
            out[name] = np.empty((len(unique),) + ((width,) if spec.width else ()), spec.dtype)
            self._decoder(name)  # open on this thread: metadata reads are not worth racing
        if pieces:
            with self._lock:
                if self._read_pool is None:
                    self._read_pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix=f"read-{self.key[:12]}")
            list(self._read_pool.map(read, pieces))
        return out if distinct else {name: values[inverse] for name, values in out.items()}

    def _pieces(self, unique: np.ndarray) -> list[tuple[np.ndarray, int, int]]:
        """``(positions into unique, start, stop)`` ranges to read for sorted distinct rows: whole
        shards where the rows are dense, runs of at most RUN_CHUNKS inner chunks elsewhere."""
        layout, pieces = self.layout, []
        shard_of = layout.shard_of(unique)
        for shard in np.unique(shard_of):
            picked = np.flatnonzero(shard_of == shard)
            start, stop = layout.shard_range(int(shard))
            if len(picked) * WHOLE_SHARD_SHARE >= stop - start:
                pieces.append((picked, start, stop))
                continue
            chunks = np.unique(unique[picked] // layout.chunk_rows)
            breaks = np.flatnonzero((np.diff(chunks) != 1) | (np.arange(1, len(chunks)) % RUN_CHUNKS == 0)) + 1
            for run in np.split(chunks, breaks):
                a, b = int(run[0]) * layout.chunk_rows, min((int(run[-1]) + 1) * layout.chunk_rows, stop)
                pieces.append((picked[(unique[picked] >= a) & (unique[picked] < b)], a, b))
        return pieces

    # -- per-row status and documents ---------------------------------------------------------------

    def status(self) -> np.ndarray:
        """Per-row status. First checks that every array's object of every committed shard is
        there with its committed size: a row's status is only as good as its data."""
        shards = self._check_all_objects()
        status = self._zarr_read(STATUS_ARRAY, shards, lambda arr: arr[:], checked=True)
        if self.verify_checksums:
            for shard in shards:
                start, stop = self.layout.shard_range(shard)
                self._check_checksum(STATUS_ARRAY, shard, status[start:stop])
        return status

    def failures(self) -> dict[int, str]:
        """Global row → reason, for every failed row (from the shards' commit records)."""
        failed = np.flatnonzero(self.status() == STATUS_FAILED)
        reasons: dict[int, str] = {}
        for shard in np.unique(self.layout.shard_of(failed)):
            record = self._commit(int(shard)) or {}
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
                   window_blocks: int = 1) -> Iterator[Block]:
        """This reader's share of one epoch (:func:`plan_shuffled` over the entry's shards), one
        block per shuffle window of ``window_blocks`` shards, its rows permuted; dataloader worker
        ``world.worker`` takes every ``world.num_workers``-th window of its rank. Up to
        ``prefetch`` windows are read ahead on background threads, so memory stays bounded by
        ``(prefetch + 1) · window_blocks`` shards."""
        plan = plan_shuffled(self.layout.shard_of(np.arange(self.rows)), world, seed, epoch, window_blocks, drop_last)
        names = self._names(arrays)

        def load(window: slice) -> Block:
            rows = plan.positions[window]
            return Block(rows, plan.pad[window], self.read_rows(rows, names))

        yield from read_ahead(plan.windows()[world.worker::world.num_workers], load, prefetch,
                              self._prefetch_pool(prefetch))

    def _prefetch_pool(self, size: int) -> ThreadPoolExecutor:
        """One pool per reader, kept across epochs: starting threads per epoch costs real time."""
        size = max(1, size)
        if self._pool is None or self._pool._max_workers < size:
            self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"prefetch-{self.key[:12]}")
        return self._pool

    def close(self) -> None:
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._read_pool = None

    def __enter__(self) -> EntryReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
