"""The prediction stage: score images with a student checkpoint and write one CSV row per image.

``images`` is a folder or ``s3://`` prefix (every image under it, sorted by path) or a CSV file
with an ``image`` column (``featurestore.datasets``, format ``csv``). Each image is seen
through the student's own view, on CUDA when this machine has it. A multi-modal student
(Table XII) also reads each image's semantic tags: give it a CSV with ``tag1``/``tag2`` columns
(tag ids of the dataset it was trained on, 0 = none). A ``multitask`` student's tag head is not
used: its columns are those of its label.

Columns: ``image_id``, ``uri``, then by the student's label

* distribution: ``mean_score``, ``p1`` … ``p10``. The mean score is Σ_k k·p_k over the bins
  k = 1..10 of a softmax distribution (the paper's "weighted average"), so it always lies in
  [1, 10]; p_k is the predicted share of raters giving score k;
* binary: ``probability``, the sigmoid probability that the image is of high aesthetic quality
  (mean score ≥ 5);
* score: ``score``, the regressed mean score; a linear output, not clipped to [1, 10];

and last ``reason``: empty for a scored image; for an image that could not be read or decoded,
why, with the score columns left empty.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurestore.datasets import load_dataset
from ray_jobs.config import ConfigError, option
from ray_jobs.stages.evaluate import checkpoint_name
from ray_jobs.runtime import Progress, log
from trainers.labels import NUM_BINS, scoring_tags
from trainers.metrics import mean_score
from trainers.student import Scores, load_student, score_images

JOB = "predict"


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str = option(help="student checkpoint: directory or s3:// prefix with model.safetensors, student.json")
    images: str = option(help="a folder or s3:// prefix of images, or a CSV file with an 'image' column")
    output: str | None = option(None, help="CSV to write (local path); default <checkpoint-name>-predictions.csv")
    batch_size: int = option(32, help="images per forward pass")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError("batch_size must be ≥ 1")
        if self.output is not None and self.output.startswith("s3://"):
            raise ConfigError("output must be a local path; copy the CSV to S3 afterwards")


def score_columns(label: str, scores: Scores) -> tuple[list[str], np.ndarray]:
    """Header and [N, k] values of the score columns (rows of unscored images are NaN)."""
    if label == "distribution":
        means = np.full(len(scores.ok), np.nan)
        means[scores.ok] = mean_score(scores.output[scores.ok])
        return ["mean_score", *(f"p{k}" for k in range(1, NUM_BINS + 1))], np.column_stack([means, scores.output])
    return ["probability" if label == "binary" else "score"], scores.output[:, None]


@dataclass(frozen=True)
class PredictResult:
    """``n`` images scored and ``failed`` not, with their rows in the CSV at ``output``."""

    checkpoint: str
    label: str
    n: int
    failed: int
    output: str


def predict(cfg: PredictConfig) -> PredictResult:
    """Score every image of ``cfg.images`` and write the CSV."""
    model, spec, _ = load_student(cfg.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    log(JOB, f"student {spec.backbone} ({spec.label}, view {spec.view}) on {device}")
    manifest = load_dataset(cfg.images, "csv" if cfg.images.lower().endswith(".csv") else "folder")
    tags = None if spec.semantic is None else scoring_tags(manifest.name, manifest.tags, spec.tag_width)
    progress = Progress(JOB, len(manifest), unit="images")
    scores = score_images(model, list(manifest.uris), cfg.batch_size, progress.add, tags=tags)
    header, values = score_columns(spec.label, scores)
    output = Path(cfg.output or f"{checkpoint_name(cfg.checkpoint)}-predictions.csv")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image_id", "uri", *header, "reason"])
        for image_id, uri, v, reason in zip(manifest.image_ids, manifest.uris, values, scores.reasons):
            if reason is None:
                out.writerow([image_id, uri, *(f"{x:.6g}" for x in v), ""])
            else:
                log(JOB, f"failed {image_id}: {reason}")
                out.writerow([image_id, uri, *[""] * len(header), reason])
    failed = len(manifest) - int(scores.ok.sum())
    log(JOB, f"{len(manifest) - failed} images scored, {failed} failed in {progress.seconds:.1f} s → {output}")
    return PredictResult(checkpoint=cfg.checkpoint, label=spec.label, n=len(manifest) - failed, failed=failed,
                         output=str(output))

