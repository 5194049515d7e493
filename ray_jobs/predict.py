"""Score images with a student checkpoint and write one CSV row per image.

    python -m ray_jobs.predict --config FILE [key=value ...]
    python -m ray_jobs.predict checkpoint=runs/exp/checkpoint images=s3://bucket/photos output=scores.csv

The columns are described in ``ray_jobs.stages.predict``. Last stdout line: JSON with
checkpoint, label, n (images scored), failed (images not scored) and output (the CSV's path).
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.predict import PredictConfig, predict

JOB = "predict"


def main(cfg: PredictConfig) -> dict:
    return dataclasses.asdict(predict(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, PredictConfig, main))
