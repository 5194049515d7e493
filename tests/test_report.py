"""The pipeline report: aggregates over seeds, the Table V/VIII markdown, comparisons, PNGs, files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ray_jobs.stages import report

CATEGORIES = (("Landscape", 30), ("Portraiture", 12), ("Animals", 7), ("Macro", 2))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GROUP = "tf_efficientnet_lite0@resize:128"


def make_run(rng, seed: int, srcc: float, emd: float, n_test: int = 40, epochs: int = 4) -> dict:
    gt = rng.uniform(2, 8, n_test)
    return {"seed": seed, "seconds": float(rng.uniform(60, 3000)), "reused": False,
            "metrics": {"srcc": srcc, "plcc": float(rng.uniform(0, 1)), "acc": float(rng.uniform(0.5, 1)),
                        "emd": emd},
            "gt_mean": gt.tolist(), "pred_mean": (gt + rng.normal(0, 1, n_test)).tolist(),
            "per_category": [{"name": name, "n": n, "portion": n / n_test,
                              "srcc": float(rng.uniform(-0.2, 0.8)) if n >= 3 else None,
                              "plcc": None, "acc": None, "emd": None} for name, n in CATEGORIES],
            "history": [{"epoch": e, "loss": float(rng.uniform(0.05, 0.2)), "val_srcc": float(rng.uniform(0, 0.6))}
                        for e in range(1, epochs + 1)]}


def make_student(rng, loss: str, srccs, emds) -> dict:
    return {"name": f"Student tf_efficientnet_lite0, {loss}", "role": "student", "loss": loss, "group": GROUP,
            "input": "128×128", "params": int(rng.integers(3_000_000, 5_000_000)),
            "flops": float(rng.uniform(1e8, 1e9)),
            "runs": [make_run(rng, seed, s, e) for seed, (s, e) in enumerate(zip(srccs, emds))]}


def make_results(kd_srccs=(0.30, 0.35, 0.32), baseline_srccs=(0.45, 0.41, 0.43),
                 kd_emds=(0.08, 0.081, 0.079), baseline_emds=(0.08, 0.079, 0.081), seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    teacher = {"name": "Teacher: distiller on tf_efficientnet_lite0+lite1+lite2 GSFs", "role": "teacher",
               "loss": None, "group": None, "input": "full res (median 652×489)", "params": 13_370_000,
               "flops": 2.5e9, "runs": [make_run(rng, 0, float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.05, 0.1)))]}
    teacher["runs"][0]["history"] = []
    return {"title": "Demo pipeline", "setup": {"dataset": "data/demo", "workers": "2"},
            "models": [teacher, make_student(rng, "kd", kd_srccs, kd_emds),
                       make_student(rng, "baseline", baseline_srccs, baseline_emds)],
            "notes": ["The demo dataset is synthetic."]}


def table_rows(table: str) -> list[list[str]]:
    """Cells of each markdown table line (header, separator, rows); ``\\|`` is an escaped pipe, not a border."""
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in table.splitlines()]


def independent_cell(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def test_summarize_matches_numpy():
    results = make_results()
    results["models"][1]["runs"][2]["metrics"]["emd"] = None  # skipped, not counted as zero
    for model in results["models"]:
        summary = report.summarize(model)
        assert summary["runs"] == len(model["runs"])
        assert summary["seconds"] == pytest.approx(np.mean([r["seconds"] for r in model["runs"]]))
        assert summary["reused"] is False
        for metric in report.METRICS:
            values = [r["metrics"][metric] for r in model["runs"] if r["metrics"][metric] is not None]
            stat = summary["metrics"][metric]
            assert stat["n"] == len(values)
            assert stat["mean"] == pytest.approx(np.mean(values))
            if len(values) > 1:
                assert stat["sd"] == pytest.approx(np.std(values, ddof=1))
            else:
                assert stat["sd"] is None


def test_summarize_reused_only_when_every_run_was():
    model = make_results()["models"][1]
    model["runs"][0]["reused"] = True
    assert report.summarize(model)["reused"] is False
    for run in model["runs"]:
        run["reused"] = True
    assert report.summarize(model)["reused"] is True


def test_results_table_shape_and_cells():
    results = make_results()
    results["models"][2]["runs"] = [{**r, "reused": True} for r in results["models"][2]["runs"]]
    results["models"][0]["runs"][0]["metrics"]["emd"] = None
    header, separator, *rows = table_rows(report.results_table(results))
    assert header == ["Model", "Input", "Params (M)", "GFLOPs", "SRCC", "PLCC", "Acc", "EMD", "Wall time"]
    assert separator == ["---"] * len(header)
    assert len(rows) == len(results["models"])
    for row, model in zip(rows, results["models"]):
        assert len(row) == len(header)
        cells = dict(zip(header, row))
        assert cells["Model"].startswith(model["name"])
        assert ("3 seeds" in cells["Model"]) == (len(model["runs"]) == 3)
        assert cells["Input"] == model["input"]
        assert cells["Params (M)"] == f"{model['params'] / 1e6:.2f}"
        assert cells["GFLOPs"] == f"{model['flops'] / 1e9:.2f}"
        for metric, column in (("srcc", "SRCC"), ("plcc", "PLCC"), ("acc", "Acc"), ("emd", "EMD")):
            assert cells[column] == independent_cell([r["metrics"][metric] for r in model["runs"]])
        seconds = round(np.mean([r["seconds"] for r in model["runs"]]))
        assert cells["Wall time"].startswith(f"{seconds // 60}m {seconds % 60:02d}s")
        assert cells["Wall time"].endswith("(reused)") == all(r["reused"] for r in model["runs"])
    assert dict(zip(header, rows[0]))["EMD"] == "–"


def test_results_table_survives_a_pipe_in_a_name():
    results = make_results()
    results["models"][0]["name"] = "teacher | ablation"
    header, _, *rows = table_rows(report.results_table(results))
    assert all(len(row) == len(header) for row in rows)


def srcc_and_emd_clauses(line: str) -> tuple[str, str]:
    srcc, emd = line.split(" EMD ")
    return srcc, emd


@pytest.mark.parametrize("kd_srccs, expected", [
    ((0.30, 0.35, 0.32), "worse"),                      # baseline 0.43 ± 0.02: diff −0.11
    ((0.52, 0.55, 0.56), "better"),                     # diff +0.11
    ((0.44, 0.40, 0.43), "no clear difference"),        # diff −0.01 < sd 0.02
    ((0.37, 0.39, 0.41), "worse"),                      # diff −0.04 > max sd 0.02: just outside
    ((0.40, 0.42, 0.44), "no clear difference"),        # diff −0.01, sd 0.02
])
def test_comparison_verdict_on_srcc(kd_srccs, expected):
    results = make_results(kd_srccs=kd_srccs, baseline_srccs=(0.41, 0.43, 0.45))
    [line] = report.comparison_lines(results)
    srcc, _ = srcc_and_emd_clauses(line)
    assert line.startswith("kd vs baseline") and GROUP in line and "3 seeds" in line
    assert expected in srcc
    for other in {"worse", "better", "no clear difference"} - {expected}:
        assert other not in srcc
    difference = np.mean(kd_srccs) - np.mean((0.41, 0.43, 0.45))
    assert f"{abs(difference):.3f}" in srcc
    assert independent_cell(kd_srccs) in srcc and independent_cell((0.41, 0.43, 0.45)) in srcc


def test_comparison_treats_lower_emd_as_better():
    lower = report.comparison_lines(make_results(kd_emds=(0.05, 0.051, 0.049), baseline_emds=(0.08, 0.081, 0.079)))
    higher = report.comparison_lines(make_results(kd_emds=(0.10, 0.101, 0.099), baseline_emds=(0.08, 0.081, 0.079)))
    assert "better" in srcc_and_emd_clauses(lower[0])[1]
    assert "worse" in srcc_and_emd_clauses(higher[0])[1]


def test_no_comparison_without_a_baseline():
    results = make_results()
    results["models"][2]["loss"] = "kd_ft"
    assert report.comparison_lines(results) == []


def check_png(path) -> None:
    import matplotlib.image

    with open(path, "rb") as file:
        assert file.read(8) == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 150 and pixels.shape[1] > 150
    assert pixels.std() > 0  # something was drawn


def test_write_report(tmp_path):
    results = make_results()
    out = tmp_path / "report"
    written = report.write_report(results, out)
    text = (out / "report.md").read_text()
    assert written["report"] == str(out / "report.md")
    assert written["table"] == report.results_table(results) and written["table"] in text
    assert text.startswith(f"# {results['title']}")
    assert json.loads((out / "results.json").read_text()) == results
    assert len(written["plots"]) == 3
    for path in written["plots"]:
        check_png(path)
        assert f"]({path.rsplit('/', 1)[-1]})" in text  # linked relative to report.md
    for line in report.comparison_lines(results) + results["notes"]:
        assert line in text
    for key, value in results["setup"].items():
        assert f"| {key} | {value} |" in text
    for name, _ in CATEGORIES:
        assert f"| {name} |" in text
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "results.json", "scatter.png", "categories.png", "training_curves.png",
         "paired.json"])  # no temp files; paired.json: kd vs baseline over 3 seeds


def test_category_table_means_over_seeds():
    results = make_results()
    header, _, *rows = table_rows(report.category_table(results))
    assert len(header) == 2 + len(results["models"])
    by_name = {row[0]: row for row in rows}
    assert list(by_name) == [name for name, _ in CATEGORIES]  # largest first
    for name, n in CATEGORIES:
        assert by_name[name][1] == str(n)
        for cell, model in zip(by_name[name][2:], results["models"]):
            srccs = [row["srcc"] for run in model["runs"] for row in run["per_category"] if row["name"] == name]
            assert cell == independent_cell(srccs)
    assert set(by_name["Macro"][2:]) == {"–"}  # n < 3: no SRCC


def test_models_without_history_predictions_or_metrics(tmp_path):
    results = make_results()
    bare = {"seed": 0, "seconds": 0.4, "reused": True,
            "metrics": {"srcc": None, "plcc": None, "acc": None, "emd": None},
            "gt_mean": [], "pred_mean": [], "per_category": [], "history": []}
    results["models"].append({"name": "Student lite0, binary", "role": "student", "loss": "binary", "group": "other",
                              "input": "224×224", "params": 3_400_000, "flops": 4e8, "runs": [bare]})
    written = report.write_report(results, tmp_path)
    _, _, *rows = table_rows(written["table"])
    assert rows[-1][4:8] == ["–"] * 4
    for path in written["plots"]:
        check_png(path)

    for model in results["models"]:
        model["runs"] = [bare]
    written = report.write_report(results, tmp_path / "bare")  # every plot falls back to a message
    for path in written["plots"]:
        check_png(path)


def test_numpy_values_are_stored_as_plain_json():
    values = {"gt_mean": np.array([5.5, 6.25]), "srcc": np.float32(0.5), "params": np.int64(7)}
    assert json.loads(json.dumps(values, default=report.plain)) == {"gt_mean": [5.5, 6.25], "srcc": 0.5, "params": 7}
    with pytest.raises(TypeError, match="set"):
        json.dumps({"x": {1}}, default=report.plain)


# ---------------------------------------------------------------- Fig. 6 and Fig. 7

SPLITS = ("cv:3:0:0", "cv:3:1:0", "cv:3:2:0")
FIGURE_METRICS = ("srcc", "plcc", "acc")


def signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "\u2212")


def split_student(rng, backbone: str, loss: str, split: str, n_seeds: int) -> dict:
    runs = [{"seed": seed, "seconds": 10.0, "reused": False,
             "metrics": {"srcc": float(rng.uniform(0.2, 0.7)), "plcc": float(rng.uniform(0.2, 0.7)),
                         "acc": float(rng.uniform(0.6, 0.8)), "emd": float(rng.uniform(0.05, 0.1))},
             "gt_mean": [], "pred_mean": [], "per_category": [], "history": []} for seed in range(n_seeds)]
    return {"name": f"Student {backbone}, {loss} [{split}]", "role": "student", "loss": loss,
            "group": f"{backbone}@resize:64 [{split}]", "split": split, "input": "64×64",
            "params": 3_000_000, "flops": 1e8, "runs": runs}


def make_split_results(seed: int = 1, n_seeds: int = 2, splits=SPLITS) -> dict:
    """Two students × (kd, baseline) on every split; the teacher row as the pipeline writes it."""
    rng = np.random.default_rng(seed)
    results = make_results(seed=seed)
    results["models"] = [results["models"][0]] + [
        split_student(rng, backbone, loss, split, n_seeds)
        for backbone in ("lite0", "lite1") for split in splits for loss in ("kd", "baseline")]
    return results


def make_teacher_seeds(rng, n: int) -> list[dict]:
    return [{"seed": seed, "split": "official", "entry": f"knowledge-{seed:04d}", "reused": seed % 2 == 0,
             "metrics": {"n": 40, "srcc": float(rng.uniform(0.6, 0.62)), "plcc": float(rng.uniform(0.6, 0.62)),
                         "acc": float(rng.uniform(0.7, 0.72)), "emd": float(rng.uniform(0.05, 0.06))}}
            for seed in range(n)]


def section(text: str, heading: str) -> str:
    """The markdown between ``## heading`` and the next ``## ``."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def section_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of ``text`` as its rows of cells (header first, separator dropped)."""
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    return [[row for i, row in enumerate(table_rows(block)) if i != 1] for block in tables]


