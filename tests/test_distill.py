"""The distiller job on a synthetic GSF entry with a known signal, on local and S3 stores."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from featurestore.dataset_table import DatasetTable, hashes_from_hex
from featurestore.specs import BackboneSpec, ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView, import_features
from trainers.distiller import DistillerSpec
from trainers.knowledge import KnowledgeError, distill, knowledge_entry_spec, knowledge_hashes, labels_digest
from trainers.labels import LabelError, table_targets
from trainers.metrics import evaluate

ROOT = Path(__file__).resolve().parents[1]
N, NOISE, SIGNAL = 480, 32, 48
CPU = torch.device("cpu")
SMALL = dict(hidden=(64, 16), epochs=25, batch_size=64, lr=2e-3, lr_step_epochs=10)


EXTRACTOR = ExtractorSpec(backbones=(BackboneSpec("noise", "random:0", ("stem",), NOISE),
                                     BackboneSpec("signal", "random:1", ("stem",), SIGNAL)))


def fake_hashes(n: int, salt: str = "") -> np.ndarray:
    return hashes_from_hex([hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)])


def synthetic_gsf_entry(url: str, test_outlier: float | None = None, unvoted: tuple[int, ...] = ()) -> tuple[str, dict]:
    """Backbone 'noise' (32 columns) carries nothing; 'signal' (48 columns, column j centred on 10 + j)
    determines the score. Every 5th row is test; row 7 failed extraction; rows ``unvoted`` have no votes."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (N, NOISE))
    signal = 10 + np.arange(SIGNAL) + rng.normal(0, 0.5, (N, SIGNAL))
    quality = 5 + 3 * np.tanh((signal - 10 - np.arange(SIGNAL))[:, :8].sum(1) / 2)
    raters = np.clip(np.rint(quality[:, None] + rng.normal(0, 1.2, (N, 100))), 1, 10).astype(int)
    votes = np.stack([(raters == k).sum(1) for k in range(1, 11)], 1)
    votes[list(unvoted)] = 0
    splits = np.array(["test" if i % 5 == 0 else "train" for i in range(N)], object)
    gsf = np.concatenate([noise, signal], 1).astype(np.float16)
    if test_outlier is not None:
        gsf[splits == "test"] = test_outlier  # would wreck BatchNorm's statistics if fitted on
    table = DatasetTable(name="synthetic", image_ids=np.array([str(i) for i in range(N)], object),
                         uris=np.array([f"/nowhere/{i}.jpg" for i in range(N)], object),
                         sha256=fake_hashes(N, salt=str(test_outlier)), splits=splits, votes=votes,
                         tags=np.array([[1 + i % 2, 0] for i in range(N)]), tag_names=((1, "Animals"), (2, "Urban")))
    view = import_features(FeatureStore(url), EXTRACTOR, table, gsf, failures={7: "cannot decode"}, shard_rows=128)
    return view.key, {"votes": votes, "splits": splits, "signal_mean": signal[splits == "train"].mean(0),
                      "table": table}


