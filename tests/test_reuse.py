"""Features belong to images: re-splits, relabels, growth, shared images and moves reuse them.

Real Ray, real DALI decoding, a real timm model (resnet18, random weights), a local store and
the moto S3 endpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import good_images, jpeg_bytes, write_ava

from featurestore.dataset_table import DatasetTable
from featurestore.datasets import load_dataset
from featurestore.store import FeatureStore
from featurestore.views import GsfView
from ray_jobs.config import load_config
from ray_jobs.extract import ExtractConfig, main
from trainers.distiller import DistillerSpec
from trainers.knowledge import distill

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["backbones=[resnet18]", "weights=random:0", "workers=1", "cpus_per_worker=2", "shard_rows=32"]
TINY_DISTILLER = DistillerSpec(backbones=(), hidden=(16, 8), epochs=2, batch_size=8)


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "hash-cache"))


def extract(path: Path | str, store: str, *overrides: str) -> dict:
    return main(load_config(ExtractConfig, None, [f"dataset.path={path}", f"store={store}", *SMALL, *overrides]))


def features_by_id(store: str, key: str) -> dict[str, np.ndarray]:
    view = GsfView(FeatureStore(store), key)
    table = view.dataset()
    ok = np.flatnonzero(view.status() == 1)
    return dict(zip(table.image_ids[ok], view.features(table.sha256[ok])))


def test_resplit_and_relabel_compute_nothing_and_refit_only_the_distiller(ray_local, tmp_path, store_url):
    root = tmp_path / "ava"
    write_ava(root, good_images(12))
    first = extract(root, store_url)
    assert first["computed_rows"] == 12 and first["forward_passes"] > 0

    (root / "generic_test.jpgl").write_text("1000\n1001\n")  # re-split: one id moves to test, others to train
    resplit = extract(root, store_url)
    assert resplit["entry"] != first["entry"]
    assert (resplit["computed_rows"], resplit["forward_passes"], resplit["reused_rows"]) == (0, 0, 12)

    text = (root / "AVA.txt").read_text().splitlines()
    fields = text[3].split()
    fields[2] = str(int(fields[2]) + 7)  # relabel: one vote count of one image
    (root / "AVA.txt").write_text("\n".join([*text[:3], " ".join(fields), *text[4:]]) + "\n")
    relabel = extract(root, store_url)
    assert (relabel["computed_rows"], relabel["forward_passes"]) == (0, 0)
    assert features_by_id(store_url, relabel["entry"]).keys() == features_by_id(store_url, first["entry"]).keys()
    for image_id, row in features_by_id(store_url, first["entry"]).items():
        assert np.array_equal(features_by_id(store_url, relabel["entry"])[image_id], row)

    store = FeatureStore(store_url)
    k_first = distill(store, first["entry"], TINY_DISTILLER, torch.device("cpu"))
    k_relabel = distill(store, relabel["entry"], TINY_DISTILLER, torch.device("cpu"))
    assert not k_relabel["reused"] and k_relabel["entry"] != k_first["entry"]
    # a re-split by spec, on the same view: a new knowledge entry; asked again: reused
    from featurestore.splits import SplitSpec

    cv = distill(store, first["entry"], TINY_DISTILLER, torch.device("cpu"), split=SplitSpec.parse("cv:3:1"))
    assert cv["entry"] != k_first["entry"] and cv["train_rows"] + cv["test_rows"] == 12
    again = distill(store, first["entry"], TINY_DISTILLER, torch.device("cpu"), split=SplitSpec.parse("cv:3:1"))
    assert again["reused"] and again["entry"] == cv["entry"]


def test_growth_and_shared_images_compute_only_new_images(ray_local, tmp_path):
    store = str(tmp_path / "store")
    images = good_images(20, seed=11)
    names = list(images)
    write_ava(tmp_path / "a", {k: images[k] for k in names[:12]})
    assert extract(tmp_path / "a", store)["computed_rows"] == 12

    write_ava(tmp_path / "a", {k: images[k] for k in names[:16]})  # the dataset gains 4 images
    grown = extract(tmp_path / "a", store)
    assert grown["computed_rows"] == 4 and grown["reused_rows"] == 12 and grown["ok"] == 16

    # another dataset: 5 images shared with the first (under other ids), 4 of its own, one repeated
    other = {f"b{i}": images[names[i]] for i in range(5)}
    other.update({f"new{i}": images[names[16 + i]] for i in range(4)})
    other["dup"] = images[names[16]]
    write_ava(tmp_path / "b", other)
    shared = extract(tmp_path / "b", store)
    assert shared["computed_rows"] == 4 and shared["rows"] == shared["ok"] == 10
    a, b = features_by_id(store, grown["entry"]), features_by_id(store, shared["entry"])
    for i in range(5):
        assert np.array_equal(a[names[i]], b[f"b{i}"])
    assert np.array_equal(b["dup"], b["new0"])


def test_a_moved_dataset_reuses_features_and_knowledge(ray_local, tmp_path, s3_bucket):
    import boto3

    root = tmp_path / "ava"
    write_ava(root, good_images(10, seed=4))
    store = str(tmp_path / "store")
    first = extract(root, store)
    knowledge = distill(FeatureStore(store), first["entry"], TINY_DISTILLER, torch.device("cpu"))

    s3 = boto3.client("s3")
    for path in root.iterdir():  # the same dataset, moved to S3
        s3.put_object(Bucket=s3_bucket, Key=f"moved/{path.name}", Body=path.read_bytes())
    shutil.rmtree(root)
    moved = extract(f"s3://{s3_bucket}/moved", store)
    assert (moved["computed_rows"], moved["forward_passes"], moved["ok"]) == (0, 0, 10)
    table = DatasetTable.from_manifest(load_dataset(f"s3://{s3_bucket}/moved", "ava"))
    again = distill(FeatureStore(store), first["entry"], TINY_DISTILLER, torch.device("cpu"), table=table)
    assert again["reused"] and again["entry"] == knowledge["entry"]
    assert GsfView(FeatureStore(store), moved["entry"]).dataset().uris[0].startswith(f"s3://{s3_bucket}/moved/")

    # a student of that knowledge is scored on every test image where they are now
    from ray_jobs import evaluate
    from trainers.student import StudentSpec, build_student, save_student

    spec = StudentSpec("resnet18", view="resize:64", feature_width=8)
    checkpoint = save_student(tmp_path / "ckpt", build_student(spec), spec,
                              extra={"knowledge_entry": knowledge["entry"]})
    scored = evaluate.main(load_config(evaluate.EvaluateConfig, None, [
        f"checkpoint={checkpoint}", f"store={store}", f"dataset.path=s3://{s3_bucket}/moved",
        f"output={tmp_path / 'predictions.csv'}"]))
    test_rows = int(np.sum(table.splits == "test"))
    assert scored["n"] == test_rows == knowledge["test_rows"] and scored["failed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("base", [32, 0], ids=["incremental", "first"])
def test_a_killed_extraction_resumes_bit_exact(ray_local, tmp_path, monkeypatch, base):
    """``incremental``: 192 images join 32 with features; ``first``: 224 images, none hashed
    before (the segment is keyed by their URIs and the workers hash them)."""
    rng = np.random.default_rng(7)
    images = {str(i): jpeg_bytes(rng, 192, 160) for i in range(224)}
    names = list(images)
    store = tmp_path / "killed"
    if base:
        write_ava(tmp_path / "ava", {k: images[k] for k in names[:base]})
        extract(tmp_path / "ava", str(store))
    write_ava(tmp_path / "ava", images)
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.extract", f"dataset.path={tmp_path / 'ava'}", *SMALL,
                             f"store={store}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    before = set(store.glob("*/_commits/*.json"))
    deadline = time.time() + 300
    while time.time() < deadline and not set(store.glob("gsfseg-*/_commits/*.json")) - before:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process it started
    proc.wait()
    committed = len(set(store.glob("gsfseg-*/_commits/*.json")) - before)
    assert 1 <= committed < 6, f"{committed} new shards committed before the kill"

    resumed = extract(tmp_path / "ava", str(store))
    assert resumed["computed_rows"] == 224 - base - 32 * committed
    assert resumed["reused_rows"] == 224 - resumed["computed_rows"]
    # the same steps, uninterrupted, into another store
    clean = str(tmp_path / "clean")
    if base:  # the base's segment is keyed by URI and file version, so only the new one must match
        write_ava(tmp_path / "ava", {k: images[k] for k in names[:base]})
        assert extract(tmp_path / "ava", clean)["computed_rows"] == base
        write_ava(tmp_path / "ava", images)
    else:  # a hash cache that knows none of the images again: the same URI-keyed segment
        monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "clean-hash-cache"))
    uninterrupted = extract(tmp_path / "ava", clean)
    assert (uninterrupted["entry"], uninterrupted["segment"]) == (resumed["entry"], resumed["segment"])
    a = FeatureStore(str(store)).open(resumed["segment"])
    b = FeatureStore(clean).open(uninterrupted["segment"])
    assert a.manifest["checksums"] == b.manifest["checksums"]  # bit-exact, shard by shard
    got = features_by_id(str(store), resumed["entry"])
    assert len(got) == 224 and all(np.array_equal(got[i], v) for i, v in features_by_id(clean, resumed["entry"]).items())


def test_bad_split_specs_are_refused_by_name(tmp_path):
    from featurestore.splits import SplitError, SplitSpec

    write_ava(tmp_path / "ava", good_images(4))
    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    (tmp_path / "test.txt").write_text("1000\nnot-an-id\n")
    with pytest.raises(SplitError, match="not-an-id"):
        table.resplit(SplitSpec.parse(f"file:{tmp_path / 'test.txt'}"))
    with pytest.raises(SplitError):
        SplitSpec.parse("cv:3:3")
    with pytest.raises(SplitError):
        SplitSpec.parse("halves")
    bad = subprocess.run([sys.executable, "-m", "ray_jobs.distill", f"store={tmp_path / 's'}", "gsf_entry=gsf-x",
                          "dataset.split=cv:2:5"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "dataset.split" in bad.stderr and "Traceback" not in bad.stderr