def run_metric(model: dict, metric: str) -> list[float]:
    return [run["metrics"][metric] for run in model["runs"]]


def test_fig6_per_split_gains_bars_and_range(tmp_path):
    results = make_split_results()
    by_key = {(m["group"].split(" [")[0], m["loss"], m["split"]): m for m in results["models"] if m["role"] == "student"}
    written = report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert str(tmp_path / "splits.png") in written["plots"] and "](splits.png)" in text
    check_png(tmp_path / "splits.png")

    [table] = section_tables(section(text, "KD vs baseline per split (Fig. 6)"))
    header, *rows = table
    assert header == ["Student", "Loss", "Split", "SRCC", "Baseline SRCC", "SRCC gain", "PLCC gain", "Acc gain"]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (student, "kd", split) for student in ("lite0@resize:64", "lite1@resize:64") for split in SPLITS)
    for student, loss, split, srcc, baseline_srcc, *gains in rows:
        kd, baseline = by_key[(student, loss, split)], by_key[(student, "baseline", split)]
        assert srcc == independent_cell(run_metric(kd, "srcc"))
        assert baseline_srcc == independent_cell(run_metric(baseline, "srcc"))
        assert gains == [signed(np.mean(run_metric(kd, m)) - np.mean(run_metric(baseline, m))) for m in FIGURE_METRICS]

    for student in ("lite0@resize:64", "lite1@resize:64"):
        srcc = [np.mean(run_metric(by_key[(student, "kd", s)], "srcc"))
                - np.mean(run_metric(by_key[(student, "baseline", s)], "srcc")) for s in SPLITS]
        [line] = [line for line in text.splitlines() if f"kd vs baseline ({student}) over 3 splits" in line]
        assert f"from {signed(min(srcc))} to {signed(max(srcc))} (mean {signed(np.mean(srcc))})" in line
        assert f"positive on {sum(g > 0 for g in srcc)} of 3" in line
        for metric, label in (("plcc", "PLCC"), ("acc", "Acc")):
            gains = [np.mean(run_metric(by_key[(student, "kd", s)], metric))
                     - np.mean(run_metric(by_key[(student, "baseline", s)], metric)) for s in SPLITS]
            assert f"{label} from {signed(min(gains))} to {signed(max(gains))}." in line

    # the sidecar holds exactly the bars drawn: per student, per loss, SRCC mean and sd per split
    bars = json.loads((tmp_path / "splits.json").read_text())
    assert [b["student"] for b in bars] == ["lite0@resize:64", "lite1@resize:64"]
    for student in bars:
        assert student["splits"] == list(SPLITS)
        assert [series["loss"] for series in student["bars"]] == ["baseline", "kd"]
        for series in student["bars"]:
            models = [by_key[(student["student"], series["loss"], s)] for s in SPLITS]
            assert series["mean"] == pytest.approx([np.mean(run_metric(m, "srcc")) for m in models])
            assert series["sd"] == pytest.approx([np.std(run_metric(m, "srcc"), ddof=1) for m in models])


