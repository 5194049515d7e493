"""The evaluate and predict jobs on tiny generated datasets with a saved (untrained) student."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from image_data import good_images, write_ava

from ray_jobs import evaluate, predict
from ray_jobs.config import load_config
from trainers.metrics import mean_score
from trainers.student import StudentSpec, build_student, save_student

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = "1002"  # in the test split (write_ava with test_every=2 puts even rows there)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 AVA images, 6 of them test; one test image is a truncated JPEG."""
    root = tmp_path_factory.mktemp("ava")
    images = good_images(12)
    images[CORRUPT] = images[CORRUPT][: len(images[CORRUPT]) // 2]
    write_ava(root, images, test_every=2)
    return root


def checkpoint(root: Path, label: str = "distribution") -> Path:
    spec = StudentSpec("resnet18", view="resize:64", feature_width=16, label=label)
    return save_student(root / f"{label}-ckpt", build_student(spec), spec, extra={"epoch": 0})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "hash-cache"))


def job(name: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"ray_jobs.{name}", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def recompute(pred_mean, gt_mean, pred_dist=None, gt_dist=None) -> dict:
    """The paper's metrics from per-image values, with scipy's correlations: SRCC and PLCC on mean
    scores (None when undefined), Acc at 5 (high: ≥ 5), EMD (r = 2) of the distributions."""
    pred, gt = np.asarray(pred_mean, float), np.asarray(gt_mean, float)
    defined = len(pred) >= 2 and np.ptp(pred) > 0 and np.ptp(gt) > 0
    metrics = {"srcc": float(spearmanr(pred, gt).statistic) if defined else None,
               "plcc": float(pearsonr(pred, gt).statistic) if defined else None,
               "acc": float(np.mean((pred >= 5) == (gt >= 5)))}
    if pred_dist is not None:
        p = np.asarray(pred_dist, float)
        g = np.asarray(gt_dist, float) / np.sum(gt_dist, axis=1, keepdims=True)
        metrics["emd"] = float(np.mean(np.sqrt(np.mean((np.cumsum(p, 1) - np.cumsum(g, 1)) ** 2, axis=1))))
    return metrics


def assert_metrics(reported: dict, expected: dict) -> None:
    """``reported`` (a job's metrics) are ``expected`` (recomputed from the CSV): SRCC and Acc
    exactly (ranks and sides of 5 survive the CSV's 6 digits), PLCC and EMD to its rounding."""
    assert {k: reported[k] for k in ("srcc", "acc")} == pytest.approx({k: expected[k] for k in ("srcc", "acc")},
                                                                      abs=1e-12), reported
    if expected["plcc"] is None:
        assert reported["plcc"] is None, reported
    else:
        assert reported["plcc"] == pytest.approx(expected["plcc"], abs=2e-3), reported
    if "emd" in expected:
        assert reported["emd"] == pytest.approx(expected["emd"], abs=1e-5), reported


def ava_columns(root: Path) -> tuple[dict[str, np.ndarray], dict[str, set[int]]]:
    """Votes and tag ids of each image id, read from AVA.txt."""
    fields = {line.split()[1]: line.split() for line in (root / "AVA.txt").read_text().splitlines()}
    return ({i: np.array(f[2:12], float) for i, f in fields.items()},
            {i: {int(t) for t in f[12:14]} - {0} for i, f in fields.items()})


def test_evaluate_scores_the_test_split_and_counts_the_corrupt_image(data, ckpt, tmp_path):
    output = tmp_path / "out" / "preds.csv"
    proc = job("evaluate", f"checkpoint={ckpt}", f"dataset.path={data}", "dataset.format=ava", "split=test",
               "batch_size=4", f"output={output}")
    out = result(proc)
    assert out["checkpoint"] == str(ckpt) and out["split"] == "test" and out["label"] == "distribution"
    assert out["n"] == 5 and out["failed"] == 1 and out["predictions"] == str(output)
    assert set(out["metrics"]) == {"srcc", "plcc", "acc", "emd"}
    assert all(isinstance(v, float) for v in out["metrics"].values())
    assert {row["name"] for row in out["per_category"]} == {"Animals", "Urban", "Still Life"}
    assert sum(row["n"] for row in out["per_category"]) == 5  # each image has one tag here
    assert f"failed {CORRUPT}: " in proc.stderr and "truncated" in proc.stderr
    assert "per category" in proc.stderr

    rows = read_csv(output)
    assert len(rows) == out["n"] and CORRUPT not in {r["image_id"] for r in rows}
    assert list(rows[0]) == ["image_id", "uri", "split", "gt_mean", "pred_mean",
                             *(f"pred_p{k}" for k in range(1, 11))]
    assert {r["split"] for r in rows} == {"test"}
    dist = np.array([[float(r[f"pred_p{k}"]) for k in range(1, 11)] for r in rows])
    np.testing.assert_allclose(dist.sum(1), 1, atol=1e-4)
    np.testing.assert_allclose([float(r["pred_mean"]) for r in rows], mean_score(dist), atol=1e-4)
    votes, tags = ava_columns(data)
    gt_votes = np.array([votes[r["image_id"]] for r in rows])
    gt_mean = np.array([float(r["gt_mean"]) for r in rows])
    np.testing.assert_allclose(gt_mean, mean_score(gt_votes), rtol=1e-5)
    # the reported metrics are those of the written predictions. The CSV keeps 6 significant
    # digits, and an untrained student's scores lie within ~0.01 of each other: their mean from the
    # written distribution is the finer one (~1e-6), and PLCC can move by ~1e-3 at that rounding
    pred_mean = mean_score(dist)
    assert np.diff(np.sort(pred_mean)).min() > 1e-4  # the rounding cannot reorder them: SRCC exact
    assert_metrics(out["metrics"], recompute(pred_mean, gt_mean, dist, gt_votes))
    for row in out["per_category"]:
        m = np.array([row["tag"] in tags[r["image_id"]] for r in rows])
        assert_metrics(row, recompute(pred_mean[m], gt_mean[m], dist[m], gt_votes[m]))
    for row in out["per_category"]:
        members = [row["tag"] in tags[r["image_id"]] for r in rows]
        assert row["n"] == sum(members) and row["portion"] == pytest.approx(np.mean(members))


def test_evaluate_a_score_student_on_mean_score_labels(tmp_path):
    """A CSV with mean scores only: SRCC/PLCC/Acc, no EMD and no category table."""
    folder = tmp_path / "csvdata"
    folder.mkdir()
    lines = ["image,mean_score,split"]
    for i, (image_id, data) in enumerate(good_images(6).items()):
        (folder / f"{image_id}.jpg").write_bytes(data)
        lines.append(f"{image_id}.jpg,{3 + i * 0.7:.2f},{'test' if i % 2 else 'train'}")
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(evaluate.EvaluateConfig, None, [
        f"checkpoint={checkpoint(tmp_path, 'score')}", f"dataset.path={folder / 'scores.csv'}",
        "dataset.format=csv", "split=all", f"output={tmp_path / 'p.csv'}"])
    out = evaluate.main(cfg)
    assert out["n"] == 6 and out["failed"] == 0 and out["per_category"] == []
    assert out["metrics"]["emd"] is None and out["metrics"]["srcc"] is not None
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0])[-1] == "pred_mean" and len(rows) == 6
    assert [float(r["gt_mean"]) for r in rows] == pytest.approx([3 + i * 0.7 for i in range(6)])
    pred, gt = ([float(r[column]) for r in rows] for column in ("pred_mean", "gt_mean"))
    assert_metrics(out["metrics"], recompute(pred, gt))


