"""Where do students and teachers look? LayerCAMs against main-subject masks (the paper's Fig. 8-10).

    python -m ray_jobs.explain --config FILE [key=value ...]
    python -m ray_jobs.explain --config configs/explain_demo.yaml \
        "students=[{checkpoint: runs/kd/checkpoint, label: kd}]" n=8

Writes the mIoU-vs-threshold curves (JSON and PNG), every model's maps and Fig. 8-style grids
into ``out`` (see ``ray_jobs.stages.explain``). Last stdout line: JSON with out, images, models,
curves (per model: [{percentile, miou}]), auc (each curve's normalised area) and files.
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.explain import ExplainConfig, explain_images

JOB = "explain"


def main(cfg: ExplainConfig) -> dict:
    return dataclasses.asdict(explain_images(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, ExplainConfig, main))
