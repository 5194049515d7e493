"""Knowledge distiller: fit BN + 3×Linear on stored GSFs, write teacher knowledge into the store.

    python -m ray_jobs.distill --config configs/distill_demo.yaml [key=value ...]

``gsf_entry`` is the GSF entry that ``ray_jobs.extract`` reported, or the path of the extraction
config that produced it; ``dataset.split`` is ``official``, ``file:PATH``, ``cv:K:FOLD[:SEED]``
or ``random:FRACTION:SEED``. Knowledge with the same features, labels, split and distiller spec
is reused without refitting (``ray_jobs.stages.distill``). Last stdout line: JSON with entry,
gsf_entry, reused, test (srcc, plcc, acc, emd), train_rows, test_rows, rows_without_features,
seconds, matching (Table IV, with ``matching: true``).
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.distill import DistillConfig, distill

JOB = "distill"


def main(cfg: DistillConfig) -> dict:
    return dataclasses.asdict(distill(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, DistillConfig, main))
