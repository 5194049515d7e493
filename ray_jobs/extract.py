"""Teacher extraction: run the backbones once at full resolution and store MLSP features (GSFs).

    python -m ray_jobs.extract --config configs/extract_demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ray_jobs.extract --config FILE [key=value ...]

Features belong to images: a GSF row is keyed by the SHA-256 of the image bytes and the
extractor, never by labels, splits, names or URIs, so a re-split, a relabel or a moved dataset
costs no forward pass and a dataset that gains k images costs k (``ray_jobs.stages.extract``).
The last stdout line is a JSON object: entry (the dataset's GSF view, ``ray_jobs.distill``'s
``gsf_entry``), segment (the new segment or null), rows, ok, failed, computed_rows (images
computed by this run), reused_rows (dataset rows whose features were already stored),
forward_passes, reused, seconds, shard_seconds (the actors' time inside shards), images_per_s.
A shard that fails for good is named on stderr and the job exits 2; a rerun retries exactly it.
"""

import dataclasses
import sys

from ray_jobs.config import run_job
from ray_jobs.stages.extract import ExtractConfig, extract

JOB = "extract"


def main(cfg: ExtractConfig) -> dict:
    return dataclasses.asdict(extract(cfg))


if __name__ == "__main__":
    sys.exit(run_job(JOB, ExtractConfig, main))
