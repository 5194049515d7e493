"""Extraction through real S3 faults: images and store on the moto server behind mitmproxy.
The proxy also counts the GETs it passes, which shows what a run reads.

Each run is the real job as a user runs it (``python -m ray_jobs.extract``, its own local Ray
instance) with ``AWS_ENDPOINT_URL`` pointing at the fault proxy, so the driver, the Ray workers,
boto3 and obstore all go through the faults.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from fault_proxy import fault_proxy  # noqa: F401 - the fixture
from image_data import good_images

from featurestore.store import FeatureStore
from featurestore.views import GsfView

ROOT = Path(__file__).resolve().parents[1]
N = 40


def upload_dataset(bucket: str) -> dict[str, bytes]:
    """A CSV dataset of N images on S3, the last one listed but never uploaded (a 404)."""
    s3 = boto3.client("s3")
    images = good_images(N, seed=21)
    lines = ["image,mean_score"]
    for i, (image_id, data) in enumerate(images.items()):
        if i < N - 1:
            s3.put_object(Bucket=bucket, Key=f"imgs/{image_id}.jpg", Body=data)
        lines.append(f"s3://{bucket}/imgs/{image_id}.jpg,{4 + (i % 5) * 0.5}")
    s3.put_object(Bucket=bucket, Key="data.csv", Body="\n".join(lines).encode())
    return images


def run_extract(bucket: str, store: str, endpoint: str, tmp: Path, retries: int = 10) -> subprocess.CompletedProcess:
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "RAY_ADDRESS": "", "AKD_CACHE_DIR": str(tmp / "cache"),
           "AKD_S3_MAX_RETRIES": str(retries), "AKD_S3_RETRY_TIMEOUT_S": "20"}
    return subprocess.run([sys.executable, "-m", "ray_jobs.extract", f"dataset.path=s3://{bucket}/data.csv",
                           "dataset.format=csv", f"store={store}", "backbones=[resnet18]", "weights=random:0",
                           "workers=1", "cpus_per_worker=2", "shard_rows=32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def features(store: str, key: str) -> tuple[dict, dict[str, np.ndarray]]:
    view = GsfView(FeatureStore(store), key)
    table = view.dataset()
    ok = np.flatnonzero(view.status() == 1)
    return view.entry.manifest, dict(zip(table.image_ids[ok], view.features(table.sha256[ok])))


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_twenty_percent_faults_give_the_fault_free_entry(fault_proxy, s3_bucket, tmp_path):  # noqa: F811
    upload_dataset(s3_bucket)
    clean = result(run_extract(s3_bucket, f"s3://{s3_bucket}/clean", fault_proxy.endpoint, tmp_path / "a"))
    assert (clean["ok"], clean["failed"]) == (N - 1, 1)

    fault_proxy.clear().set(slowdown=0.1, internal_error=0.05, drop=0.05, seed=3)  # counters: this run only
    faulty = result(run_extract(s3_bucket, f"s3://{s3_bucket}/faulty", fault_proxy.endpoint, tmp_path / "b"))
    stats = fault_proxy.stats()
    assert stats["slowdown"] > 0 and stats["internal_error"] > 0 and stats["drop"] > 0, stats
    assert fault_proxy.injected >= 0.1 * stats["requests"], stats
    fault_proxy.clear()

    assert (faulty["ok"], faulty["failed"]) == (clean["ok"], clean["failed"])
    assert faulty["entry"] == clean["entry"]  # the same dataset view, in another store
    _, want = features(f"s3://{s3_bucket}/clean", clean["entry"])
    manifest, got = features(f"s3://{s3_bucket}/faulty", faulty["entry"])
    assert manifest["failed"] == 1 and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_first_extraction_reads_each_image_once_and_records_the_true_hashes(fault_proxy, s3_bucket, tmp_path):  # noqa: F811
    images = upload_dataset(s3_bucket)
    keys = [f"/{s3_bucket}/imgs/{image_id}.jpg" for image_id in list(images)[:N - 1]]  # the uploaded ones
    cold = tmp_path / "cold"  # a hash cache that knows none of the images: the workers hash them
    first = result(run_extract(s3_bucket, f"s3://{s3_bucket}/first", fault_proxy.endpoint, cold))
    gets = fault_proxy.gets()
    assert (first["ok"], first["failed"], first["computed_rows"]) == (N - 1, 1, N - 1)
    assert [gets.get(k, 0) for k in keys] == [1] * len(keys), {k: gets.get(k, 0) for k in keys}

    fault_proxy.clear()  # the same run, reused: no image is read
    again = result(run_extract(s3_bucket, f"s3://{s3_bucket}/first", fault_proxy.endpoint, cold))
    assert again["forward_passes"] == 0 and not any(fault_proxy.gets().get(k, 0) for k in keys)

    # Into a fresh store with the hashes the first run cached: the driver reads nothing, the
    # workers check each image against its hash. The same view key means the hashes the
    # workers recorded are the images' true hashes; the features are the same too.
    fault_proxy.clear()
    known = result(run_extract(s3_bucket, f"s3://{s3_bucket}/known", fault_proxy.endpoint, cold))
    assert [fault_proxy.gets().get(k, 0) for k in keys] == [1] * len(keys)
    assert known["entry"] == first["entry"] and known["segment"] != first["segment"]  # keyed by hash, not URI
    _, want = features(f"s3://{s3_bucket}/known", known["entry"])
    manifest, got = features(f"s3://{s3_bucket}/first", first["entry"])
    assert manifest["failed"] == 1 and got.keys() == want.keys() == set(list(images)[:N - 1])
    assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_an_outage_of_some_images_is_never_committed_as_failed_rows(fault_proxy, s3_bucket, tmp_path):  # noqa: F811
    images = upload_dataset(s3_bucket)
    down = list(images)[:3]
    store = f"s3://{s3_bucket}/features"
    # the dataset is indexed before the outage (its hashes are cached), then 3 images go down
    result(run_extract(s3_bucket, f"s3://{s3_bucket}/warmup", fault_proxy.endpoint, tmp_path))
    fault_proxy.set(outage_keys=[f"imgs/{i}.jpg" for i in down], outage_s=600)
    during = run_extract(s3_bucket, store, fault_proxy.endpoint, tmp_path, retries=1)
    assert fault_proxy.stats()["outage"] > 0
    if during.returncode == 0:  # only acceptable if nothing was recorded as failed but the 404
        assert json.loads(during.stdout.strip().splitlines()[-1])["failed"] == 1
    else:  # one clear error: the shards that could not be computed, or the image that cannot be indexed
        assert during.returncode == 2, during.stderr[-3000:]
        message = during.stderr.split("error:")[-1]
        assert ("could not be computed" in message and "Rerun" in message) or any(i in message for i in down), message
        assert "Traceback" not in message
    fault_proxy.clear()  # the outage ends

    after = result(run_extract(s3_bucket, store, fault_proxy.endpoint, tmp_path))
    assert (after["ok"], after["failed"]) == (N - 1, 1)
    _, got = features(store, after["entry"])
    _, want = features(f"s3://{s3_bucket}/warmup", after["entry"])
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
