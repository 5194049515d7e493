"""Student training on Ray Train: 2 gloo workers on CPU, exactly-once data, S3 checkpoints, recovery."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import good_images, write_ava

from featurestore.dataset_table import DatasetTable
from featurestore.datasets import load_dataset
from featurestore.partition import World
from featurestore.specs import BackboneSpec, ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView, import_features
from ray_jobs.config import load_config
from trainers.distiller import DistillerSpec
from trainers.knowledge import distill, knowledge_hashes, knowledge_rows

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 30
TINY = ["student.backbone=resnet18", "student.weights=random:0", "student.view=resize:64", "batch_size=4",
        "num_workers=2", "cpus_per_worker=1", "lr=1e-3", "max_unreadable_fraction=0.1"]  # 1 of 24 never decodes


def knowledge_entry(tmp_path: Path, store_url: str) -> str:
    """A real dataset (generated JPEGs, AVA layout), a GSF entry of random features for it, and a
    knowledge entry fitted on those: all the student needs, without running the backbones."""
    good = list(good_images(N_IMAGES, seed=5).items())
    # row 1 (a train row) never decodes: it must get weight 0, not stall or skew training
    images = dict([good[0], ("broken", b"not a jpeg"), *good[1:]])
    write_ava(tmp_path / "ava", images, test_every=5)  # rows 0, 5, 10, ... are test
    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    store = FeatureStore(store_url)
    extractor = ExtractorSpec(backbones=(BackboneSpec("toy", "random:0", ("stem",), 24),))
    gsf = np.random.default_rng(0).random((len(table), 24)).astype(np.float16)
    view = import_features(store, extractor, table, gsf, shard_rows=8)
    spec = DistillerSpec(backbones=("toy",), hidden=(16, 8), epochs=2, batch_size=8)
    return distill(store, view.key, spec, torch.device("cpu"))["entry"]


def train(*overrides: str) -> dict:
    from ray_jobs.train_student import TrainConfig, main

    return main(load_config(TrainConfig, None, list(overrides)))


def test_stream_partitions_train_rows_exactly_once_with_equal_steps(tmp_path):
    from trainers.images import ImageDecoder
    from trainers.student_data import StudentStream, split_rows

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    store = FeatureStore(store_url)
    knowledge = store.open(key)
    dataset = GsfView(store, knowledge.attrs["view"]).dataset()
    data = split_rows(dataset, knowledge_hashes(knowledge), "train", "distribution")
    assert len(data) == 24 and all(dataset.splits[r] == "train" for r in data.rows) and 1 in data.rows
    decoder = ImageDecoder(device="cpu", resize=(32, 32))
    for world in (1, 2, 3, 5):
        seen, steps = [], []
        for rank in range(world):
            stream = StudentStream(store_url, key, data, "distribution", World(rank, world), 4, decoder, (32, 32),
                                   seed=3, locality_rows=8)
            batches = list(stream.epoch(epoch=1))
            steps.append(len(batches))
            for b in batches:
                assert b.images.shape[1:] == (3, 32, 32) and b.teacher_feature.shape[1] == 8
                krows = knowledge_rows(knowledge_hashes(knowledge), dataset.sha256[b.rows])
                np.testing.assert_array_equal(b.teacher_feature.numpy(),
                                              knowledge.read_rows(krows, ["feature"])["feature"])
                seen += b.rows[b.weight.numpy() > 0].tolist()
        assert len(set(steps)) == 1  # DDP needs equal step counts
        assert sorted(seen) == sorted(set(data.rows.tolist()) - {1})


def test_a_moved_dataset_streams_every_row_and_changed_images_are_counted(tmp_path):
    from trainers.images import ImageDecoder
    from trainers.student_data import StudentStream, split_rows

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    store = FeatureStore(store_url)
    knowledge = store.open(key)
    (tmp_path / "ava").rename(tmp_path / "moved")
    moved = DatasetTable.from_manifest(load_dataset(str(tmp_path / "moved"), "ava"))
    data = split_rows(moved, knowledge_hashes(knowledge), "train", "distribution")
    assert len(data) == 24 and all(u.startswith(str(tmp_path / "moved")) for u in data.uris)
    changed = data.uris[2]
    Path(changed).write_bytes(Path(data.uris[3]).read_bytes())  # other bytes than were indexed
    decoder = ImageDecoder(device="cpu", resize=(32, 32))
    stream = StudentStream(store_url, key, data, "distribution", World(0, 1), 4, decoder, (32, 32), seed=0,
                           locality_rows=8)
    used = [r for b in stream.epoch(0) for r in b.rows[b.weight.numpy() > 0].tolist()]
    assert sorted(used) == sorted(set(data.rows.tolist()) - {1, int(data.rows[2])})
    assert stream.unreadable.count == 2  # the undecodable one and the changed one
    assert changed in stream.unreadable.example or "broken" in stream.unreadable.example


def test_two_gloo_workers_train_and_checkpoint_to_s3(ray_local, tmp_path, s3_bucket):
    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    storage = f"s3://{s3_bucket}/runs"
    result = train(f"store={store_url}", f"knowledge_entry={key}", *TINY, "epochs=2", f"storage_path={storage}",
                   "name=kd-run")
    assert result["epochs"] == 2 and result["checkpoint"].startswith(f"s3://{s3_bucket}/runs/kd-run")
    assert set(result["metrics"]) >= {"srcc", "plcc", "acc", "emd"}
    assert result["train_rows"] == 23 and result["unreadable_rows"] == 1  # 24 train rows, one undecodable
    import boto3

    objects = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/kd-run")["Contents"]
    names = {Path(o["Key"]).name for o in objects}
    assert {"model.safetensors", "student.json", "optimizer.safetensors", "trainer_state.json"} <= names

    # the same name resumes: only the new epoch runs
    more = train(f"store={store_url}", f"knowledge_entry={key}", *TINY, "epochs=3", f"storage_path={storage}",
                 "name=kd-run")
    assert more["epochs"] == 3


def test_killed_worker_resumes_from_checkpoint(tmp_path):
    import psutil

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    storage = tmp_path / "runs"
    args = [sys.executable, "-m", "ray_jobs.train_student", f"store={store_url}", f"knowledge_entry={key}", *TINY,
            "epochs=4", f"storage_path={storage}", "name=crash", "max_failures=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and not list(storage.glob("crash/**/model.safetensors")):
        time.sleep(0.2)
    victims = [p for p in psutil.process_iter(["cmdline"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no Ray Train worker process found"
    victims[0].kill()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["epochs"] == 4 and result["checkpoint"]


def test_too_many_unreadable_images_fail_the_run_naming_them(ray_local, tmp_path):
    from ray_jobs.train_student import UnreadableImages

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    (tmp_path / "ava").rename(tmp_path / "moved")  # moved after extraction, and dataset.path not given
    with pytest.raises(UnreadableImages, match=r"24 of 24 train images could not be used in epoch 0.*/ava/.*dataset\.path"):
        train(f"store={store_url}", f"knowledge_entry={key}", *TINY, "epochs=1", "max_failures=0",
              f"storage_path={tmp_path / 'runs'}", "name=unreadable")