def folder_of_images(root: Path) -> Path:
    root.mkdir()
    for image_id, data in good_images(3).items():
        (root / f"{image_id}.jpg").write_bytes(data)
    (root / "broken.jpg").write_bytes(b"this is not a picture")
    return root


def check_predictions(rows: list[dict]) -> None:
    assert list(rows[0]) == ["image_id", "uri", "mean_score", *(f"p{k}" for k in range(1, 11)), "reason"]
    good = [r for r in rows if not r["reason"]]
    (bad,) = [r for r in rows if r["reason"]]
    assert bad["image_id"] == "broken" and bad["mean_score"] == "" and bad["p1"] == ""
    assert "cannot decode" in bad["reason"]
    assert len(good) == 3 and all(1 <= float(r["mean_score"]) <= 10 for r in good)
    for r in good:
        assert sum(float(r[f"p{k}"]) for k in range(1, 11)) == pytest.approx(1, abs=1e-4)


def test_predict_writes_scores_and_a_reason_for_the_bad_image(ckpt, tmp_path):
    images = folder_of_images(tmp_path / "photos")
    work = tmp_path / "work"
    work.mkdir()
    out = result(job("predict", f"checkpoint={ckpt}", f"images={images}", "batch_size=2", cwd=work))
    assert out == {"checkpoint": str(ckpt), "label": "distribution", "n": 3, "failed": 1,
                   "output": f"{ckpt.name}-predictions.csv"}  # default name, in the working directory
    check_predictions(read_csv(work / out["output"]))


