"""Every shipped config parses with its job's config class (strict keys, typed values)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_jobs.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def job_config_class(path: Path):
    if path.name.startswith("extract_"):
        from ray_jobs.extract import ExtractConfig

        return ExtractConfig
    if path.name.startswith("distill_"):
        from ray_jobs.distill import DistillConfig

        return DistillConfig
    if path.name.startswith("train_student_"):
        from ray_jobs.train_student import TrainConfig

        return TrainConfig
    raise AssertionError(f"{path.name}: config names start with the job they are for")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    config = load_config(job_config_class(path), str(path), [])
    assert config is not None


def test_paper_settings_match_the_paper():
    from ray_jobs.distill import DistillConfig
    from ray_jobs.train_student import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    distill = load_config(DistillConfig, str(configs / "distill_paper_ava.yaml"), [])
    assert (distill.batch_size, distill.lr, distill.epochs, distill.lr_step_epochs) == (512, 3e-5, 12, 3)
    train = load_config(TrainConfig, str(configs / "train_student_paper_ava.yaml"), [])
    assert (train.batch_size, train.lr, train.epochs, train.lr_step_epochs) == (16, 3e-5, 12, 3)
    assert train.student.view == "resize:300" and train.loss.kind == "kd"
