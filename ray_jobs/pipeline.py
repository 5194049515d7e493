"""The whole paper pipeline in one job: teacher features → knowledge → students with and without KD → report.

    python -m ray_jobs.pipeline --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config configs/paper_ava.yaml

Each stage reuses what the store already holds (``ray_jobs.stages.pipeline``). Progress goes to
stderr. The last stdout line is JSON: report, table, extract (entry, forward_passes, reused,
computed_rows, seconds), distill (entry, reused, test, seconds), splits (one knowledge entry
per split), teacher_seeds (one distiller fit per ``teacher_seeds`` seed: seed, split, entry,
reused, metrics, seconds), students (one per experiment: name, loss, seed, backbone, reused,
metrics, checkpoint, seconds), trained, reused_students, failed, seconds. ``--check`` prints
the plan instead (what would be reused and computed, teacher seed fits included) and runs nothing.
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.pipeline import PipelineConfig, plan, run_pipeline

JOB = "pipeline"


def main(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(run_pipeline(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, PipelineConfig, main, check=plan))