@pytest.mark.s3
def test_predict_reads_checkpoint_and_images_from_s3(ckpt, tmp_path, s3_bucket, s3_endpoint):
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in folder_of_images(tmp_path / "photos").iterdir():
        client.upload_file(str(path), s3_bucket, f"photos/{path.name}")
    for path in ckpt.iterdir():
        client.upload_file(str(path), s3_bucket, f"runs/ckpt/{path.name}")
    cfg = load_config(predict.PredictConfig, None, [
        f"checkpoint=s3://{s3_bucket}/runs/ckpt", f"images=s3://{s3_bucket}/photos", f"output={tmp_path / 's.csv'}"])
    out = predict.main(cfg)
    assert out["n"] == 3 and out["failed"] == 1
    rows = read_csv(tmp_path / "s.csv")
    check_predictions(rows)
    assert all(r["uri"].startswith(f"s3://{s3_bucket}/photos/") for r in rows)


@pytest.mark.parametrize("name, args, key", [
    ("evaluate", ["checkpoint=x", "dataset.path=y", "dataset.formt=ava"], "dataset.formt"),
    ("predict", ["checkpoint=x", "images=y", "batchsize=3"], "batchsize"),
])
def test_an_unknown_config_key_exits_2_naming_it(name, args, key):
    proc = job(name, *args)
    assert proc.returncode == 2 and f"unknown config key {key!r}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_checkpoint_is_one_clear_error(data, tmp_path):
    proc = job("evaluate", f"checkpoint={tmp_path / 'nope'}", f"dataset.path={data}")
    assert proc.returncode == 2 and "no student.json" in proc.stderr and "Traceback" not in proc.stderr


def test_a_multimodal_student_is_scored_with_each_images_own_tags(data, tmp_path):
    """Evaluation and prediction give a multi-modal student (Table XII) each image's two-hot tags
    from the dataset: the predictions are those of the model fed the tags written in AVA.txt."""
    from ray_jobs.stages.dataset_input import DatasetConfig
    from ray_jobs.stages.evaluate import EvaluateConfig, evaluate as evaluate_stage
    from ray_jobs.stages.predict import PredictConfig, predict as predict_stage
    from trainers.labels import LabelError
    from trainers.student import score_images

    spec = StudentSpec("resnet18", view="resize:64", feature_width=16, semantic="multimodal", tag_width=3, seed=1)
    model = build_student(spec)
    ckpt = save_student(tmp_path / "mm-ckpt", model, spec)
    scored = evaluate_stage(EvaluateConfig(checkpoint=str(ckpt), dataset=DatasetConfig(path=str(data)), split="test",
                                           batch_size=4, output=str(tmp_path / "e.csv")))
    assert scored.n == 5 and scored.failed == 1  # the corrupt test image
    _, tag_sets = ava_columns(data)
    by_hand = np.zeros((scored.n, 3), np.float32)
    for row, image_id in enumerate(scored.images.image_ids):
        for tag in tag_sets[image_id]:
            by_hand[row, tag - 1] = 1.0
    assert len({tuple(v) for v in by_hand}) == 3  # the images' tags differ, so a misalignment shows
    expected = score_images(model, list(scored.images.uris), tags=by_hand)
    np.testing.assert_allclose(scored.images.pred, expected.output, rtol=1e-5, atol=1e-6)

    # predict: the same images from a CSV with tag columns give the same distributions
    fields = {line.split()[1]: line.split() for line in (data / "AVA.txt").read_text().splitlines()}
    (tmp_path / "tagged.csv").write_text("image,tag1,tag2\n" + "".join(
        f"{uri},{fields[i][12]},{fields[i][13]}\n" for i, uri in zip(scored.images.image_ids, scored.images.uris)))
    out = predict_stage(PredictConfig(checkpoint=str(ckpt), images=str(tmp_path / "tagged.csv"),
                                      output=str(tmp_path / "p.csv")))
    assert out.n == 5 and out.failed == 0
    rows = read_csv(tmp_path / "p.csv")
    np.testing.assert_allclose([[float(r[f"p{k}"]) for k in range(1, 11)] for r in rows], expected.output, atol=2e-6)
    # images without tags cannot be scored by it: one clear error, before any image is read
    (tmp_path / "untagged.csv").write_text("image\n" + "".join(f"{u}\n" for u in scored.images.uris))
    with pytest.raises(LabelError, match=r"has no semantic tags, which a multimodal student reads with each image"):
        predict_stage(PredictConfig(checkpoint=str(ckpt), images=str(tmp_path / "untagged.csv"),
                                    output=str(tmp_path / "q.csv")))