def test_fig6_with_one_seed_has_no_spread_and_one_split_has_no_figure(tmp_path):
    results = make_split_results(n_seeds=1, splits=SPLITS[:2])
    report.write_report(results, tmp_path / "two")
    for student in json.loads((tmp_path / "two" / "splits.json").read_text()):
        assert all(series["sd"] == [None, None] for series in student["bars"])
    check_png(tmp_path / "two" / "splits.png")

    single = make_split_results(splits=SPLITS[:1])  # the pipeline's one-split run: a split, no figure
    written = report.write_report(single, tmp_path / "one")
    text = (tmp_path / "one" / "report.md").read_text()
    assert len(written["plots"]) == 3 and "Fig. 6" not in text and "over 1 splits" not in text
    assert not (tmp_path / "one" / "splits.png").exists() and not (tmp_path / "one" / "splits.json").exists()


def test_fig7_teacher_seed_box_plots_and_ranges(tmp_path):
    rng = np.random.default_rng(7)
    results = make_results()
    results["teacher_seeds"] = make_teacher_seeds(rng, 5)
    written = report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert str(tmp_path / "teacher_seeds.png") in written["plots"] and "](teacher_seeds.png)" in text
    check_png(tmp_path / "teacher_seeds.png")
    assert "Fig. 6" not in text  # one split: no per-split section

    ranges, fits = section_tables(section(text, "Teacher over training seeds (Fig. 7)"))
    assert ranges[0] == ["Metric", "Seeds", "Min", "Max", "Range", "Mean ± sd"]
    assert [row[0] for row in ranges[1:]] == ["SRCC", "PLCC", "Acc", "EMD"]
    for row, metric in zip(ranges[1:], ("srcc", "plcc", "acc", "emd")):
        values = np.array([fit["metrics"][metric] for fit in results["teacher_seeds"]])
        assert row[1:] == ["5", f"{values.min():.3f}", f"{values.max():.3f}", f"{values.max() - values.min():.3f}",
                           independent_cell(values.tolist())]
    assert [row[0] for row in fits[1:]] == ["0", "1", "2", "3", "4"]
    for row, fit in zip(fits[1:], results["teacher_seeds"]):
        assert row[1:5] == [f"{fit['metrics'][m]:.3f}" for m in ("srcc", "plcc", "acc", "emd")]
        assert row[5] == f"`{fit['entry']}`" + (" (reused)" if fit["reused"] else "")
    drawn = json.loads((tmp_path / "teacher_seeds.json").read_text())
    assert drawn == {m: [fit["metrics"][m] for fit in results["teacher_seeds"]] for m in FIGURE_METRICS}