def test_distiller_learns_the_signal_and_writes_a_knowledge_entry(store_url):
    parent, truth = synthetic_gsf_entry(store_url)
    store = FeatureStore(store_url)
    result = distill(store, parent, DistillerSpec(backbones=("signal", "noise"), **SMALL), CPU)
    assert result["reused"] is False and result["gsf_entry"] == parent
    assert result["train_rows"] == 383 and result["test_rows"] == 96  # row 7 (train) failed extraction
    assert result["rows_without_features"] == 1

    test = truth["splits"] == "test"
    gt = truth["votes"][test] / truth["votes"][test].sum(1, keepdims=True)
    train_mean = (truth["votes"][~test] / truth["votes"][~test].sum(1, keepdims=True)).mean(0)
    trivial = evaluate(np.tile(train_mean, (len(gt), 1)), gt)
    assert result["test"]["srcc"] > 0.6
    assert result["test"]["emd"] < 0.75 * trivial["emd"]

    knowledge = store.open(result["entry"])
    assert knowledge.attrs["view"] == parent and knowledge.spec.kind == "knowledge"
    assert knowledge.attrs["uses"] == list(GsfView(store, parent).segments)  # lineage: the features it read
    assert knowledge.spec.producer["backbones"] == ["noise", "signal"]  # entry order, whatever was asked
    arrays = knowledge.read_range(0, knowledge.rows)
    assert arrays["feature"].shape == (N - 1, 16) and arrays["distribution"].shape == (N - 1, 10)
    # rows are the images with features, by hash: row 7 (failed) has none
    hashes = np.sort(np.delete(truth["table"].sha256, 7))
    assert np.array_equal(knowledge_hashes(knowledge), hashes)
    np.testing.assert_allclose(arrays["distribution"].sum(1), 1, atol=1e-5)
    assert np.all(arrays["feature"] >= 0)  # f_t is the post-ReLU input of the last layer
    state = load_safetensors(knowledge.read_blob("distiller.safetensors"))
    assert state["fc2.weight"].shape == (16, 64) and state["norm.weight"].shape == (NOISE + SIGNAL,)

    again = distill(store, parent, DistillerSpec(backbones=("noise", "signal"), **SMALL), CPU)
    assert again["reused"] and again["entry"] == result["entry"] and again["test"] == result["test"]
    other_seed = distill(store, parent, DistillerSpec(backbones=("noise", "signal"), seed=1, **{**SMALL, "epochs": 1}),
                         CPU)
    assert other_seed["entry"] != result["entry"] and not other_seed["reused"]


def test_backbone_subset_uses_exactly_its_columns(local_store_url):
    parent, truth = synthetic_gsf_entry(local_store_url)
    store = FeatureStore(local_store_url)
    signal = distill(store, parent, DistillerSpec(backbones=("signal",), **SMALL), CPU)
    noise = distill(store, parent, DistillerSpec(backbones=("noise",), **SMALL), CPU)
    state = load_safetensors(store.open(signal["entry"]).read_blob("distiller.safetensors"))
    assert state["norm.running_mean"].shape == (SIGNAL,)
    # column j of 'signal' is centred on 10 + j: BatchNorm saw exactly those columns, in order
    np.testing.assert_allclose(state["norm.running_mean"].numpy(), truth["signal_mean"], atol=0.5)
    assert signal["test"]["srcc"] > 0.6 > noise["test"]["srcc"]
    with pytest.raises(KnowledgeError, match="no backbone"):
        distill(store, parent, DistillerSpec(backbones=("missing",), **SMALL), CPU)


def test_test_rows_never_enter_fitting(local_store_url):
    parent, _ = synthetic_gsf_entry(local_store_url, test_outlier=5000.0)
    store = FeatureStore(local_store_url)
    result = distill(store, parent, DistillerSpec(backbones=("signal",), **{**SMALL, "epochs": 3}), CPU)
    state = load_safetensors(store.open(result["entry"]).read_blob("distiller.safetensors"))
    assert float(state["norm.running_mean"].max()) < 100  # test rows sit at 5000
    assert result["train_rows"] == 383


def test_matching_analysis_and_per_category(local_store_url):
    parent, _ = synthetic_gsf_entry(local_store_url)
    store = FeatureStore(local_store_url)
    result = distill(store, parent, DistillerSpec(backbones=("noise", "signal"), **SMALL), CPU, matching=True)
    assert set(result["matching"]) == {"gsf", "teacher_feature"}
    # f_t was shaped by the aesthetic labels; the raw GSF is half noise
    assert result["matching"]["teacher_feature"]["srcc"] > result["matching"]["gsf"]["srcc"]
    table = store.open(result["entry"]).read_document("metrics")["per_category"]
    assert {row["name"] for row in table} == {"Animals", "Urban"} and sum(row["n"] for row in table) == 96


