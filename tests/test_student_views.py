"""Stored student views (featurestore/pixels.py, trainers/student_views.py): decoded once, reused,
failed rows only for what belongs to the image, a transient outage never recorded.

``ensure_views`` runs its shard tasks in this process here (no Ray instance is started in this
module), so the S3 clients below meet the fault proxy that the environment points at.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
from fault_proxy import fault_proxy  # noqa: F401 - the fixture
from image_data import good_images, write_ava

from featurestore import sources
from featurestore.dataset_table import DatasetTable
from featurestore.datasets import load_dataset
from featurestore.features import registered_segments
from featurestore.pixels import PIXELS_ARRAY, pixels_key
from featurestore.store import FeatureStore
from trainers.student_views import ViewsFailed, ensure_views, pixel_view, view_decoder


def images_of(table: DatasetTable) -> tuple[np.ndarray, list[str]]:
    hashes, first = np.unique(table.sha256, return_index=True)
    return hashes, [table.uris[i] for i in first]


def stored_pixels(store_url: str, views, hashes: np.ndarray) -> np.ndarray:
    store = FeatureStore(store_url)
    found, segment, row = views.index.lookup(hashes)
    assert found.all()
    return np.stack([store.open(views.index.segments[s]).read_rows([r], [PIXELS_ARRAY])[PIXELS_ARRAY][0]
                     for s, r in zip(segment, row)])


def test_views_are_decoded_once_equal_a_fresh_decode_and_are_reused(tmp_path):
    write_ava(tmp_path / "ava", {**good_images(10, seed=2), "broken": b"not an image"}, test_every=4)
    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    hashes, uris = images_of(table)
    store_url, view = str(tmp_path / "store"), pixel_view("resize:24x32", use_gpu=False)

    first = ensure_views(store_url, view, hashes, uris)
    assert first.decoded == 11 and len(first.index) == 10
    (reason,) = first.failures.values()
    assert "cannot decode" in reason and "broken" in reason
    ok = hashes[first.index.lookup(hashes)[0]]
    decoder = view_decoder(view)
    want = np.stack([decoder.decode([Path(u).read_bytes()])[0].image.numpy().reshape(-1)
                     for h, u in zip(hashes, uris) if h in set(ok)])
    assert np.array_equal(stored_pixels(store_url, first, ok), want)

    # a failed row is never served as an answer: the next run tries the broken image again (only
    # it, as a segment of its own), and from then on that segment is reused
    again = ensure_views(store_url, view, hashes, uris)
    assert again.decoded == 1 and again.failures == first.failures and np.array_equal(again.index.hashes, first.index.hashes)
    third = ensure_views(store_url, view, hashes, uris)  # another run, seed or loss: nothing decoded
    assert third.decoded == 0 and third.failures == first.failures
    # a superset decodes only the new images, into a segment of their own
    write_ava(tmp_path / "more", good_images(13, seed=2), test_every=4)
    more_hashes, more_uris = images_of(DatasetTable.from_manifest(load_dataset(str(tmp_path / "more"), "ava")))
    more = ensure_views(store_url, view, more_hashes, more_uris)
    assert more.decoded == 3  # the 3 new images: the first 10 are the same bytes
    assert len(registered_segments(FeatureStore(store_url), pixels_key(view))) == 3
    # another decoder is another table: a GPU decode is not served to a CPU run
    assert pixels_key(pixel_view("resize:24x32", use_gpu=True)) != pixels_key(view)


def test_a_file_gone_fails_its_row_and_the_moved_dataset_is_decoded_again(tmp_path):
    write_ava(tmp_path / "ava", good_images(6, seed=4), test_every=4)
    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    hashes, uris = images_of(table)
    (tmp_path / "ava").rename(tmp_path / "moved")
    store_url, view = str(tmp_path / "store"), pixel_view("resize:16", use_gpu=False)
    gone = ensure_views(store_url, view, hashes, uris)
    assert len(gone.index) == 0 and len(gone.failures) == 6
    assert all("no such file" in why and "/ava/" in why for why in gone.failures.values())
    moved = ensure_views(store_url, view, hashes, [u.replace("/ava/", "/moved/") for u in uris])
    assert moved.decoded == 6 and len(moved.index) == 6 and not moved.failures


def test_a_transient_outage_fails_shards_not_rows_and_a_rerun_completes(fault_proxy, tmp_path, s3_bucket,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setenv("AKD_S3_MAX_RETRIES", "1")
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "cache"))
    write_ava(tmp_path / "ava", good_images(8, seed=6), test_every=4)
    s3 = boto3.client("s3")
    for path in (tmp_path / "ava").iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"views/{path.name}", Body=path.read_bytes())
    table = DatasetTable.from_manifest(load_dataset(f"s3://{s3_bucket}/views", "ava"))
    hashes, uris = images_of(table)
    store_url, view = str(tmp_path / "store"), pixel_view("resize:16", use_gpu=False)
    with fault_proxy.env():
        sources._bucket_store.cache_clear()  # image reads through the proxy
        try:
            fault_proxy.set(outage_keys=[Path(uris[3]).name], outage_s=600)
            with pytest.raises(ViewsFailed, match=r"1 of 1 shard\(s\) could not be written.*rerun"):
                ensure_views(store_url, view, hashes, uris)
            assert fault_proxy.stats()["outage"] > 0
            fault_proxy.clear()
            views = ensure_views(store_url, view, hashes, uris)
        finally:
            sources._bucket_store.cache_clear()
    assert views.decoded == 8 and len(views.index) == 8 and not views.failures  # nothing recorded as failed


def test_gc_takes_a_view_segment_out_of_its_table_before_deleting_it(tmp_path):
    from featurestore.catalog import plan_gc, run_gc

    write_ava(tmp_path / "ava", good_images(4, seed=8), test_every=4)
    hashes, uris = images_of(DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava")))
    store_url, view = str(tmp_path / "store"), pixel_view("resize:16", use_gpu=False)
    ensure_views(store_url, view, hashes, uris)
    store = FeatureStore(store_url)
    (segment,) = registered_segments(store, pixels_key(view))
    run_gc(store, [a for a in plan_gc(store, older_than_s=0, keep=set()) if a.key == segment])
    assert registered_segments(store, pixels_key(view)) == () and segment not in store.keys()
    assert ensure_views(store_url, view, hashes, uris).decoded == 4  # decoded again, not served from a ghost


def test_a_rerun_after_a_middle_shard_committed_decodes_the_others_in_place(tmp_path, monkeypatch):
    """Resume: with shard 1 of 3 already committed, one task gets shards 0 and 2, and each row
    still gets its own image's view (the rows between them are skipped, not shifted)."""
    import featurestore.pixels as pixels
    from featurestore.dataset_table import hashes_to_hex
    from trainers.student_views import write_shards

    monkeypatch.setattr(pixels, "SHARD_BYTES", 16 * 16 * 3 * 8)  # 8 rows a shard
    write_ava(tmp_path / "ava", good_images(20, seed=3), test_every=4)
    hashes, uris = images_of(DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava")))
    store_url, view = str(tmp_path / "store"), pixel_view("resize:16", use_gpu=False)
    writer = pixels.create_segment(FeatureStore(store_url), view, hashes, uris)
    assert writer.layout.num_shards == 3
    write_shards(store_url, writer.spec.to_json(), writer.layout.to_json(), hashes_to_hex(hashes[8:16]), uris[8:16],
                 [1], 8)
    views = ensure_views(store_url, view, hashes, uris)
    assert views.decoded == 12 and len(views.index) == 20
    decoder = view_decoder(view)
    want = np.stack([decoder.decode([Path(u).read_bytes()])[0].image.numpy().reshape(-1) for u in uris])
    assert np.array_equal(stored_pixels(store_url, views, hashes), want)
