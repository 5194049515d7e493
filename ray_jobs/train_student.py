"""Student training: Ray Train DDP workers stream images + teacher knowledge and fit the KD loss.

    python -m ray_jobs.train_student --config configs/train_student_demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ray_jobs.train_student --config FILE ...

``num_workers`` is a count or a ``[min, max]`` range (elastic). A checkpoint is written every
epoch to ``storage_path/name``; a killed worker or node resumes from it, and running again under
the same ``name`` resumes the run (``ray_jobs.stages.train``). The last stdout line is JSON:
``checkpoint`` (URI), ``metrics`` (srcc, plcc, acc, emd on the test split), ``history``
(per-epoch metrics), ``epochs``, ``train_rows``, ``unreadable_rows``, ``knowledge_entry``,
``loss``, ``student``, ``seconds``.
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.train import TrainConfig, train

JOB = "train_student"


def main(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(train(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, TrainConfig, main))
