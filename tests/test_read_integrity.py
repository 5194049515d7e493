"""No fill values for committed data: every read path raises CorruptEntry for a damaged shard.

zarr reads an absent chunk as its fill value, so without these checks a deleted or truncated
shard object of a committed entry would stream back as zeros. Each test damages one object of a
complete entry, on a local directory and on the moto S3 server, and reads it every way there is.
"""

from __future__ import annotations

import copy

import numpy as np
import obstore
import pytest
from entry_data import expected_rows, make_layout, make_rows, make_spec, write_shards
from fault_proxy import fault_proxy  # noqa: F401 - fixture

from featurestore.catalog import verify
from featurestore.layout import STATUS_ARRAY, commit_path, shard_object_path
from featurestore.partition import World
from featurestore.reader import CorruptEntry, EntryReader
from featurestore.store import FeatureStore

ROWS = 100  # 4 shards of 32 rows (the last one 4), inner chunks of 8 rows
DAMAGED = 1  # the shard whose object is damaged: rows 32..63


def write_entry(url: str, codec: dict | None = None):
    store = FeatureStore(url)
    writer = store.create(make_spec("integrity"), make_layout(ROWS, codec=codec))
    data = make_rows(ROWS)
    write_shards(writer, data, writer.missing_shards())
    writer.finalize()
    return store, writer.key, expected_rows(data)


def object_path(store: FeatureStore, key: str, array: str, shard: int) -> str:
    spec = {a.name: a for a in store.open(key, require_complete=False).layout.all_arrays}[array]
    return shard_object_path(key, spec, shard)


