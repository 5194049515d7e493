"""Writing an entry: create it (race-safe), write whole shards, commit each, finalize last.

Protocol (see layout.py for the paths):

1. ``entry.json`` is *created-if-absent*. A process that loses the race reads the winner's copy
   and proceeds only if it describes the same spec and layout. Zarr metadata is then written by
   everyone: it is a pure function of the layout, so concurrent writes store identical bytes.
2. A shard is written whole by one writer (the unit of work) in four steps. Several *attempts*
   may race on one shard (a retried task while the first still runs) and need not produce the
   same bytes (GPU nondeterminism), so exactly one attempt's bytes may ever reach the shard:

   a. **Stage.** The attempt encodes the shard in memory through zarr (the entry's own array
      metadata, ``write_empty_chunks`` on, so every shard is an object, even an all-zero one)
      and puts each array's shard object under ``_attempts/<shard>/<attempt id>/`` (a fresh
      UUID per call: no other writer ever writes there, so staged objects are immutable).
   b. **Claim.** It then *creates-if-absent* ``_claims/<shard>.json`` naming its attempt, its
      staged objects (sizes, SHA-256) and the commit record to be. The first claim wins, for
      good: claims are never rewritten or deleted (only with the whole entry). A loser deletes
      its staged objects, discards its rows and carries on with the winning claim.
   c. **Publish.** Whoever holds a claim (the winner, a loser, or a later writer resuming the
      entry after the winner died) copies the *claimed* attempt's staged objects to the canonical
      zarr paths ``<array>/c/<shard>[/0]`` (atomic: S3 CopyObject, a hard link + rename locally).
      Nothing else ever writes a canonical shard path, so every write to it stores the same bytes.
   d. **Commit.** Then it creates-if-absent ``_commits/<shard>.json`` (the claim's record, so all
      completers agree byte for byte) and deletes the shard's staged objects.

   Readers and ``verify`` trust only shards with a commit record. The record exists only after
   every canonical object holds the claimed bytes, and later writes store those same bytes, so
   a committed shard never changes. A writer killed before its claim leaves only staged objects
   (removed when the shard commits, by ``finalize``, or with the entry by ``gc``); one killed
   after its claim leaves a claimed, uncommitted shard that the next writer of that shard
   publishes and commits from the staged objects.
3. ``finalize`` creates ``manifest.json`` once every shard has a commit record, after deleting
   any leftover staged objects. It is the last object written; its existence is what
   "complete" means. It reads the commit records on a bounded thread pool: an entry of 10M rows
   has tens of thousands of shards, and on S3 each record costs a round trip.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import numpy as np
import obstore
import zarr
import zarr.storage
from obstore.exceptions import NotFoundError
from zarr.buffer import default_buffer_prototype

from .backends import Backend
from .layout import (STATUS_ARRAY, STATUS_FAILED, STATUS_MISSING, STATUS_OK, EntryLayout, attempt_object_path,
                     attempts_prefix, blob_path, claim_path, commit_path, commits_prefix, doc_path, entry_path,
                     make_compressors, manifest_path, shard_object_path)
from .errors import UserError
from .specs import EntrySpec

#: Commit records read at once by ``finalize``: small objects, so S3 latency, not bandwidth, bounds
#: the rate; 32 requests in flight keep a 30k-shard entry to seconds without flooding the endpoint.
COMMIT_READ_THREADS = 32


class EntryConflict(RuntimeError):
    """An existing entry or shard disagrees with what this writer was about to write."""


class IncompleteEntry(RuntimeError):
    """Finalize was asked for while shards are still missing."""

    def __init__(self, key: str, missing: list[int]):
        self.missing = missing
        super().__init__(f"entry {key}: {len(missing)} shard(s) not committed yet: {_brief(missing)}")


class CorruptCommit(UserError, RuntimeError):
    """A commit record that cannot be parsed or covers other rows than its shard's: the entry
    cannot be finalized from it."""


def _brief(items: list[int], limit: int = 10) -> str:
    head = ", ".join(map(str, items[:limit]))
    return head + (f", … ({len(items)} in all)" if len(items) > limit else "")


def block_checksum(block: np.ndarray) -> str:
    """SHA-256 of a block's little-endian C-order bytes: independent of codec and chunking."""
    block = np.ascontiguousarray(block)
    if block.dtype.byteorder == ">":
        block = block.astype(block.dtype.newbyteorder("<"))
    return hashlib.sha256(block).hexdigest()  # the buffer itself: no copy of a shard-sized block


