"""Commit integrity: every committed shard has its objects (even all-fill ones), once a shard's
commit record exists its bytes never change, whatever racing or stale write attempts do, and
finalize checks every commit record it sums (read in parallel, for entries of many shards).

Every ``store_url`` test runs against a local directory and the moto S3 endpoint.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import obstore
import pytest
import zarr
from entry_data import failures_for, make_layout, make_rows, make_spec

from featurestore.catalog import verify
from featurestore.layout import (STATUS_ARRAY, STATUS_FAILED, STATUS_OK, attempts_prefix, claim_path,
                                 commit_path, shard_object_path)
from featurestore.shardcodec import ShardDecoder
from featurestore.store import FeatureStore
from featurestore.writer import (COMMIT_READ_THREADS, CorruptCommit, IncompleteEntry, ShardCommit,
                                 block_checksum)

ROUNDS = 20


def shard_blocks(layout, data: dict[str, np.ndarray], shard: int, failures: dict[int, str]):
    """The arrays, status and failures one attempt writes for ``shard`` (failed rows zeroed)."""
    start, stop = layout.shard_range(shard)
    mine = {r: why for r, why in failures.items() if start <= r < stop}
    block = {k: v[start:stop].copy() for k, v in data.items()}
    for r in mine:
        for v in block.values():
            v[r - start] = 0
    status = np.full(stop - start, STATUS_OK, np.uint8)
    status[[r - start for r in mine]] = STATUS_FAILED
    return block, status, mine


def write(writer, data, shard, failures) -> ShardCommit:
    block, _, mine = shard_blocks(writer.layout, data, shard, failures)
    return writer.write_shard(shard, block, failures=mine)


def object_bytes(store, key, layout, shard) -> dict[str, bytes]:
    return {a.name: store.backend.read_bytes(shard_object_path(key, a, shard)) for a in layout.all_arrays}


def staged_objects(store, key) -> list[str]:
    return [o["path"] for o in store.backend.list(attempts_prefix(key))]


def assert_reads_back(store, key, shard, want: dict[str, np.ndarray]) -> None:
    """The shard reads back as ``want`` through the reader's fast path, zarr via the reader, plain
    zarr on the raw store, and ShardDecoder on the raw object bytes."""
    reader = store.open(key, require_complete=False)
    start, stop = reader.layout.shard_range(shard)
    fast = reader.read_range(start, stop, list(want))
    for spec in reader.layout.all_arrays:
        if spec.name not in want:
            continue
        expected = want[spec.name]
        assert np.array_equal(fast[spec.name], expected), spec.name
        assert np.array_equal(reader.array(spec.name)[start:stop], expected), spec.name
        plain = zarr.open_array(store.backend.zarr_store, path=f"{key}/{spec.name}", mode="r")
        assert np.array_equal(plain[start:stop], expected), spec.name
        decoder = ShardDecoder.from_metadata(store.backend.read_json(f"{key}/{spec.name}/zarr.json"))
        assert decoder is not None
        raw = store.backend.read_bytes(shard_object_path(key, spec, shard))
        assert np.array_equal(decoder.decode(raw, stop - start), expected), spec.name


# -- bug 1: a shard whose rows are all fill values is still committed with its objects ----------

def all_failed_entry(url: str, codec: dict | None = None):
    """80 rows, shards of 32 (the last one 16 rows). Shard 0 is written by the writer that created
    the arrays and has an all-zero inner chunk; shards 1 and 2 fail entirely (all-zero features)
    and are written by a second writer, which reopens the existing arrays."""
    layout = make_layout(80, codec=codec)
    data = make_rows(80)
    data["gsf"][8:16] = 0  # one all-zero inner chunk among ok rows
    creator = FeatureStore(url).create(make_spec("all-failed"), layout)
    write(creator, data, 0, failures_for(0, 32))
    resumed = FeatureStore(url).create(make_spec("all-failed"), layout)
    every_row = {r: f"image {r} failed" for r in range(32, 80)}
    for shard in (1, 2):
        commit = write(resumed, data, shard, every_row)
        assert commit.ok == 0 and commit.failed == commit.stop - commit.start
    resumed.finalize()
    return FeatureStore(url), resumed.key, layout, data, every_row


def test_all_failed_shard_is_committed_with_its_objects(store_url):
    store, key, layout, data, every_row = all_failed_entry(store_url)
    report = verify(store, key)
    assert report.ok, report.problems
    for shard in (1, 2):
        start, stop = layout.shard_range(shard)
        for spec in layout.all_arrays:
            assert store.backend.exists(shard_object_path(key, spec, shard))
        want = {"gsf": np.zeros((stop - start, data["gsf"].shape[1]), np.float16),
                "dist": np.zeros((stop - start, 10), np.float32),
                STATUS_ARRAY: np.full(stop - start, STATUS_FAILED, np.uint8)}
        assert_reads_back(store, key, shard, want)
    reader = store.open(key)
    assert reader.failures() == {**failures_for(0, 32), **every_row}


@pytest.mark.parametrize("codec", [None, {"name": "zstd", "level": 1},
                                   {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}])
def test_all_fill_shards_decode_bit_exact_with_zarr_and_shardcodec(local_store_url, codec):
    store, key, layout, data, every_row = all_failed_entry(local_store_url, codec)
    assert verify(store, key).ok
    for shard in range(layout.num_shards):
        failures = failures_for(0, 32) if shard == 0 else every_row
        block, status, _ = shard_blocks(layout, data, shard, failures)
        assert_reads_back(store, key, shard, {**block, STATUS_ARRAY: status})


def test_shard_bytes_do_not_depend_on_which_writer_opened_the_arrays(tmp_path):
    """Zarr's write_empty_chunks is a runtime setting that a reopened array forgets: the same rows
    must encode to the same object whether the writer created the arrays or reopened them."""
    layout = make_layout(64)
    data = make_rows(64)
    data["gsf"][8:16] = 0
    data["dist"][40:48] = 0
    objects = []
    for name, reopen in (("created", False), ("reopened", True)):
        url = str(tmp_path / name)
        writer = FeatureStore(url).create(make_spec(), layout)
        if reopen:
            writer = FeatureStore(url).create(make_spec(), layout)
        for shard in (0, 1):
            write(writer, data, shard, {})
        objects.append([object_bytes(FeatureStore(url), writer.key, layout, s) for s in (0, 1)])
    assert objects[0] == objects[1]


# -- bug 2: committed means immutable ------------------------------------------------------------

def attempt_data(rows: int, which: str):
    """Two attempts at the same rows that disagree on everything: features, distributions and
    which rows failed (as two GPU runs of a retried task might)."""
    if which == "a":
        return make_rows(rows, seed=1), failures_for(0, rows)
    return make_rows(rows, seed=2), {r: f"attempt b lost image {r}" for r in range(rows) if r % 5 == 1}


def assert_committed_is_one_attempt(store, key, layout, attempts) -> dict[int, str]:
    """Every shard's bytes match its commit record and equal exactly one attempt's rows (all
    arrays, status and failure reasons from the same attempt). Returns the winner per shard."""
    report = verify(store, key)
    assert report.ok, report.problems
    reader = store.open(key)
    winners = {}
    for shard in range(layout.num_shards):
        start, stop = layout.shard_range(shard)
        commit = ShardCommit.from_json(store.backend.read_json(f"{key}/_commits/{shard:06d}.json"))
        got = reader.read_range(start, stop, [a.name for a in layout.arrays])
        got[STATUS_ARRAY] = reader.array(STATUS_ARRAY)[start:stop]
        matches = []
        for name, (data, failures) in attempts.items():
            block, status, mine = shard_blocks(layout, data, shard, failures)
            want = {**block, STATUS_ARRAY: status}
            if all(np.array_equal(got[k], want[k]) for k in want):
                matches.append(name)
                assert dict(commit.checksums) == {k: block_checksum(v) for k, v in want.items()}
                assert dict(commit.failures) == mine
        assert len(matches) == 1, f"shard {shard}: rows match attempts {matches}"
        winners[shard] = matches[0]
        assert_reads_back(store, key, shard, {k: got[k] for k in got})
    return winners


def test_racing_attempts_with_different_bytes_commit_exactly_one(store_url):
    rows = 64
    layout = make_layout(rows)
    attempts = {name: attempt_data(rows, name) for name in ("a", "b")}
    rng = random.Random(0)
    winners_seen = set()
    for round_ in range(ROUNDS):
        spec = make_spec(f"race-{round_}")
        barrier = threading.Barrier(2)
        results: dict[str, dict[int, ShardCommit]] = {}
        errors: list[BaseException] = []
        delays = {name: rng.uniform(0, 0.02) for name in attempts}
        orders = {"a": [0, 1], "b": [1, 0] if round_ % 2 else [0, 1]}

        def attempt(name: str) -> None:
            try:
                writer = FeatureStore(store_url).create(spec, layout)
                barrier.wait(timeout=60)
                threading.Event().wait(delays[name])
                data, failures = attempts[name]
                results[name] = {s: write(writer, data, s, failures) for s in orders[name]}
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=attempt, args=(name,)) for name in attempts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, f"round {round_}: {errors!r}"
        assert results["a"] == results["b"], "both attempts must report the one commit that won"
        store = FeatureStore(store_url)
        writer = store.create(spec, layout)
        assert writer.missing_shards() == []
        writer.finalize()
        winners = assert_committed_is_one_attempt(store, spec.key, layout, attempts)
        winners_seen.update(winners.values())
        assert staged_objects(store, spec.key) == []  # losers' and winners' staging is gone
    assert winners_seen  # (which attempt wins is up to the race)


def stale(writer) -> None:
    """Make ``writer`` behave like an attempt that checked the shard's records before another
    attempt committed it and only now gets to write: until it tries to create a record itself,
    commit and claim records look absent to it."""
    backend = writer.backend
    real_read, real_create = backend.read_json, backend.create_json
    state = {"stale": True}

    def read_json(path):
        if state["stale"] and ("/_commits/" in path or "/_claims/" in path):
            return None
        return real_read(path)

    def create_json(path, obj):
        state["stale"] = False
        return real_create(path, obj)

    backend.read_json, backend.create_json = read_json, create_json


def test_stale_attempt_never_changes_a_committed_shard(store_url):
    """The hard case: a second attempt that passed its checks before the first one committed
    writes its (different) rows afterwards. The committed bytes must not change."""
    rows = 64
    layout = make_layout(rows)
    attempts = {name: attempt_data(rows, name) for name in ("a", "b")}
    store = FeatureStore(store_url)
    first = store.create(make_spec(), layout)
    committed = {s: write(first, attempts["a"][0], s, attempts["a"][1]) for s in (0, 1)}
    before = {s: object_bytes(store, first.key, layout, s) for s in (0, 1)}
    for shard in (0, 1):
        late = FeatureStore(store_url).create(make_spec(), layout)
        stale(late)
        assert write(late, attempts["b"][0], shard, attempts["b"][1]) == committed[shard]
        assert object_bytes(store, first.key, layout, shard) == before[shard]
    first.finalize()
    assert set(assert_committed_is_one_attempt(store, first.key, layout, attempts).values()) == {"a"}


class Crash(Exception):
    """Stands in for a process killed at a chosen point of the protocol."""


def test_attempt_killed_after_its_claim_is_published_by_the_next_writer(store_url, monkeypatch):
    rows = 64
    layout = make_layout(rows)
    attempts = {name: attempt_data(rows, name) for name in ("a", "b")}
    store = FeatureStore(store_url)
    dead = store.create(make_spec(), layout)

    def crash(shard, claim):
        raise Crash

    monkeypatch.setattr(dead, "_publish", crash)
    with pytest.raises(Crash):
        write(dead, attempts["a"][0], 1, attempts["a"][1])
    assert store.backend.exists(claim_path(dead.key, 1))
    assert dead.missing_shards() == [0, 1]  # claimed is not committed
    assert staged_objects(store, dead.key)  # the dead attempt's staged objects

    resumed = FeatureStore(store_url).create(make_spec(), layout)
    assert resumed.missing_shards() == [0, 1]
    for shard in resumed.missing_shards():
        write(resumed, attempts["b"][0], shard, attempts["b"][1])
    resumed.finalize()
    winners = assert_committed_is_one_attempt(store, dead.key, layout, attempts)
    assert winners == {0: "b", 1: "a"}  # shard 1 keeps the bytes its claim named
    assert staged_objects(store, dead.key) == []


def test_attempt_killed_before_its_claim_leaves_only_staging_that_commit_removes(store_url, monkeypatch):
    rows = 64
    layout = make_layout(rows)
    attempts = {name: attempt_data(rows, name) for name in ("a", "b")}
    store = FeatureStore(store_url)
    dead = store.create(make_spec(), layout)
    real_create = dead.backend.create_json

    def create_json(path, obj):
        if "/_claims/" in path:
            raise Crash
        return real_create(path, obj)

    monkeypatch.setattr(dead.backend, "create_json", create_json)
    with pytest.raises(Crash):
        write(dead, attempts["a"][0], 0, attempts["a"][1])
    assert len(staged_objects(store, dead.key)) == len(layout.all_arrays)
    assert not store.backend.exists(claim_path(dead.key, 0))
    for spec in layout.all_arrays:  # nothing reached the canonical zarr paths
        assert not store.backend.exists(shard_object_path(dead.key, spec, 0))

    resumed = FeatureStore(store_url).create(make_spec(), layout)
    write(resumed, attempts["b"][0], 0, attempts["b"][1])
    assert staged_objects(store, dead.key) == []  # committing a shard removes all its staging
    write(resumed, attempts["b"][0], 1, attempts["b"][1])
    resumed.finalize()
    assert set(assert_committed_is_one_attempt(store, dead.key, layout, attempts).values()) == {"b"}


# -- finalize at scale: commit records read in parallel, still checked ---------------------------

def test_finalize_of_many_shards_reads_commit_records_in_parallel_and_bounded(s3_store_url, monkeypatch):
    """An entry of 80 one-chunk shards on S3: finalize's manifest sums every commit record in
    shard order, and the records are read concurrently, never more than COMMIT_READ_THREADS."""
    shards = 80
    layout = make_layout(shards * 8, shard_rows=8, chunk_rows=8)
    data = make_rows(layout.rows)
    failures = failures_for(0, layout.rows)
    writer = FeatureStore(s3_store_url).create(make_spec("many-shards"), layout)
    with ThreadPoolExecutor(8) as pool:  # disjoint shards: one writer each
        commits = list(pool.map(lambda s: write(writer, data, s, failures), range(shards)))
    backend = writer.backend
    real_read = backend.read_json
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "commit_reads": 0}

    def read_json(path):
        if "/_commits/" not in path:
            return real_read(path)
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["commit_reads"] += 1
        try:
            time.sleep(0.005)  # an S3 round trip's worth, so overlapping reads overlap visibly
            return real_read(path)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(backend, "read_json", read_json)
    manifest = writer.finalize()
    assert state["commit_reads"] == shards
    assert 1 < state["peak"] <= COMMIT_READ_THREADS
    assert manifest["num_shards"] == shards
    assert (manifest["ok"], manifest["failed"]) == (layout.rows - len(failures), len(failures))
    assert manifest["checksums"] == [dict(c.checksums) for c in commits]
    assert manifest["stored_bytes"] == sum(sum(c.stored_bytes.values()) for c in commits)
    assert verify(FeatureStore(s3_store_url), writer.key).ok


def committed_entry(url: str, tag: str):
    layout = make_layout(96)
    writer = FeatureStore(url).create(make_spec(tag), layout)
    data = make_rows(96)
    for shard in range(layout.num_shards):
        write(writer, data, shard, failures_for(0, 96))
    return writer


@pytest.mark.parametrize("record", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"shard": 1}'])
def test_finalize_refuses_a_malformed_commit_record(store_url, record):
    writer = committed_entry(store_url, "malformed-commit")
    writer.backend.write_bytes(commit_path(writer.key, 1), record)
    with pytest.raises(CorruptCommit, match=f"shard 1: its commit record {commit_path(writer.key, 1)} is malformed"):
        writer.finalize()
    assert not writer.is_complete()


def test_finalize_refuses_a_commit_record_of_other_rows(store_url):
    writer = committed_entry(store_url, "moved-commit")
    writer.backend.write_bytes(commit_path(writer.key, 2), writer.backend.read_bytes(commit_path(writer.key, 0)))
    with pytest.raises(CorruptCommit, match="shard 2: .* is for shard 0 rows 0..32, the layout says rows"):
        writer.finalize()
    assert not writer.is_complete()


def test_finalize_refuses_a_commit_record_deleted_after_the_listing(store_url, monkeypatch):
    writer = committed_entry(store_url, "vanished-commit")
    assert writer.missing_shards() == []
    monkeypatch.setattr(writer, "missing_shards", lambda: [])  # the listing ran before the delete
    obstore.delete(writer.backend.objects, commit_path(writer.key, 2))
    with pytest.raises(IncompleteEntry) as exc:
        writer.finalize()
    assert exc.value.missing == [2]
    assert not writer.is_complete()
