"""Distill and a student epoch through real S3 faults, and a lost knowledge object.

Images and stores live on the moto server; every client below is created while
``AWS_ENDPOINT_URL`` points at the fault-injecting proxy, so their requests meet the faults.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from fault_proxy import fault_proxy  # noqa: F401 - the fixture
from image_data import good_images, write_ava

from featurestore import sources
from featurestore.dataset_table import DatasetTable
from featurestore.datasets import load_dataset
from featurestore.partition import World
from featurestore.reader import CorruptEntry
from featurestore.specs import BackboneSpec, ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView, import_features
from trainers.distiller import DistillerSpec
from trainers.images import ImageDecoder
from trainers.knowledge import distill, knowledge_hashes
from trainers.student_data import DecodedImages, StudentStream, split_rows

EXTRACTOR = ExtractorSpec(backbones=(BackboneSpec("toy", "random:0", ("stem",), 24),))
SPEC = DistillerSpec(backbones=(), hidden=(16, 8), epochs=3, batch_size=8)


@pytest.fixture
def s3_dataset(tmp_path, s3_bucket, monkeypatch) -> str:
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "cache"))
    write_ava(tmp_path / "ava", good_images(24, seed=9), test_every=4)
    s3 = boto3.client("s3")
    for path in (tmp_path / "ava").iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"ava/{path.name}", Body=path.read_bytes())
    return f"s3://{s3_bucket}/ava"


def knowledge_in(store_url: str, dataset: str) -> tuple[str, dict]:
    table = DatasetTable.from_manifest(load_dataset(dataset, "ava"))
    gsf = np.random.default_rng(0).random((len(table), 24)).astype(np.float16)
    view = import_features(FeatureStore(store_url), EXTRACTOR, table, gsf, shard_rows=8)
    return view.key, distill(FeatureStore(store_url), view.key, SPEC, torch.device("cpu"))


def stream(store_url: str, key: str) -> StudentStream:
    store = FeatureStore(store_url)
    knowledge = store.open(key)
    table = GsfView(store, knowledge.attrs["view"]).dataset()
    data = split_rows(table, knowledge_hashes(knowledge), "train", "distribution")
    images = DecodedImages(data, ImageDecoder(device="cpu", resize=(32, 32)), (32, 32), locality_rows=8)
    return StudentStream(store_url, key, data, "distribution", World(0, 1), 4, images, seed=0)


def epoch_rows(s: StudentStream) -> tuple[list[int], np.ndarray]:
    rows, features = [], []
    for batch in s.epoch(0):
        keep = batch.weight.numpy() > 0
        rows += batch.rows[keep].tolist()
        features.append(batch.teacher_feature.numpy()[keep])
    order = np.argsort(rows)
    return sorted(rows), np.concatenate(features)[order]


def test_distill_and_a_student_epoch_through_faults_match_a_fault_free_run(fault_proxy, s3_dataset,  # noqa: F811
                                                                           s3_bucket):
    clean_store = f"s3://{s3_bucket}/clean"
    _, clean = knowledge_in(clean_store, s3_dataset)
    clean_rows, clean_features = epoch_rows(stream(clean_store, clean["entry"]))
    assert len(clean_rows) == 18  # 24 images, every 4th is test

    with fault_proxy.env():
        sources._bucket_store.cache_clear()  # image reads, too, through the proxy
        try:
            fault_proxy.set(slowdown=0.1, internal_error=0.05, drop=0.05, seed=5)
            faulty_store = f"s3://{s3_bucket}/faulty"
            _, faulty = knowledge_in(faulty_store, s3_dataset)
            rows, features = epoch_rows(stream(faulty_store, faulty["entry"]))
            assert fault_proxy.injected > 0, fault_proxy.stats()
        finally:
            sources._bucket_store.cache_clear()
    assert faulty["entry"] == clean["entry"] and faulty["test"] == clean["test"]
    assert rows == clean_rows and np.array_equal(features, clean_features)


def test_a_lost_knowledge_object_fails_the_student_naming_it(tmp_path, s3_dataset):
    store_url = str(tmp_path / "store")
    _, knowledge = knowledge_in(store_url, s3_dataset)
    lost = next(Path(store_url, knowledge["entry"], "feature", "c").glob("*/0"))
    lost.unlink()
    with pytest.raises(CorruptEntry, match=r"'feature' shard \d+: .*missing") as error:
        epoch_rows(stream(store_url, knowledge["entry"]))
    assert error.value.key == knowledge["entry"] and error.value.array == "feature"
