"""Every shipped config parses with its job's config class (strict keys, typed values).

Job configs are named after their job (``extract_*.yaml``…); the others are pipeline configs,
whose stage sections are checked with the stage jobs' classes too.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from ray_jobs.config import as_dict, load_config

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
    if path.name.startswith("explain_"):
        from ray_jobs.explain import ExplainConfig

        return ExplainConfig
    from ray_jobs.pipeline import PipelineConfig

    return PipelineConfig


def yaml_tree(path: Path) -> dict:
    """The keys a config file says, with its ``base:`` chain resolved here, independently of the
    loader: a file is laid over its base (sections merged key by key, lists and values replaced),
    of which ``base_keys`` ({target: source path}) takes only some keys, possibly moved."""
    tree = yaml.safe_load(path.read_text()) or {}
    if "base" not in tree:
        return tree
    base = yaml_tree(path.parent / tree.pop("base"))
    if "base_keys" in tree:
        picked: dict = {}
        for target, source in tree.pop("base_keys").items():
            value = base
            for part in re.findall(r"\[(\d+)\]|([^.\[\]]+)", source):
                value = value[int(part[0])] if part[0] else value[part[1]]
            if target == ".":
                picked = overlay(picked, value)
            else:
                *sections, last = target.split(".")
                node = picked
                for section in sections:
                    node = node.setdefault(section, {})
                node[last] = value
        base = picked
    return overlay(base, tree)


def overlay(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = overlay(base[key], value) if both else value
    return merged


def plain(value):
    """Tuples as lists (YAML has only lists), everything else as it is."""
    return json.loads(json.dumps(value))


def assert_says(config, tree: dict, where: str = "") -> None:
    """Every key of ``config`` holds what ``tree`` (the YAML) gives it, or its default when the
    YAML does not name it; a YAML key the config does not hold is an error already at load."""
    assert isinstance(tree, dict), where
    for f in dataclasses.fields(config):
        key, value = where + f.name, getattr(config, f.name)
        if f.name not in tree:
            if f.default is not dataclasses.MISSING:
                assert value == f.default, key
            elif f.default_factory is not dataclasses.MISSING:
                assert value == f.default_factory(), key
            else:  # a required section the file leaves out: all its keys at their defaults
                assert dataclasses.is_dataclass(value), key
                assert_says(value, {}, key + ".")
        elif dataclasses.is_dataclass(value):
            assert_says(value, tree[f.name], key + ".")
        elif isinstance(value, tuple) and any(dataclasses.is_dataclass(v) for v in value):
            assert len(value) == len(tree[f.name]), key
            for i, (v, t) in enumerate(zip(value, tree[f.name])):
                if dataclasses.is_dataclass(v):
                    assert_says(v, t, f"{key}[{i}].")
                else:
                    assert v == t, f"{key}[{i}]"
        else:
            assert plain(value) == plain(tree[f.name]) and type(plain(value)) is type(plain(tree[f.name])) \
                or (isinstance(value, float) and value == tree[f.name]), key  # YAML 1 is a float key's 1.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, tmp_path):
    cls = job_config_class(path)
    config = load_config(cls, str(path), [])
    assert type(config) is cls
    assert_says(config, yaml_tree(path))
    # the values written back as YAML load as the same config
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(as_dict(config)))
    assert load_config(cls, str(tmp_path / "again.yaml"), []) == config
    # and an override wins over the file, nothing else changes
    key, value = ("store", "s3://elsewhere/store") if hasattr(config, "store") else ("out", "elsewhere")
    changed = load_config(cls, str(path), [f"{key}={value}"])
    assert changed == dataclasses.replace(config, **{key: value})
    from ray_jobs.pipeline import PipelineConfig

    if isinstance(config, PipelineConfig):
        from ray_jobs.stages.pipeline import plan_experiments, stage_configs

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
    assert (train.global_batch_size, train.lr, train.epochs, train.lr_step_epochs) == (16, 3e-5, 12, 3)
    assert train.student.view == "resize:300" and train.loss.kind == "kd"


def test_paper_pipeline_and_its_ablations_differ_only_in_their_keys():
    from ray_jobs.stages.pipeline import PipelineConfig, plan_experiments, stage_configs

    configs = Path(__file__).resolve().parents[1] / "configs"
    paper = load_config(PipelineConfig, str(configs / "paper_ava.yaml"), [])
    extract, distill = stage_configs(paper)
    assert extract.backbones == ("paper_trio",) and set(extract.weights) == {
        "bit_m_r152x4", "ig_resnext101_32x48d", "swsl_resnext101_32x8d"}
    assert (distill.batch_size, distill.lr, distill.epochs, distill.lr_step_epochs) == (512, 3e-5, 12, 3)
    student = plan_experiments(paper, "knowledge-0")[0].config
    assert (student.global_batch_size, student.lr, student.epochs, student.lr_step_epochs) == (16, 3e-5, 12, 3)
    assert (student.student.backbone, student.student.view) == ("swsl_resnext101_32x8d", "resize:300")
    for path in sorted(configs.glob("paper_ava_*.yaml")):
        ablation = load_config(PipelineConfig, str(path), [])
        assert stage_configs(ablation) == (extract, distill), path.name  # same GSF and knowledge entries
        changed = {k for k in ("students", "losses", "seeds", "train", "splits", "teacher_seeds")
                   if getattr(ablation, k) != getattr(paper, k)}
        assert changed, f"{path.name} changes nothing"
