"""The evaluation stage: score a student checkpoint on one split of a labelled dataset (paper §IV-A).

The student sees each image through its own view (``student.json``), on CUDA when this machine
has it, else on the CPU. Metrics follow ``trainers.metrics``: SRCC and PLCC on mean scores
(Σ k·p_k), Acc with high ⇔ mean score ≥ 5, EMD (r = 2) against the normalised vote
distributions. A distribution student on a dataset with mean scores only gets SRCC/PLCC/Acc
and ``emd: None``; a score student gets SRCC/PLCC/Acc; a binary student gets Acc alone
(Table XV). The per-category table (Table IX) needs vote distributions and AVA tags. A
multi-modal student (Table XII) reads each image's two-hot tags with it, so it can only be scored
on a dataset with tags; a ``multitask`` student's tag head is not used here.

An image that cannot be read or decoded is skipped, counted in ``failed`` and named with its
reason on stderr; metrics cover the ``n`` images that were scored. The result carries the
per-image predictions as arrays; ``write_predictions`` writes them as CSV.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch

from featurestore.dataset_table import DatasetTable
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, option
from ray_jobs.stages.dataset_input import DatasetConfig, knowledge_table, load_table
from ray_jobs.runtime import Progress, log
from trainers.labels import NUM_BINS, evaluate_label, labelled_rows, scoring_tags, targets_for
from trainers.metrics import mean_score, per_category
from trainers.student import load_student, score_images

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


def measure(label: str, pred: np.ndarray, votes: np.ndarray | None, gt_mean: np.ndarray) -> dict:
    """The paper's metrics for a student's predictions against the votes (or, without votes, the
    mean scores); undefined ones are None."""
    target = gt_mean if label == "distribution" and votes is None else targets_for(label, votes, gt_mean)
    metrics = evaluate_label(label, pred, target)
    return {k: metrics.get(k) for k in METRICS}


def prediction_columns(label: str, pred: np.ndarray) -> tuple[list[str], np.ndarray]:
    """CSV header and values of the predictions: mean score and bins, a probability, or a score."""
    if label == "distribution":
        return (["pred_mean", *(f"pred_p{k}" for k in range(1, NUM_BINS + 1))],
                np.column_stack([mean_score(pred), pred]))
    return ["pred_prob" if label == "binary" else "pred_mean"], pred[:, None]


def write_predictions(path: Path, result: EvaluateResult) -> None:
    """The per-image CSV: image_id, uri, split, gt_mean, then the prediction columns."""
    images = result.images
    header, values = prediction_columns(result.label, images.pred)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "uri", "split", "gt_mean", *header])
        for image_id, uri, split, gt, v in zip(images.image_ids, images.uris, images.splits, images.gt_mean, values):
            out.writerow([image_id, uri, split, f"{gt:.6g}", *(f"{x:.6g}" for x in v)])


def log_categories(table: list[dict]) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    log(JOB, "per category (Table IX):")
    for row in table:
        log(JOB, f"  {row['name']:<24} n={row['n']:<6} portion={row['portion']:.3f} " +
            " ".join(f"{k}={fmt(row[k])}" for k in METRICS))


@dataclass(frozen=True)
class ScoredImages:
    """The images a student scored, row-aligned: ``pred`` is [n, 10] distributions, or [n]
    probabilities (binary) or mean scores (score); ``gt_mean`` the ground-truth mean scores."""

    image_ids: tuple[str, ...]
    uris: tuple[str, ...]
    splits: tuple[str, ...]
    gt_mean: np.ndarray
    pred: np.ndarray

    @property
    def pred_mean(self) -> np.ndarray:
        """The predicted mean score (a binary student: P(high))."""
        return mean_score(self.pred) if self.pred.ndim == 2 else self.pred


@dataclass(frozen=True)
class EvaluateResult:
    """``metrics`` (srcc, plcc, acc, emd; None where undefined) over the ``n`` images scored;
    ``failed`` images could not be read or decoded (named on stderr); ``per_category`` is
    Table IX's rows; ``images`` the per-image predictions (not part of the JSON)."""

    checkpoint: str
    label: str
    split: str
    n: int
    failed: int
    metrics: dict[str, float | None]
    per_category: list[dict[str, Any]]
    images: ScoredImages

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "label": self.label, "split": self.split, "n": self.n,
                "failed": self.failed, "metrics": self.metrics, "per_category": self.per_category}


def evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score ``cfg.split`` with the checkpoint's student, on CUDA when this machine has it."""
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


def score_table(cfg: EvaluateConfig, model, spec, manifest: DatasetTable) -> EvaluateResult:
    """Score ``cfg.split`` of ``manifest`` (already split)."""
    rows = labelled_rows(manifest, cfg.split)
    tags = None if spec.semantic is None else \
        scoring_tags(manifest.name, None if manifest.tags is None else np.asarray(manifest.tags)[rows], spec.tag_width)
    progress = Progress(JOB, len(rows), unit="images")
    scores = score_images(model, [manifest.uris[i] for i in rows], cfg.batch_size, progress.add, tags=tags)
    failed = np.flatnonzero(~scores.ok)
    for i in failed:
        log(JOB, f"failed {manifest.image_ids[rows[i]]}: {scores.reasons[i]}")
    rows, pred = rows[scores.ok], scores.output[scores.ok]

    votes = None if manifest.votes is None else np.array(manifest.votes, np.float64)[rows]
    gt_mean = mean_score(votes) if votes is not None else np.array(manifest.mean_scores, np.float64)[rows]
    metrics = measure(spec.label, pred, votes, gt_mean)
    table = [] if spec.label != "distribution" or votes is None or manifest.tags is None else \
        per_category(pred, votes, np.array(manifest.tags, np.int64)[rows], manifest.tag_names)
    log(JOB, f"{len(rows)} images scored, {len(failed)} failed in {progress.seconds:.1f} s: " +
        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None))
    if table:
        log_categories(table)
    images = ScoredImages(image_ids=tuple(manifest.image_ids[i] for i in rows),
                          uris=tuple(manifest.uris[i] for i in rows), splits=tuple(manifest.splits[i] for i in rows),
                          gt_mean=gt_mean, pred=pred)
    return EvaluateResult(checkpoint=cfg.checkpoint, label=spec.label, split=cfg.split, n=len(rows),
                          failed=len(failed), metrics=metrics, per_category=table, images=images)
