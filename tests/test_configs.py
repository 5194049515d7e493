"""Every shipped config parses with its job's config class (strict keys, typed values).

Job configs are named after their job (``extract_*.yaml``…); the others are pipeline configs,
whose stage sections are checked with the stage jobs' classes too.
"""

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
    from ray_jobs.pipeline import PipelineConfig

    return PipelineConfig


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    config = load_config(job_config_class(path), str(path), [])
    assert type(config) is job_config_class(path)
    if hasattr(config, "students"):
        from ray_jobs.pipeline import plan_experiments, stage_configs

        extract, distill = stage_configs(config)
        assert extract.store == distill.store == config.store
        experiments = plan_experiments(config, "knowledge-0")
        assert len(experiments) == len(config.students) * len(config.losses) * len(config.seeds)
        assert len({e.config.name for e in experiments}) == len(experiments)


def test_paper_settings_match_the_paper():
    from ray_jobs.distill import DistillConfig
    from ray_jobs.train_student import TrainConfig

    configs = Path(__file__).resolve().parents[1] / "configs"
    distill = load_config(DistillConfig, str(configs / "distill_paper_ava.yaml"), [])
    assert (distill.batch_size, distill.lr, distill.epochs, distill.lr_step_epochs) == (512, 3e-5, 12, 3)
    train = load_config(TrainConfig, str(configs / "train_student_paper_ava.yaml"), [])
    assert (train.batch_size, train.lr, train.epochs, train.lr_step_epochs) == (16, 3e-5, 12, 3)
    assert train.student.view == "resize:300" and train.loss.kind == "kd"


def test_paper_pipeline_and_its_ablations_differ_only_in_their_keys():
    from ray_jobs.pipeline import PipelineConfig, plan_experiments, stage_configs

    configs = Path(__file__).resolve().parents[1] / "configs"
    paper = load_config(PipelineConfig, str(configs / "paper_ava.yaml"), [])
    extract, distill = stage_configs(paper)
    assert extract.backbones == ("paper_trio",) and set(extract.weights) == {
        "bit_m_r152x4", "ig_resnext101_32x48d", "swsl_resnext101_32x8d"}
    assert (distill.batch_size, distill.lr, distill.epochs, distill.lr_step_epochs) == (512, 3e-5, 12, 3)
    student = plan_experiments(paper, "knowledge-0")[0].config
    assert (student.batch_size, student.lr, student.epochs, student.lr_step_epochs) == (16, 3e-5, 12, 3)
    assert (student.student.backbone, student.student.view) == ("swsl_resnext101_32x8d", "resize:300")
    for path in sorted(configs.glob("paper_ava_*.yaml")):
        ablation = load_config(PipelineConfig, str(path), [])
        assert stage_configs(ablation) == (extract, distill), path.name  # same GSF and knowledge entries
        changed = {k for k in ("students", "losses", "seeds", "train", "splits")
                   if getattr(ablation, k) != getattr(paper, k)}
        assert changed, f"{path.name} changes nothing"
