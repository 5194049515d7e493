"""Job configs: YAML + dotted overrides, strict keys, typed values, one clear error."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from ray_jobs.config import ConfigError, describe_keys, load_config, option, run_job


@dataclass(frozen=True)
class Inner:
    path: str = option(help="where")
    fraction: float | None = option(None, help="a share")


@dataclass(frozen=True)
class Outer:
    inner: Inner
    names: tuple[str, ...] = option(("a",), help="some names")
    weights: str | dict[str, str] = option("hub", help="one or per name")
    count: int = option(1, help="how many")
    flag: bool = option(False, help="on/off")


def test_yaml_file_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  path: /data\ncount: 3\nnames: [x, y]\n")
    cfg = load_config(Outer, str(path), ["inner.fraction=0.25", "flag=true", "weights.resnet18=random:0"])
    assert cfg == Outer(Inner("/data", 0.25), ("x", "y"), {"resnet18": "random:0"}, 3, True)
    assert load_config(Outer, str(path), ["names=z"]).names == ("z",)
    assert load_config(Outer, str(path), ["inner.fraction=1"]).inner.fraction == 1.0


@pytest.mark.parametrize("overrides, message", [
    (["inner.pth=/x"], "unknown config key 'inner.pth'"),
    (["cuont=2"], "unknown config key 'cuont'"),
    (["inner.path=/d", "count=many"], "config key 'count': expected int"),
    (["inner.path=/d", "count=true"], "config key 'count': expected int"),
    (["inner=3"], "must be a mapping"),
    (["novalue"], "must look like key=value"),
    ([], "missing required config key 'inner.path'"),
])
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(Outer, None, overrides)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "absent.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, str(bad), [])


def test_base_file_is_overlaid_section_by_section(tmp_path):
    (tmp_path / "base.yaml").write_text("inner:\n  path: /data\n  fraction: 0.5\nnames: [x, y]\ncount: 3\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../base.yaml\ninner:\n  fraction: 0.25\nnames: [z]\n")
    cfg = load_config(Outer, str(child), ["count=4"])
    assert cfg == Outer(Inner("/data", 0.25), ("z",), "hub", 4, False)  # merged, list replaced, override last
    grandchild = tmp_path / "sub" / "grandchild.yaml"
    grandchild.write_text("base: child.yaml\nflag: true\n")
    assert load_config(Outer, str(grandchild), []) == Outer(Inner("/data", 0.25), ("z",), "hub", 3, True)


def test_base_errors_name_the_file(tmp_path):
    loop_a, loop_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    loop_a.write_text("base: b.yaml\n")
    loop_b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load_config(Outer, str(loop_a), [])
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("base: missing.yaml\ninner: {path: /d}\n")
    with pytest.raises(ConfigError, match="missing.yaml' not found"):
        load_config(Outer, str(orphan), [])


def test_base_keys_take_moved_sections_of_another_file(tmp_path):
    (tmp_path / "pipeline.yaml").write_text(
        "root: /data\nstage: {count: 7, weights: packaged}\nitems: [{fraction: 0.1}, {fraction: 0.9}]\nother: 1\n")
    job = tmp_path / "job.yaml"
    job.write_text("base: pipeline.yaml\nbase_keys: {inner.path: root, inner.fraction: 'items[1].fraction', "
                   "'.': stage}\nflag: true\n")
    # `other` is not taken (Outer would refuse it); the section lands at the top; own keys win
    assert load_config(Outer, str(job), ["count=8"]) == Outer(Inner("/data", 0.9), ("a",), "packaged", 8, True)
    for mapping, message in (("{count: nowhere}", "has no 'nowhere'"), ("{count: 'items[5]'}", "has no 'items\\[5\\]'"),
                             ("{'.': root}", "not a section"), ("[root]", "must map target keys")):
        job.write_text(f"base: pipeline.yaml\nbase_keys: {mapping}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(Outer, str(job), [])
    job.write_text("base_keys: {count: other}\n")
    with pytest.raises(ConfigError, match="needs a base file"):
        load_config(Outer, str(job), [])


def test_help_lists_every_key_with_default():
    text = "\n".join(describe_keys(Outer))
    for key in ("inner.path", "inner.fraction", "names", "weights", "count", "flag"):
        assert key in text
    assert "(required)" in text and '["a"]' in text


def test_run_job_prints_result_last_and_exits_2_on_user_error(capsys):
    assert run_job("t", Outer, lambda cfg: {"count": cfg.count}, argv=["inner.path=/d", "count=4"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == '{"count": 4}'
    assert run_job("t", Outer, lambda cfg: {}, argv=["count=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: missing required config key 'inner.path'") and "Traceback" not in err


def test_run_job_catches_every_user_error_and_keeps_tracebacks_for_bugs(capsys):
    from featurestore.datasets import DatasetError
    from featurestore.errors import UserError
    from featurestore.reader import CorruptEntry

    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)

    def fails(error):
        def main(cfg):
            raise error
        return main

    argv = ["inner.path=/d"]
    assert run_job("t", Outer, fails(DatasetError("AVA.txt line 3: 9 vote counts")), argv=argv) == 2
    assert capsys.readouterr().err == "error: AVA.txt line 3: 9 vote counts\n"
    corrupt = CorruptEntry("/s", "gsf-1", "gsf", 2, "object missing")
    assert run_job("t", Outer, fails(corrupt), argv=argv) == 2
    assert capsys.readouterr().err.startswith("error: store /s: entry gsf-1: array 'gsf' shard 2: object missing.")
    with pytest.raises(KeyError):  # a bug: not caught, so Python prints its traceback
        run_job("t", Outer, fails(KeyError("bug")), argv=argv)


def test_check_prints_the_plan_and_runs_nothing(capsys):
    ran = []

    def main(cfg):
        ran.append(cfg)
        return {"ran": True}

    def check(cfg):
        return {"would_count": cfg.count}

    assert run_job("t", Outer, main, check=check, argv=["--check", "inner.path=/d", "count=3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"would_count": 3} and not ran
    assert run_job("t", Outer, main, check=check, argv=["--check", "count=3"]) == 2  # the config is still checked
    assert "inner.path" in capsys.readouterr().err and not ran
    with pytest.raises(SystemExit):  # a job without a plan has no --check
        run_job("t", Outer, main, argv=["--check", "inner.path=/d"])


def test_verbose_is_a_flag_of_every_job_not_a_config_key(capsys, monkeypatch):
    import os

    from ray_jobs.runtime import VERBOSE_ENV, verbose

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not verbose()
    seen = {}

    def main(cfg):
        seen["verbose"] = verbose()
        return {"count": cfg.count}

    assert run_job("t", Outer, main, argv=["inner.path=/d", "--verbose", "count=2"]) == 0
    assert seen["verbose"] and os.environ[VERBOSE_ENV] == "1"
    assert capsys.readouterr().out.strip().splitlines()[-1] == '{"count": 2}'
    monkeypatch.delenv(VERBOSE_ENV)
    assert run_job("t", Outer, main, argv=["inner.path=/d", "verbose=true"]) == 2
    assert "unknown config key 'verbose'" in capsys.readouterr().err
    monkeypatch.setenv(VERBOSE_ENV, "1")
    assert run_job("t", Outer, main, argv=["inner.path=/d"]) == 0 and seen["verbose"]