def test_fig7_without_a_metric_and_against_the_split_gains(tmp_path):
    rng = np.random.default_rng(3)
    results = make_split_results()
    results["teacher_seeds"] = make_teacher_seeds(rng, 4)
    for fit in results["teacher_seeds"]:  # a binary-label teacher scores accuracy only
        fit["metrics"] = {"n": 40, "acc": fit["metrics"]["acc"]}
    report.write_report(results, tmp_path / "acc")
    text = (tmp_path / "acc" / "report.md").read_text()
    ranges, _ = section_tables(section(text, "Teacher over training seeds (Fig. 7)"))
    assert [row[0] for row in ranges[1:]] == ["Acc"]
    assert json.loads((tmp_path / "acc" / "teacher_seeds.json").read_text())["srcc"] == []
    check_png(tmp_path / "acc" / "teacher_seeds.png")
    assert "varies by" not in text  # no SRCC range to hold the gains against

    results["teacher_seeds"] = make_teacher_seeds(rng, 4)
    report.write_report(results, tmp_path / "all")
    text = (tmp_path / "all" / "report.md").read_text()
    srcc = [fit["metrics"]["srcc"] for fit in results["teacher_seeds"]]
    spread = max(srcc) - min(srcc)
    students = {(m["group"], m["loss"]): m for m in results["models"] if m["role"] == "student"}
    gains = [np.mean(run_metric(m, "srcc")) - np.mean(run_metric(students[(group, "baseline")], "srcc"))
             for (group, loss), m in students.items() if loss == "kd"]
    assert (f"The teacher's SRCC varies by {spread:.3f} over 4 training seeds; "
            f"{sum(g > spread for g in gains)} of {len(gains)} per-split SRCC improvements exceed that.") in text