def test_distill_job_cli_and_bad_subset(local_store_url):
    parent, _ = synthetic_gsf_entry(local_store_url)
    args = [sys.executable, "-m", "ray_jobs.distill", f"store={local_store_url}", f"gsf_entry={parent}",
            "hidden=[32,8]", "epochs=2", "batch_size=64"]
    ok = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env=os.environ.copy())
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout.strip().splitlines()[-1])
    assert out["gsf_entry"] == parent and set(out["test"]) >= {"srcc", "plcc", "acc", "emd"}
    assert "epoch 2/2" in ok.stderr
    bad = subprocess.run(args + ["backbones=[resnet9000]"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "resnet9000" in bad.stderr and "Traceback" not in bad.stderr


def test_unlabelled_rows_get_knowledge_but_are_neither_fitted_nor_tested(local_store_url):
    unvoted = (7, 10, 11, 12, 15)  # 7: train, no features; 10, 15: test; 11, 12: train
    parent, _ = synthetic_gsf_entry(local_store_url, unvoted=unvoted)
    store = FeatureStore(local_store_url)
    results = {}
    for label in ("distribution", "score", "binary"):  # score and binary once refused any unvoted row
        results[label] = result = distill(store, parent, DistillerSpec(backbones=("signal",), label=label,
                                                                       **{**SMALL, "epochs": 2}), CPU)
        assert (result["train_rows"], result["test_rows"], result["test"]["n"]) == (383 - 2, 96 - 2, 94), label
        assert store.open(result["entry"]).rows == N - 1  # every image with features has knowledge
    metrics = store.open(results["distribution"]["entry"]).read_document("metrics")
    assert sum(row["n"] for row in metrics["per_category"]) == 94


def test_the_planned_entry_is_the_fitted_one_and_labelling_a_row_changes_it(local_store_url):
    parent, truth = synthetic_gsf_entry(local_store_url, unvoted=(11,))
    store = FeatureStore(local_store_url)
    spec = DistillerSpec(backbones=("signal", "noise"), **{**SMALL, "epochs": 1})
    view = GsfView(store, parent)
    planned = knowledge_entry_spec(view, spec)
    result = distill(store, parent, spec, CPU)
    assert planned.key == result["entry"] and not result["reused"]
    votes = truth["votes"].copy()
    votes[11, 4] = 3
    relabelled = dataclasses.replace(truth["table"], votes=votes)
    assert knowledge_entry_spec(view, spec, relabelled).key != planned.key
    no_train = dataclasses.replace(truth["table"], splits=np.full(N, "test", object))
    with pytest.raises(LabelError, match="no labelled 'train' images"):
        knowledge_entry_spec(view, spec, no_train)


def test_label_digest_of_a_fully_labelled_table_is_what_it_was():
    """Knowledge keys hash (image, split, target) of the rows with features. These digests were
    computed before labels had their own module; fully labelled data must keep its keys."""
    n = 12
    votes = np.array([[(3 * i + 5 * k) % 7 + (k == 4) for k in range(10)] for i in range(n)], np.int64)
    table = DatasetTable(name="golden", image_ids=np.array([str(i) for i in range(n)], object),
                         uris=np.array([f"/g/{i}.jpg" for i in range(n)], object),
                         sha256=hashes_from_hex([hashlib.sha256(f"golden{i}".encode()).hexdigest() for i in range(n)]),
                         splits=np.array(["train", "test", "val"] * 4, object), votes=votes)
    rows = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11])  # row 4 without features
    digests = {label: labels_digest(table, rows, table_targets(label, table)) for label in ("distribution", "binary",
                                                                                           "score")}
    assert digests == {"distribution": "e31a46a082d4ab1490ef335772e2a515615bcec19068baedc051847ca2d691de",
                       "binary": "9e36ce8fb65977ba98a027486995744e7722f860e2ac78058d151b793dcf498e",
                       "score": "f7b03f846c3415ccbabb8f12472c76ea52013daa4047a6c9588e30941f86fbdd"}
