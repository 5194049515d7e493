"""Store contract: every test runs against a local directory and the moto S3 endpoint (HTTP)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from entry_data import WIDTH, expected_rows, failures_for, make_layout, make_rows, make_spec, write_shards

from featurestore.layout import STATUS_FAILED, STATUS_OK, ArraySpec, EntryLayout
from featurestore.partition import World
from featurestore.reader import EntryNotFound
from featurestore.store import FeatureStore
from featurestore.writer import EntryConflict, IncompleteEntry

HERE = Path(__file__).resolve().parent
ROWS = 100  # 4 shards of 32 rows, the last one partial (4 rows)


def write_entry(url: str, rows: int = ROWS, codec: dict | None = None, spec=None):
    store = FeatureStore(url)
    writer = store.create(spec or make_spec(), make_layout(rows, codec=codec))
    data = make_rows(rows)
    write_shards(writer, data, writer.missing_shards())
    writer.finalize()
    return store, writer.key, expected_rows(data)


def test_write_then_read_back_bit_exact(store_url):
    store, key, expected = write_entry(store_url)
    reader = store.open(key)
    got = reader.read_range(0, ROWS)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        assert np.array_equal(got[name], expected[name])
    status = reader.status()
    failed = failures_for(0, ROWS)
    assert set(np.flatnonzero(status == STATUS_FAILED)) == set(failed)
    assert np.sum(status == STATUS_OK) == ROWS - len(failed)
    assert reader.failures() == failed
    assert reader.manifest["ok"] + reader.manifest["failed"] == ROWS


def test_rows_by_index_in_any_order_with_duplicates(store_url):
    store, key, expected = write_entry(store_url)
    rows = [99, 0, 57, 57, 31, 32, 3]
    got = store.open(key).read_rows(rows, ["gsf"])
    assert list(got) == ["gsf"]
    assert np.array_equal(got["gsf"], expected["gsf"][rows])


def test_read_rows_takes_whole_shards_where_dense_and_chunk_runs_elsewhere(store_url):
    """Dense rows of shard 1 (32..63) and sparse rows of shards 0 and 3, shuffled, with duplicates
    and with a column subset: equal to the rows picked from a plain range read, and the pieces
    planned are one whole shard plus a run per sparse chunk group."""
    store, key, expected = write_entry(store_url)
    reader = store.open(key)
    rng = np.random.default_rng(0)
    dense = rng.choice(np.arange(32, 64), 20, replace=False)
    rows = rng.permutation(np.r_[dense, [1, 2, 97, 98, 99]])
    pieces = reader._pieces(np.unique(rows))
    assert [(a, b) for _, a, b in pieces] == [(0, 8), (32, 64), (96, 100)]
    columns = np.array([5, 0, 3])
    for picked in (rows, np.r_[rows, rows[:7]]):
        got = reader.read_rows(picked, ["gsf", "dist"], columns=columns)
        assert np.array_equal(got["gsf"], expected["gsf"][picked][:, columns])
        assert np.array_equal(got["dist"], expected["dist"][picked][:, columns])
    assert reader.read_rows([], ["gsf"])["gsf"].shape == (0, expected["gsf"].shape[1])


@pytest.mark.parametrize("codec", [None, {"name": "zstd", "level": 1},
                                   {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}])
def test_whole_shard_fast_path_matches_zarr(local_store_url, codec):
    store, key, expected = write_entry(local_store_url, codec=codec)
    reader = store.open(key)
    for shard in range(reader.layout.num_shards):
        start, stop = reader.layout.shard_range(shard)
        fast = reader.read_range(start, stop)  # whole shard → shardcodec
        for name in expected:
            slow = reader.array(name)[start:stop]  # zarr's own path
            assert np.array_equal(fast[name], slow)
            assert np.array_equal(fast[name], expected[name][start:stop])


def test_same_spec_is_found_and_reused(store_url):
    store, key, _ = write_entry(store_url)
    assert store.state(key) == "complete"
    assert store.find(make_spec()).key == key
    assert store.find(make_spec("another dataset")) is None
    writer = store.create(make_spec(), make_layout(ROWS))  # resuming a complete entry: nothing to do
    assert writer.missing_shards() == []
    with pytest.raises(EntryConflict):
        writer.write_document("late", {"a": 1})


def test_resume_writes_only_missing_shards_and_matches_uninterrupted(tmp_path, store_url):
    _, _, _ = write_entry(str(tmp_path / "reference"))
    reference = FeatureStore(str(tmp_path / "reference")).open(make_spec().key)

    store = FeatureStore(store_url)
    writer = store.create(make_spec(), make_layout(ROWS))
    data = make_rows(ROWS)
    write_shards(writer, data, [0, 2])
    with pytest.raises(IncompleteEntry) as exc:
        writer.finalize()
    assert exc.value.missing == [1, 3]
    assert store.state(writer.key) == "incomplete"
    with pytest.raises(EntryNotFound):
        store.open(writer.key)

    resumed = FeatureStore(store_url).create(make_spec(), make_layout(ROWS))
    assert resumed.missing_shards() == [1, 3]
    write_shards(resumed, data, resumed.missing_shards())
    manifest = resumed.finalize()
    assert manifest["checksums"] == reference.manifest["checksums"]
    got = store.open(writer.key).read_range(0, ROWS)
    for name, ref in reference.read_range(0, ROWS).items():
        assert np.array_equal(got[name], ref)


def test_existing_entry_with_other_layout_is_a_conflict(store_url):
    store, _, _ = write_entry(store_url)
    with pytest.raises(EntryConflict, match="different spec or layout"):
        store.create(make_spec(), make_layout(ROWS, shard_rows=64))


def test_write_shard_rejects_bad_blocks(local_store_url):
    writer = FeatureStore(local_store_url).create(make_spec(), make_layout(ROWS))
    data = make_rows(32)
    with pytest.raises(ValueError, match="block shape"):
        writer.write_shard(0, {"gsf": data["gsf"][:10], "dist": data["dist"][:10]})
    with pytest.raises(ValueError, match="got arrays"):
        writer.write_shard(0, {"gsf": data["gsf"]})
    with pytest.raises(ValueError, match="outside"):
        writer.write_shard(0, data, failures={40: "not in this shard"})
    assert writer.missing_shards() == [0, 1, 2, 3]  # nothing was committed


def test_documents_and_blobs_round_trip(store_url):
    store = FeatureStore(store_url)
    writer = store.create(make_spec(), make_layout(ROWS))
    writer.write_document("dataset", {"ids": ["a", "b"], "votes": [[1] * 10]})
    writer.write_blob("weights.safetensors", b"\x00\x01binary")
    write_shards(writer, make_rows(ROWS), writer.missing_shards())
    writer.finalize()
    reader = store.open(writer.key)
    assert reader.read_document("dataset") == {"ids": ["a", "b"], "votes": [[1] * 10]}
    assert reader.read_blob("weights.safetensors") == b"\x00\x01binary"
    with pytest.raises(KeyError):
        reader.read_document("missing")


@pytest.mark.parametrize("window_blocks", [1, 3])
def test_epoch_stream_covers_every_row_once_across_ranks(store_url, window_blocks):
    store, key, expected = write_entry(store_url)
    reader = store.open(key)
    world_size, workers = 3, 2
    seen, per_rank = [], []
    for rank in range(world_size):
        count = 0
        for worker in range(workers):
            for block in reader.iter_epoch(World(rank, world_size, worker, workers), seed=5, epoch=1, prefetch=2,
                                               window_blocks=window_blocks):
                assert np.array_equal(block.arrays["gsf"], expected["gsf"][block.rows])
                seen.extend(block.rows[~block.pad].tolist())
                count += len(block)
        per_rank.append(count)
    assert sorted(seen) == list(range(ROWS))
    assert per_rank == [34, 34, 34]  # ceil(100 / 3) each; two padding rows in all


def test_two_processes_write_disjoint_shards(store_url):
    procs = [subprocess.Popen([sys.executable, str(HERE / "write_worker.py"), store_url, str(ROWS), shards],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for shards in ("0,2", "1,3")]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip().endswith("done")
    store = FeatureStore(store_url)
    writer = store.create(make_spec(), make_layout(ROWS))
    assert writer.missing_shards() == []
    writer.finalize()
    got = store.open(writer.key).read_range(0, ROWS)
    for name, want in expected_rows(make_rows(ROWS)).items():
        assert np.array_equal(got[name], want)


def test_killed_writer_resumes_to_an_identical_entry(tmp_path, store_url):
    _, key, expected = write_entry(str(tmp_path / "reference"))
    reference = FeatureStore(str(tmp_path / "reference")).open(key)
    proc = subprocess.Popen([sys.executable, str(HERE / "write_worker.py"), store_url, str(ROWS), "0,1,2,3", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the first shard is committed, then the writer sleeps
    proc.kill()
    proc.wait(timeout=30)
    assert first.strip() == "committed 0"
    store = FeatureStore(store_url)
    writer = store.create(make_spec(), make_layout(ROWS))
    assert writer.missing_shards() == [1, 2, 3]
    write_shards(writer, make_rows(ROWS), writer.missing_shards())
    assert writer.finalize()["checksums"] == reference.manifest["checksums"]
    got = store.open(key).read_range(0, ROWS)
    for name in expected:
        assert np.array_equal(got[name], expected[name])


def test_racing_finalize_and_create_agree(store_url):
    store = FeatureStore(store_url)
    a = store.create(make_spec(), make_layout(ROWS))
    b = FeatureStore(store_url).create(make_spec(), make_layout(ROWS))
    write_shards(a, make_rows(ROWS), [0, 1, 2, 3])
    write_shards(b, make_rows(ROWS), [3])  # already committed: returns the existing commit
    first, second = a.finalize(), b.finalize()
    assert first == second


def test_one_dimensional_and_wide_arrays(local_store_url):
    layout = EntryLayout(rows=10, shard_rows=4, chunk_rows=2,
                         arrays=(ArraySpec("score", 0, "float32"), ArraySpec("f", 3 * WIDTH, "float16")))
    store = FeatureStore(local_store_url)
    writer = store.create(make_spec("1d"), layout)
    score = np.arange(10, dtype=np.float32)
    feats = np.arange(10 * 3 * WIDTH, dtype=np.float16).reshape(10, -1)
    for shard in writer.missing_shards():
        s, e = layout.shard_range(shard)
        writer.write_shard(shard, {"score": score[s:e], "f": feats[s:e]})
    writer.finalize()
    reader = store.open(writer.key)
    assert np.array_equal(reader.read_range(0, 10)["score"], score)
    assert np.array_equal(reader.read_rows([9, 1])["f"], feats[[9, 1]])


@pytest.mark.parametrize("url, parsed", [
    ("s3://bucket/a/b.jpg", ("bucket", "a/b.jpg")),
    ("s3://bucket/prefix/", ("bucket", "prefix")),
    ("s3://bucket", ("bucket", "")),
    ("s3://bucket/a#1?x=2;y.jpg", ("bucket", "a#1?x=2;y.jpg")),  # keys may hold what a URL parser cuts off
])
def test_one_s3_url_parser_for_stores_sources_and_weights(url, parsed):
    from featurestore import sources
    from featurestore.backends import StoreURL, parse_s3_url

    assert parse_s3_url(url) == parsed
    assert (StoreURL.parse(url).bucket, StoreURL.parse(url).prefix) == parsed
    assert sources.normalize(url) == f"s3://{parsed[0]}/{parsed[1]}".rstrip("/")


@pytest.mark.parametrize("url", ["s3://ab/key", "s3:///key", "s3:/bucket/key", "bucket/key", "S3://bucket/key"])
def test_a_bad_s3_url_is_a_user_error_naming_it_and_the_form(url):
    from featurestore import sources
    from featurestore.backends import S3URLError, StoreError, parse_s3_url
    from featurestore.errors import UserError
    from trainers.weights import WeightsError, file_identity

    with pytest.raises(S3URLError) as caught:
        parse_s3_url(url)
    assert isinstance(caught.value, (UserError, ValueError))
    assert repr(url) in str(caught.value) and "s3://<bucket>/" in str(caught.value)
    if url.startswith("s3://"):  # each caller keeps its own error class, with the same message
        with pytest.raises(StoreError, match="s3://<bucket>/"):
            FeatureStore(url)
        with pytest.raises(sources.SourceError, match="s3://<bucket>/"):
            sources.read_bytes(url)
        with pytest.raises(WeightsError, match="s3://<bucket>/"):
            file_identity(url)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    from featurestore.files import atomic_write_bytes, atomic_write_text

    target = tmp_path / "cache.json"
    atomic_write_text(target, '{"a": 1}')
    atomic_write_bytes(target, b'{"b": 2}')
    assert target.read_bytes() == b'{"b": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]

    with pytest.raises(TypeError):  # the write fails: the old file stays, the temporary is removed
        atomic_write_bytes(target, "not bytes")
    assert target.read_bytes() == b'{"b": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "x.json", b"{}")