def test_paired_comparison_pairs_each_seed_with_its_baseline_over_splits(tmp_path):
    from scipy.stats import binomtest

    results = make_split_results(seed=3, n_seeds=4)
    report.write_report(results, tmp_path)
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert [(row["student"], row["loss"], row["splits"]) for row in paired] == \
        [("lite0@resize:64", "kd", len(SPLITS)), ("lite1@resize:64", "kd", len(SPLITS))]
    models = {(m["group"], m["loss"]): m for m in results["models"] if m["role"] == "student"}
    for row in paired:
        for metric, stat in row["metrics"].items():
            differences, seed_sds = [], []
            for split in SPLITS:
                kd, base = (models[(f"{row['student']} [{split}]", loss)] for loss in ("kd", "baseline"))
                a, b = np.array(run_metric(kd, metric)), np.array(run_metric(base, metric))  # seeds 0..3 in order
                differences += list(a - b)
                seed_sds.append(max(a.std(ddof=1), b.std(ddof=1)))
            differences = np.array(differences)
            gains = differences * (-1 if metric == "emd" else 1)  # EMD: lower is better
            better, worse = int((gains > 0).sum()), int((gains < 0).sum())
            assert stat["pairs"] == 4 * len(SPLITS) and (stat["better"], stat["worse"]) == (better, worse)
            assert stat["mean"] == pytest.approx(differences.mean())
            assert stat["sd"] == pytest.approx(differences.std(ddof=1))
            assert stat["p"] == pytest.approx(binomtest(better, better + worse).pvalue)
            assert stat["seed_sd"] == pytest.approx(np.mean(seed_sds))
            assert stat["exceeds_seed_sd"] == (abs(differences.mean()) > np.mean(seed_sds))
    text = (tmp_path / "report.md").read_text()
    [table] = section_tables(section(text, "Paired comparison over splits × seeds"))
    header, *rows = table
    assert header[:4] == ["Student", "Loss", "Metric", "Pairs (splits × seeds)"]
    assert len(rows) == 2 * 4 and rows[0][3] == f"{4 * len(SPLITS)} ({len(SPLITS)} × 4)"
    assert report.sign_test_p(0, 0) == 1.0 and report.sign_test_p(10, 0) == pytest.approx(2 / 2 ** 10)
