"""Score a student checkpoint on one split of a labelled dataset (paper §IV-A, Tables V–IX).

    python -m ray_jobs.evaluate --config FILE [key=value ...]
    python -m ray_jobs.evaluate checkpoint=s3://bucket/runs/exp/checkpoint dataset.path=data/demo split=test

The student sees each image through its own view (``student.json``), on CUDA when this machine
has it, else on the CPU. Metrics follow ``trainers.metrics``: SRCC and PLCC on mean scores
(Σ k·p_k), Acc with high ⇔ mean score ≥ 5, EMD (r = 2) against the normalised vote
distributions. A distribution student on a dataset with mean scores only gets SRCC/PLCC/Acc
and ``emd: null``; a score student gets SRCC/PLCC/Acc; a binary student gets Acc alone
(Table XV). The per-category table (Table IX) needs vote distributions and AVA tags; it is
printed on stderr and returned in the result.

An image that cannot be read or decoded is skipped, counted in ``failed`` and named with its
reason on stderr; metrics cover the ``n`` images that were scored. The per-image CSV holds
those ``n`` rows: image_id, uri, split, gt_mean, then pred_mean and pred_p1..pred_p10 (a
distribution student), pred_mean (score) or pred_prob (binary). Last stdout line: JSON with
checkpoint, label, split, n, failed, metrics {srcc, plcc, acc, emd}, per_category, predictions.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featurestore.backends import StoreError
from featurestore.dataset_table import DatasetTable
from featurestore.datasets import DatasetError
from featurestore.reader import EntryNotFound
from featurestore.sources import SourceError
from featurestore.splits import SplitError
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, option, run_job
from ray_jobs.dataset_input import DatasetConfig, knowledge_table, load_table
from ray_jobs.runtime import Progress, log
from trainers.backbones import BackboneError
from trainers.distiller import NUM_BINS, evaluate_label, targets_for
from trainers.metrics import evaluate_scores, mean_score, per_category
from trainers.student import StudentError, load_student, score_images
from trainers.weights import WeightsError

JOB = "evaluate"
SPLITS = ("test", "train", "all")
METRICS = ("srcc", "plcc", "acc", "emd")


def checkpoint_name(checkpoint: str) -> str:
    """The last path component of a checkpoint directory or prefix, for default output names."""
    return checkpoint.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str = option(help="student checkpoint: directory or s3:// prefix with model.safetensors, student.json")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    store: str | None = option(None, help="feature store of the student's knowledge entry: without dataset.path, "
                                          "the dataset and split recorded there are used")
    split: str = option("test", help=f"one of {', '.join(SPLITS)}")
    batch_size: int = option(32, help="images per forward pass")
    output: str | None = option(None, help="per-image CSV (local); default <checkpoint-name>-<split>-predictions.csv")

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ConfigError(f"split {self.split!r} is not one of {SPLITS}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be ≥ 1")
        if self.output is not None and self.output.startswith("s3://"):
            raise ConfigError("output must be a local path; copy the CSV to S3 afterwards")
        if self.dataset.path is None and self.store is None:
            raise ConfigError("give dataset.path (the labelled images), or store (to use the dataset recorded "
                              "with the student's knowledge entry)")


def labelled_rows(manifest, split: str) -> np.ndarray:
    """Row indices of ``split`` that have a label: vote counts with at least one vote, or a mean score."""
    if manifest.votes is None and manifest.mean_scores is None:
        raise ConfigError(f"dataset {manifest.name!r} has no labels (vote counts or mean scores) to evaluate "
                          "against; use ray_jobs.predict for unlabelled images")
    splits = np.array(manifest.splits)
    rows = np.arange(len(manifest)) if split == "all" else np.flatnonzero(splits == split)
    if not len(rows):
        present = {s or "(none)": int((splits == s).sum()) for s in np.unique(splits)}
        raise ConfigError(f"dataset {manifest.name!r} has no {split!r} images (splits: {present}); "
                          "use split=all or dataset.test_fraction")
    if manifest.votes is not None:  # labels come from the votes where there are any
        voted = np.array(manifest.votes)[rows].sum(1) > 0
        if not voted.all():
            log(JOB, f"{int((~voted).sum())} images without votes are left out")
        rows = rows[voted]
    return rows


def measure(label: str, pred: np.ndarray, votes: np.ndarray | None, gt_mean: np.ndarray) -> dict:
    """The paper's metrics for a student's predictions; undefined ones are None."""
    if label == "distribution" and votes is None:  # mean-score labels only: compare mean scores
        metrics = evaluate_scores(mean_score(pred), gt_mean)
    else:
        metrics = evaluate_label(label, pred, targets_for(label, votes, gt_mean))
    return {k: metrics.get(k) for k in METRICS}


def prediction_columns(label: str, pred: np.ndarray) -> tuple[list[str], np.ndarray]:
    """CSV header and values of the predictions: mean score and bins, a probability, or a score."""
    if label == "distribution":
        return (["pred_mean", *(f"pred_p{k}" for k in range(1, NUM_BINS + 1))],
                np.column_stack([mean_score(pred), pred]))
    return ["pred_prob" if label == "binary" else "pred_mean"], pred[:, None]


def write_predictions(path: Path, manifest, rows: np.ndarray, gt_mean: np.ndarray,
                      header: list[str], values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "uri", "split", "gt_mean", *header])
        for row, gt, v in zip(rows, gt_mean, values):
            out.writerow([manifest.image_ids[row], manifest.uris[row], manifest.splits[row], f"{gt:.6g}",
                          *(f"{x:.6g}" for x in v)])


def log_categories(table: list[dict]) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    log(JOB, "per category (Table IX):")
    for row in table:
        log(JOB, f"  {row['name']:<24} n={row['n']:<6} portion={row['portion']:.3f} " +
            " ".join(f"{k}={fmt(row[k])}" for k in METRICS))


def main(cfg: EvaluateConfig) -> dict:
    model, spec, extra = load_student(cfg.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    log(JOB, f"student {spec.backbone} ({spec.label}, view {spec.view}) on {device}")
    if cfg.store is not None and extra.get("knowledge_entry"):
        store = FeatureStore(cfg.store, create=False)
        manifest = knowledge_table(cfg.dataset, store, store.open(extra["knowledge_entry"]))
    else:
        manifest = load_table(cfg.dataset).resplit(cfg.dataset.split_spec())
    return score_table(cfg, model, spec, manifest)


def score_table(cfg: EvaluateConfig, model, spec, manifest: DatasetTable) -> dict:
    """Score ``cfg.split`` of ``manifest`` (already split) and write the per-image CSV."""
    rows = labelled_rows(manifest, cfg.split)
    progress = Progress(JOB, len(rows), unit="images")
    scores = score_images(model, [manifest.uris[i] for i in rows], cfg.batch_size, progress.add)
    failed = np.flatnonzero(~scores.ok)
    for i in failed:
        log(JOB, f"failed {manifest.image_ids[rows[i]]}: {scores.reasons[i]}")
    rows, pred = rows[scores.ok], scores.output[scores.ok]

    votes = None if manifest.votes is None else np.array(manifest.votes, np.float64)[rows]
    gt_mean = mean_score(votes) if votes is not None else np.array(manifest.mean_scores, np.float64)[rows]
    metrics = measure(spec.label, pred, votes, gt_mean)
    table = [] if spec.label != "distribution" or votes is None or manifest.tags is None else \
        per_category(pred, votes, np.array(manifest.tags, np.int64)[rows], manifest.tag_names)
    output = Path(cfg.output or f"{checkpoint_name(cfg.checkpoint)}-{cfg.split}-predictions.csv")
    write_predictions(output, manifest, rows, gt_mean, *prediction_columns(spec.label, pred))
    log(JOB, f"{len(rows)} images scored, {len(failed)} failed in {progress.seconds:.1f} s: " +
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
    if table:
        log_categories(table)
    return {"checkpoint": cfg.checkpoint, "label": spec.label, "split": cfg.split, "n": len(rows),
            "failed": len(failed), "metrics": metrics, "per_category": table,
            "predictions": str(output)}


if __name__ == "__main__":
    sys.exit(run_job(JOB, EvaluateConfig, main, user_errors=(
        StudentError, WeightsError, BackboneError, DatasetError, SourceError, SplitError, StoreError, EntryNotFound)))
