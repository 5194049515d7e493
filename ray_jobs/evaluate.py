"""Score a student checkpoint on one split of a labelled dataset (paper §IV-A, Tables V–IX).

    python -m ray_jobs.evaluate --config FILE [key=value ...]
    python -m ray_jobs.evaluate checkpoint=s3://bucket/runs/exp/checkpoint dataset.path=data/demo split=test

Metrics and the images they cover are described in ``ray_jobs.stages.evaluate``. The per-image
CSV (``output``) holds the ``n`` scored rows: image_id, uri, split, gt_mean, then pred_mean and
pred_p1..pred_p10 (a distribution student), pred_mean (score) or pred_prob (binary). The
per-category table (Table IX) is printed on stderr. Last stdout line: JSON with checkpoint,
label, split, n, failed, metrics {srcc, plcc, acc, emd}, per_category, predictions (the CSV).
"""

import sys
from pathlib import Path

from ray_jobs.config import run_job
from ray_jobs.stages.evaluate import EvaluateConfig, checkpoint_name, evaluate, write_predictions

JOB = "evaluate"


def main(cfg: EvaluateConfig) -> dict:
    result = evaluate(cfg)
    output = Path(cfg.output or f"{checkpoint_name(cfg.checkpoint)}-{cfg.split}-predictions.csv")
    write_predictions(output, result)
    return {**result.to_json(), "predictions": str(output)}


if __name__ == "__main__":
    sys.exit(run_job(JOB, EvaluateConfig, main))