def damage(store: FeatureStore, key: str, how: str, array: str = "gsf", shard: int = DAMAGED) -> str:
    """Delete, truncate, or flip one byte inside (same size) one shard object; returns its path."""
    path = object_path(store, key, array, shard)
    if how == "delete":
        obstore.delete(store.backend.objects, path)
    else:
        data = bytearray(store.backend.read_bytes(path))
        if how == "truncate":
            data = data[:len(data) // 2]
        elif how == "flip":
            data[3] ^= 0x40  # inside the first inner chunk's bytes, before the index
        obstore.put(store.backend.objects, path, bytes(data))
    return path


READS = {
    "read_rows": lambda r: r.read_rows([40]),
    "read_rows across shards": lambda r: r.read_rows([99, 1, 40, 40]),
    "read_range partial": lambda r: r.read_range(33, 40),
    "read_range whole shard": lambda r: r.read_range(32, 64),
    "read_range across shards": lambda r: r.read_range(0, ROWS),
    "read_rows dense (whole shard)": lambda r: r.read_rows(np.arange(63, 31, -1)),
    "status": lambda r: r.status(),
    "failures": lambda r: r.failures(),
    "iter_epoch": lambda r: list(r.iter_epoch(World(), seed=1, prefetch=2)),
    "iter_epoch windows of 2 shards": lambda r: list(r.iter_epoch(World(), seed=1, window_blocks=2)),
    "iter_epoch one worker of two": lambda r: [list(r.iter_epoch(World(0, 1, w, 2))) for w in (0, 1)],
    "zarr array": lambda r: r.array("gsf")[32:64],
}


def _match(array: str = "gsf", shard: int = DAMAGED) -> str:
    return rf"array '{array}' shard {shard}: .*featurestore verify"


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_damaged_committed_shard_fails_every_read_path(store_url, how):
    store, key, expected = write_entry(store_url)
    warm = store.open(key)
    assert np.array_equal(warm.read_range(0, ROWS)["gsf"], expected["gsf"])  # caches filled while intact
    path = damage(store, key, how)
    for name, read in READS.items():
        for reader in (store.open(key), store.open(key, require_complete=False)):
            with pytest.raises(CorruptEntry, match=_match()) as exc:
                read(reader)
            assert (exc.value.array, exc.value.shard, exc.value.key) == ("gsf", DAMAGED, key), name
            assert path in str(exc.value) and str(store.backend.url) in str(exc.value)
            assert ("missing" if how == "delete" else "truncated") in str(exc.value), name
    # the other shards and arrays still read, bit-exact
    reader = store.open(key)
    for shard in (0, 2, 3):
        start, stop = reader.layout.shard_range(shard)
        got = reader.read_range(start, stop)
        assert all(np.array_equal(got[n], expected[n][start:stop]) for n in expected)
    assert np.array_equal(reader.read_rows([0, 70, 99])["dist"], expected["dist"][[0, 70, 99]])
    assert np.array_equal(reader.read_range(32, 64, ["dist"])["dist"], expected["dist"][32:64])
    # verify reports the same shard
    assert any(f"shard {DAMAGED}" in p and path in p for p in verify(store, key).problems)


def test_a_reader_that_read_a_shard_before_it_was_deleted_still_refuses_zeros(local_store_url):
    store, key, expected = write_entry(local_store_url)
    reader = store.open(key)
    assert np.array_equal(reader.read_rows([40])["gsf"], expected["gsf"][[40]])  # object checked, cached
    damage(store, key, "delete")
    for read in (lambda: reader.read_rows([41]), lambda: reader.read_range(33, 40),
                 lambda: reader.read_range(32, 64)):
        with pytest.raises(CorruptEntry, match=_match()):
            read()


def test_damaged_status_object_fails_status(store_url):
    store, key, expected = write_entry(store_url)
    damage(store, key, "delete", array=STATUS_ARRAY, shard=2)
    reader = store.open(key)
    with pytest.raises(CorruptEntry, match=_match(STATUS_ARRAY, 2)):
        reader.status()
    with pytest.raises(CorruptEntry, match=_match(STATUS_ARRAY, 2)):
        reader.read_range(64, 96, [STATUS_ARRAY])
    assert np.array_equal(reader.read_range(64, 96)["gsf"], expected["gsf"][64:96])


def test_missing_commit_record_of_a_complete_entry_is_corruption(local_store_url):
    store, key, _ = write_entry(local_store_url)
    obstore.delete(store.backend.objects, commit_path(key, 3))
    with pytest.raises(CorruptEntry, match="shard 3: its commit record .* is missing"):
        store.open(key).read_rows([99])
    with pytest.raises(CorruptEntry, match="shard 3"):
        store.open(key).status()


def test_uncommitted_shards_of_an_incomplete_entry_still_read_as_never_written(store_url):
    store = FeatureStore(store_url)
    writer = store.create(make_spec("partial"), make_layout(ROWS))
    data = make_rows(ROWS)
    write_shards(writer, data, [0, 2])
    reader = store.open(writer.key, require_complete=False)
    status = reader.status()
    assert np.all(status[32:64] == 0) and np.all(status[96:] == 0) and np.all(status[:32] > 0)
    assert np.all(reader.read_rows([40, 97])["gsf"] == 0)
    assert np.all(reader.read_range(33, 40)["gsf"] == 0)
    want = expected_rows(data)
    assert np.array_equal(reader.read_range(64, 96)["gsf"], want["gsf"][64:96])
    damage(store, writer.key, "truncate", shard=2)  # committed shards are still protected
    with pytest.raises(CorruptEntry, match=_match(shard=2)):
        reader.read_rows([70])


@pytest.mark.parametrize("codec", [None, {"name": "zstd", "level": 1}])
@pytest.mark.parametrize("verify_checksums", [False, True])
def test_intact_entry_reads_bit_exact_every_way(store_url, codec, verify_checksums):
    store, key, expected = write_entry(store_url, codec=codec)
    reader = EntryReader(store.backend, key, verify_checksums=verify_checksums)
    got = reader.read_range(0, ROWS)
    rows = [99, 0, 57, 57, 31, 32, 3]
    by_index = reader.read_rows(rows)
    for name in expected:
        assert np.array_equal(got[name], expected[name])
        assert np.array_equal(by_index[name], expected[name][rows])
        for shard in range(reader.layout.num_shards):
            start, stop = reader.layout.shard_range(shard)
            assert np.array_equal(reader.read_range(start, stop)[name], expected[name][start:stop])
    assert np.array_equal(reader.read_range(33, 40)["gsf"], expected["gsf"][33:40])
    blocks = list(reader.iter_epoch(World(), seed=3, window_blocks=2))
    assert sorted(int(r) for b in blocks for r in b.rows) == list(range(ROWS))
    for b in blocks:
        assert np.array_equal(b.arrays["gsf"], expected["gsf"][b.rows])
    assert len(reader.status()) == ROWS and reader.failures() == store.open(key).failures()


def test_checksums_on_read_catch_a_same_size_flip_in_a_raw_shard(store_url, monkeypatch):
    store, key, expected = write_entry(store_url)  # default codec: raw chunks
    size = len(store.backend.read_bytes(object_path(store, key, "gsf", DAMAGED)))
    damage(store, key, "flip")
    assert len(store.backend.read_bytes(object_path(store, key, "gsf", DAMAGED))) == size
    plain = store.open(key)  # sizes agree and raw chunks need no decoding: the flip goes unseen
    assert not np.array_equal(plain.read_range(32, 64)["gsf"], expected["gsf"][32:64])
    checked = EntryReader(store.backend, key, verify_checksums=True)
    for read in (lambda r: r.read_range(32, 64), lambda r: list(r.iter_epoch(World())),
                 lambda r: r.read_range(32, 64, ["gsf"])):
        with pytest.raises(CorruptEntry, match=_match() + r"|array 'gsf' shard 1: its content checksum") as exc:
            read(checked)
        assert "checksum" in str(exc.value)
    assert np.array_equal(checked.read_range(0, 32)["gsf"], expected["gsf"][:32])
    assert np.array_equal(checked.read_range(32, 64, ["dist"])["dist"], expected["dist"][32:64])
    monkeypatch.setenv("AKD_VERIFY_CHECKSUMS", "1")  # the whole job's switch: readers opened the usual way
    with pytest.raises(CorruptEntry, match="its content checksum"):
        store.open(key).read_range(32, 64)
    monkeypatch.delenv("AKD_VERIFY_CHECKSUMS")
    damage(store, key, "flip", array=STATUS_ARRAY, shard=0)
    with pytest.raises(CorruptEntry, match="array 'status' shard 0: its content checksum"):
        EntryReader(store.backend, key, verify_checksums=True).status()


def test_corrupt_entry_survives_reduction_with_its_fields():
    """Ray ships a worker's exception through ``__reduce_ex__``; deepcopy takes the same path."""
    exc = CorruptEntry("s3://b/p", "gsf-abc", "gsf", 7, "object gsf-abc/gsf/c/7/0 is missing from the store")
    back = copy.deepcopy(exc)
    assert isinstance(back, RuntimeError) and str(back) == str(exc)
    assert (back.store, back.key, back.array, back.shard) == ("s3://b/p", "gsf-abc", "gsf", 7)
    assert "featurestore verify s3://b/p gsf-abc" in str(exc)


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_ray_data_source_fails_on_a_damaged_shard(ray_local, s3_store_url, how):
    from featurestore.raydata import read_entry

    store, key, expected = write_entry(s3_store_url)
    damage(store, key, how)
    with pytest.raises(Exception) as exc:
        read_entry(s3_store_url, key, arrays=["gsf"]).materialize()
    assert isinstance(exc.value, CorruptEntry), repr(exc.value)  # Ray re-raises it as an instance of the cause
    assert "array 'gsf' shard 1" in str(exc.value) and "featurestore verify" in str(exc.value)
    ds = read_entry(s3_store_url, key, arrays=["dist"]).materialize()  # undamaged array: intact
    rows = np.concatenate([b["row"] for b in ds.iter_batches(batch_size=None)])
    dist = np.concatenate([b["dist"] for b in ds.iter_batches(batch_size=None)])
    assert np.array_equal(dist, expected["dist"][rows]) and sorted(rows.tolist()) == list(range(ROWS))


@pytest.mark.s3
def test_s3_reads_through_503_and_500_faults_are_bit_identical(fault_proxy, s3_store_url):  # noqa: F811
    _, key, expected = write_entry(s3_store_url)  # written straight to moto
    fault_proxy.set(slowdown=0.1, internal_error=0.1, seed=11)
    with fault_proxy.env():
        store = FeatureStore(s3_store_url, create=False)
        reader = store.open(key)
        got = reader.read_range(0, ROWS)
        by_index = reader.read_rows([99, 0, 57, 57, 31, 32, 3])
        blocks = list(EntryReader(store.backend, key, verify_checksums=True).iter_epoch(World(), prefetch=3))
        status = store.open(key).status()
    for name in expected:
        assert np.array_equal(got[name], expected[name])
        assert np.array_equal(by_index[name], expected[name][[99, 0, 57, 57, 31, 32, 3]])
    for b in blocks:
        assert np.array_equal(b.arrays["gsf"], expected["gsf"][b.rows])
        assert np.array_equal(b.arrays["dist"], expected["dist"][b.rows])
    assert sorted(int(r) for b in blocks for r in b.rows) == list(range(ROWS))
    assert np.array_equal(status, FeatureStore(s3_store_url).open(key).status())
    stats = fault_proxy.stats()
    assert stats["slowdown"] > 0 and stats["internal_error"] > 0, stats
    assert stats["requests"] > 30, stats