@dataclass(frozen=True)
class ShardCommit:
    """What a commit record says about one shard."""

    shard: int
    start: int
    stop: int
    checksums: Mapping[str, str]
    stored_bytes: Mapping[str, int]
    ok: int
    failed: int
    failures: Mapping[int, str]

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "rows": [self.start, self.stop], "checksums": dict(self.checksums),
                "stored_bytes": dict(self.stored_bytes), "ok": self.ok, "failed": self.failed,
                "failures": {str(k): v for k, v in sorted(self.failures.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardCommit:
        return cls(shard=data["shard"], start=data["rows"][0], stop=data["rows"][1],
                   checksums=data["checksums"], stored_bytes=data["stored_bytes"], ok=data["ok"],
                   failed=data["failed"], failures={int(k): v for k, v in data["failures"].items()})


def committed_shards(backend: Backend, key: str) -> set[int]:
    """Shards of entry ``key`` that have a commit record."""
    return {int(o["path"].rsplit("/", 1)[-1].split(".")[0]) for o in backend.list(commits_prefix(key))}


def read_commits(backend: Backend, key: str, layout: EntryLayout,
                 shards: Iterable[int]) -> dict[int, ShardCommit | None]:
    """The commit records of ``shards`` (``None`` where a shard has none), read in parallel on at
    most ``COMMIT_READ_THREADS`` threads. Raises :class:`CorruptCommit` for a record that is not
    valid JSON, lacks fields, or covers other rows than ``layout`` gives its shard."""

    def read(shard: int) -> tuple[int, ShardCommit | None]:
        path = commit_path(key, shard)
        try:
            data = backend.read_json(path)
            commit = None if data is None else ShardCommit.from_json(data)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CorruptCommit(f"entry {key} shard {shard}: its commit record {path} is malformed "
                                f"({type(exc).__name__}: {exc}); delete the entry (featurestore gc) and "
                                "rerun the job that writes it") from None
        if commit is not None and (commit.shard, (commit.start, commit.stop)) != (shard, layout.shard_range(shard)):
            raise CorruptCommit(f"entry {key} shard {shard}: its commit record {path} is for shard {commit.shard} "
                                f"rows {commit.start}..{commit.stop}, the layout says rows "
                                f"{layout.shard_range(shard)}; delete the entry (featurestore gc) and rerun "
                                "the job that writes it")
        return shard, commit

    with ThreadPoolExecutor(COMMIT_READ_THREADS, thread_name_prefix="commit-read") as pool:
        return dict(pool.map(read, shards))


def entry_record(spec: EntrySpec, layout: EntryLayout, attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {"spec": spec.to_json(), "layout": layout.to_json(), "attrs": dict(attrs)}


def _same_entry(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["spec"] == b["spec"] and a["layout"] == b["layout"]


class EntryWriter:
    """Writes one entry. Create it with :meth:`FeatureStore.create`; any number may exist at once
    (one per worker process), each shard normally written by only one of them. Attempts that do
    race on a shard are safe: one attempt's rows win, whole, and the shard never changes once
    committed (module docstring, step 2)."""

    def __init__(self, backend: Backend, spec: EntrySpec, layout: EntryLayout,
                 attrs: Mapping[str, Any] | None = None):
        self.backend, self.spec, self.layout = backend, spec, layout
        self.key = spec.key
        record = entry_record(spec, layout, attrs or {})
        record_with_time = {**record, "created_at": time.time()}
        if not backend.create_json(entry_path(self.key), record_with_time):
            existing = backend.read_json(entry_path(self.key))
            if existing is None or not _same_entry(existing, record):
                raise EntryConflict(f"entry {self.key} exists with a different spec or layout; "
                                    "delete it (featurestore gc) or change the spec")
        self._arrays = self._create_arrays(record)

    def _create_arrays(self, record: Mapping[str, Any]) -> dict[str, zarr.Array]:
        try:
            group = zarr.open_group(self.backend.zarr_store, path=self.key, mode="a",
                                    attributes={"featurestore": record})
        except zarr.errors.ContainsGroupError:
            # open-or-create is check-then-put: a racing writer created the group in between. Its
            # metadata is the same pure function of the record, so open what it wrote.
            group = zarr.open_group(self.backend.zarr_store, path=self.key, mode="r+")
        # ``config`` is a runtime setting of one Array object, not stored in zarr.json: zarr drops it
        # on every reopen (``group[name]``, ``open_array(config=...)``) and falls back to the global
        # ``write_empty_chunks=False``, which omits all-fill inner chunks and whole all-fill shards.
        # So it is set on each opened array, and shards are encoded from these arrays' metadata.
        arrays = {}
        for spec in self.layout.all_arrays:
            chunk = (self.layout.chunk_rows, spec.width) if spec.width else (self.layout.chunk_rows,)
            shard = (self.layout.shard_rows, spec.width) if spec.width else (self.layout.shard_rows,)
            if spec.name in group:
                array = group[spec.name]
            else:
                try:
                    array = group.create_array(
                        spec.name, shape=spec.shape(self.layout.rows), dtype=spec.dtype, chunks=chunk,
                        shards=shard, compressors=make_compressors(self.layout.codec), fill_value=0,
                        overwrite=False)
                except zarr.errors.ContainsArrayError:  # a racing writer created it a moment ago
                    array = group[spec.name]
            # every committed shard must exist as an object, even an all-zero one
            arrays[spec.name] = array.with_config({"write_empty_chunks": True})
        return arrays

    # -- state -----------------------------------------------------------------------------------

    def missing_shards(self) -> list[int]:
        """Shards without a commit record, in order: exactly the work left to do."""
        done = committed_shards(self.backend, self.key)
        return [s for s in range(self.layout.num_shards) if s not in done]

    def is_committed(self, shard: int) -> bool:
        return self.backend.exists(commit_path(self.key, shard))

    def is_complete(self) -> bool:
        return self.backend.exists(manifest_path(self.key))

    # -- writing ---------------------------------------------------------------------------------

    def write_document(self, name: str, obj: Any) -> None:
        """A JSON document beside the arrays (dataset manifest, metrics, ...)."""
        self._check_open()
        self.backend.write_json(doc_path(self.key, name), obj)

    def write_blob(self, name: str, data: bytes) -> None:
        """An opaque file beside the arrays, e.g. safetensors weights. Never pickle."""
        self._check_open()
        import obstore

        obstore.put(self.backend.objects, blob_path(self.key, name), data)

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray], status: np.ndarray | None = None,
                    failures: Mapping[int, str] | None = None) -> ShardCommit:
        """Write every array's rows of ``shard`` and commit it.

        ``status`` defaults to ok for every row, or failed for the rows in ``failures`` (global
        row index → reason). Rows of failed images should hold zeros. Returns the commit; if the
        shard was already committed, returns the existing commit without writing. If another
        attempt claimed the shard first (module docstring, step 2), these rows are discarded and
        the returned commit is that attempt's.
        """
        existing = self.backend.read_json(commit_path(self.key, shard))
        if existing is not None:
            return ShardCommit.from_json(existing)
        start, stop = self.layout.shard_range(shard)
        failures = dict(failures or {})
        if bad := [r for r in failures if not start <= r < stop]:
            raise ValueError(f"shard {shard} (rows {start}..{stop - 1}): failure rows {bad[:5]} outside it")
        if status is None:
            status = np.full(stop - start, STATUS_OK, np.uint8)
            status[[r - start for r in failures]] = STATUS_FAILED
        blocks = {**self._validated(arrays, stop - start), STATUS_ARRAY: np.asarray(status, np.uint8)}
        if np.any(blocks[STATUS_ARRAY] == STATUS_MISSING):
            raise ValueError(f"shard {shard}: status 0 (never written) is not a valid row status")
        failed_rows = {start + int(i) for i in np.flatnonzero(blocks[STATUS_ARRAY] == STATUS_FAILED)}
        if failed_rows != set(failures):
            raise ValueError(f"shard {shard}: rows marked failed must each have a reason in failures")
        claim = self.backend.read_json(claim_path(self.key, shard))
        if claim is None:
            claim = self._stage_and_claim(shard, start, stop, blocks, failures)
        return self._publish(shard, claim)

    def _stage_and_claim(self, shard: int, start: int, stop: int, blocks: Mapping[str, np.ndarray],
                         failures: Mapping[int, str]) -> dict[str, Any]:
        """Steps 2a-b: stage this attempt's objects, then try to claim the shard for them.
        Returns the claim that won (this attempt's or an earlier one's)."""
        attempt = uuid.uuid4().hex
        objects = {}
        for spec, data in zip(self.layout.all_arrays, self._encode(shard, start, stop, blocks)):
            path = attempt_object_path(self.key, shard, attempt, spec)
            obstore.put(self.backend.objects, path, data)
            objects[spec.name] = {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        commit = ShardCommit(
            shard=shard, start=start, stop=stop,
            checksums={name: block_checksum(block) for name, block in blocks.items()},
            stored_bytes={name: o["size"] for name, o in objects.items()},
            ok=int(np.sum(blocks[STATUS_ARRAY] == STATUS_OK)), failed=len(failures), failures=failures)
        claim = {"attempt": attempt, "objects": objects,
                 "commit": {**commit.to_json(), "attempt": attempt,
                            "object_sha256": {name: o["sha256"] for name, o in objects.items()}}}
        if self.backend.create_json(claim_path(self.key, shard), claim):
            return claim
        # Another attempt claimed the shard first: its bytes win, ours are never published.
        self._discard(f"{attempts_prefix(self.key, shard)}{attempt}/")
        winner = self.backend.read_json(claim_path(self.key, shard))
        if winner is None:
            raise EntryConflict(f"entry {self.key} shard {shard}: its claim {claim_path(self.key, shard)} "
                                "vanished (entry deleted while being written?); rerun the job")
        return winner

    def _encode(self, shard: int, start: int, stop: int, blocks: Mapping[str, np.ndarray]) -> list[bytes]:
        """Each array's shard object, encoded by zarr from the entry's own array metadata in a
        private in-memory store: exactly the bytes zarr would store at the canonical path."""
        prototype = default_buffer_prototype()
        out = []
        for spec in self.layout.all_arrays:
            path = f"{self.key}/{spec.name}"
            meta = self._arrays[spec.name].metadata.to_buffer_dict(prototype)
            memory: dict = {f"{path}/{name}": buffer for name, buffer in meta.items()}
            array = zarr.open_array(zarr.storage.MemoryStore(memory), path=path, mode="r+")
            array.with_config({"write_empty_chunks": True})[start:stop] = blocks[spec.name]
            data = memory.get(shard_object_path(self.key, spec, shard))
            if data is None:  # cannot happen with write_empty_chunks; never commit a missing object
                raise RuntimeError(f"entry {self.key}: zarr wrote no object for shard {shard} of {spec.name!r}")
            out.append(data.to_bytes())
        return out

    def _publish(self, shard: int, claim: Mapping[str, Any]) -> ShardCommit:
        """Steps 2c-d for a claim: copy its staged objects to the canonical paths, then commit."""
        record = claim["commit"]
        if (existing := self.backend.read_json(commit_path(self.key, shard))) is not None:
            return ShardCommit.from_json(existing)
        for spec in self.layout.all_arrays:
            try:
                obstore.copy(self.backend.objects, claim["objects"][spec.name]["path"],
                             shard_object_path(self.key, spec, shard))
            except (NotFoundError, FileNotFoundError):
                # staged objects are deleted only once the shard is committed
                if (existing := self.backend.read_json(commit_path(self.key, shard))) is not None:
                    return ShardCommit.from_json(existing)
                raise EntryConflict(f"entry {self.key} shard {shard}: claimed by attempt {claim['attempt']} "
                                    f"but its staged object {claim['objects'][spec.name]['path']} is gone; "
                                    "delete the entry (featurestore gc) and rerun the job") from None
        self.backend.create_json(commit_path(self.key, shard), record)  # lost: an identical record
        self._discard(attempts_prefix(self.key, shard))
        return ShardCommit.from_json(record)

    def _discard(self, prefix: str) -> None:
        """Best-effort removal of staged objects: leftovers are harmless and removed later."""
        try:
            self.backend.delete_prefix(prefix)
        except Exception:  # noqa: BLE001 - e.g. a racing attempt staging into the same directory
            pass

    def _validated(self, arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        expected = {a.name: a for a in self.layout.arrays}
        if set(arrays) != set(expected):
            raise ValueError(f"entry {self.key}: got arrays {sorted(arrays)}, layout has {sorted(expected)}")
        out = {}
        for name, block in arrays.items():
            spec = expected[name]
            block = np.asarray(block)
            if block.shape != spec.shape(rows):
                raise ValueError(f"array {name!r}: block shape {block.shape}, expected {spec.shape(rows)}")
            out[name] = np.ascontiguousarray(block.astype(spec.dtype, copy=False))
        return out

    def finalize(self, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Create the final manifest once all shards are committed; idempotent and race-safe."""
        existing = self.backend.read_json(manifest_path(self.key))
        if existing is not None:
            return existing
        if missing := self.missing_shards():
            raise IncompleteEntry(self.key, missing)
        records = read_commits(self.backend, self.key, self.layout, range(self.layout.num_shards))
        if vanished := [s for s, c in records.items() if c is None]:  # listed, then deleted (entry gc'd?)
            raise IncompleteEntry(self.key, vanished)
        commits = [records[s] for s in range(self.layout.num_shards)]
        self._discard(attempts_prefix(self.key))  # every shard is committed: staging is garbage
        manifest = {
            "key": self.key, "kind": self.spec.kind, "rows": self.layout.rows,
            "num_shards": self.layout.num_shards,
            "ok": sum(c.ok for c in commits), "failed": sum(c.failed for c in commits),
            "stored_bytes": sum(sum(c.stored_bytes.values()) for c in commits),
            "checksums": [dict(c.checksums) for c in commits],
            "summary": dict(summary or {}), "completed_at": time.time(),
        }
        if not self.backend.create_json(manifest_path(self.key), manifest):
            return self.backend.read_json(manifest_path(self.key))
        return manifest

    def _check_open(self) -> None:
        if self.is_complete():
            raise EntryConflict(f"entry {self.key} is complete and immutable")
