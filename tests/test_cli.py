"""`python -m featurestore` against real stores: ls, info, verify (catching damage), gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from entry_data import make_layout, make_rows, make_spec, write_shards
from test_store import ROWS, write_entry

from featurestore.layout import shard_object_path
from featurestore.specs import EntrySpec
from featurestore.store import FeatureStore


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featurestore", *args], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], env=os.environ.copy())


def last_json(out: str):
    return json.loads(out.strip().splitlines()[-1])


def test_ls_and_info_describe_entries(store_url):
    _, key, _ = write_entry(store_url)
    partial = FeatureStore(store_url).create(make_spec("partial"), make_layout(ROWS))
    write_shards(partial, make_rows(ROWS), [1])
    listing = cli("ls", store_url, "--json")
    assert listing.returncode == 0, listing.stderr
    entries = {e["key"]: e for e in last_json(listing.stdout)}
    assert set(entries) == {key, partial.key}
    assert entries[key]["complete"] and not entries[partial.key]["complete"]
    assert entries[key]["rows"] == ROWS and entries[key]["kind"] == "gsf"
    assert entries[key]["stored_bytes"] > entries[partial.key]["stored_bytes"] > 0
    table = cli("ls", store_url)
    assert key in table.stdout and "yes" in table.stdout and "no" in table.stdout
    info = json.loads(cli("info", store_url, partial.key).stdout)
    assert info["state"] == "incomplete" and info["shards_missing"] == [0, 2, 3]


def test_verify_passes_an_intact_entry(store_url):
    _, key, _ = write_entry(store_url)
    result = cli("verify", store_url, key)
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["ok"] and report["shards_checked"] == 4


@pytest.mark.s3
def test_verify_names_a_deleted_shard_object_on_s3(s3_store_url, s3_bucket):
    import boto3

    store, key, _ = write_entry(s3_store_url)
    layout = store.open(key).layout
    victim = f"store/{shard_object_path(key, layout.arrays[0], 2)}"
    boto3.client("s3").delete_object(Bucket=s3_bucket, Key=victim)
    result = cli("verify", s3_store_url, key)
    assert result.returncode == 1
    assert "shard 2" in result.stderr and "missing" in result.stderr
    assert all("shard 2" in p for p in last_json(result.stdout)["problems"])


def test_verify_names_a_truncated_shard_file(local_store_url):
    store, key, _ = write_entry(local_store_url)
    path = Path(local_store_url) / shard_object_path(key, store.open(key).layout.arrays[1], 1)
    path.write_bytes(path.read_bytes()[:-100])
    result = cli("verify", local_store_url, key)
    assert result.returncode == 1
    assert "shard 1" in result.stderr and "truncated" in result.stderr


def test_verify_catches_same_size_corruption(local_store_url):
    store, key, _ = write_entry(local_store_url)
    path = Path(local_store_url) / shard_object_path(key, store.open(key).layout.arrays[0], 0)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # flip bits inside the first chunk's payload
    path.write_bytes(bytes(data))
    result = cli("verify", local_store_url, key)
    assert result.returncode == 1 and "shard 0" in result.stderr and "checksum" in result.stderr


def test_verify_incomplete_entry_fails_naming_missing_shards(store_url):
    writer = FeatureStore(store_url).create(make_spec(), make_layout(ROWS))
    write_shards(writer, make_rows(ROWS), [0, 3])
    result = cli("verify", store_url, writer.key)
    assert result.returncode == 1
    assert "incomplete" in result.stderr and "shard 1: no commit record" in result.stderr


def test_gc_is_a_dry_run_by_default_and_removes_only_stale_or_unreferenced(store_url):
    store, parent, _ = write_entry(store_url)
    child_spec = EntrySpec("knowledge", {"seed": 0}, parent=parent)
    child = store.create(child_spec, make_layout(ROWS))
    write_shards(child, make_rows(ROWS), child.missing_shards())
    child.finalize()
    orphan = write_entry(store_url, spec=make_spec("orphan"))[1]
    stale = store.create(make_spec("stale"), make_layout(ROWS))
    write_shards(stale, make_rows(ROWS), [0])

    dry = cli("gc", store_url, "--older-than-hours", "0", "--unreferenced", "--keep", child.key)
    assert dry.returncode == 0, dry.stderr
    assert set(last_json(dry.stdout)["entries"]) == {orphan, stale.key}
    assert len(FeatureStore(store_url).keys()) == 4  # nothing deleted

    young = cli("gc", store_url, "--delete")  # the stale entry is seconds old, not 24 h
    assert last_json(young.stdout)["entries"] == []

    time.sleep(0.01)
    done = cli("gc", store_url, "--older-than-hours", "0", "--unreferenced", "--keep", child.key, "--delete")
    assert done.returncode == 0 and last_json(done.stdout)["deleted"]
    assert FeatureStore(store_url).keys() == sorted([parent, child.key])
    assert store.open(parent).read_range(0, 3)["gsf"].shape == (3, 48)


def test_bad_urls_give_one_clear_error(s3_endpoint, tmp_path):
    for url, message in [("gs://bucket/x", "unknown scheme"), ("s3://no-such-bucket-here/x", "bucket does not exist"),
                         (str(tmp_path / "absent"), "no such directory")]:
        result = cli("ls", url)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
    missing = cli("info", str(tmp_path), "gsf-000000000000000000000000")
    assert missing.returncode == 2 and "no entry" in missing.stderr
