"""Render the end-to-end pipeline's results as a report: markdown tables, honest comparisons, PNGs.

Why a module of its own: the pipeline spends minutes (demo) to days (AVA) extracting,
distilling and training; what a reader needs at the end is the paper's Table V/VIII for *these* runs (model, input, params,
FLOPs, SRCC, PLCC, Acc, EMD), whether knowledge distillation beat the baseline by more than
seed-to-seed noise, and a few pictures that show *why* (predicted vs ground-truth scores, SRCC
per semantic category, training curves). Keeping rendering pure — a JSON-able ``results`` dict
in, files out, no torch, no Ray — lets it be tested in milliseconds and re-run on a saved
``results.json`` without re-training anything.

``results`` (built by the pipeline)::

    {"title": str, "setup": {str: str}, "notes": [markdown paragraph, ...],
     "models": [{"name", "role": "teacher" | "student", "loss": str | None, "group": str | None,
                 "split": str | None,   # the split the model was trained and scored on
                 "input": str, "params": int, "flops": float (one image; one multiply-add = one FLOP),
                 "runs": [{"seed", "seconds", "reused",
                           "metrics": {"srcc", "plcc", "acc", "emd"} (float | None),
                           "gt_mean": [...], "pred_mean": [...],   # test split, 1..10 scale
                           "per_category": [{"name", "n", "portion", "srcc", ...}, ...],
                           "history": [{"epoch", "loss", "val_srcc" (optional)}, ...]}, ...]},
                ...],
     "teacher_seeds": [{"seed", "split", "entry", "reused",            # optional (Fig. 7): the
                        "metrics": {"srcc", "plcc", "acc", "emd"}}]}  # distiller refitted per seed

Across a model's runs (one per seed) every metric is reported as mean ± sample sd (ddof = 1).
A loss is called better or worse than the baseline only when the difference of means exceeds
the larger of the two seed spreads; anything smaller is reported as no clear difference.

Two of the paper's figures appear when the results hold what they need. Fig. 6 (students in a
group named ``"<student> [<split>]"``, on two or more splits): per split, each loss's SRCC next
to its student's baseline, the gains in a table and the range of the gain over splits in words.
Fig. 7 (``teacher_seeds``): the teacher's test metrics over distiller seeds as box plots and
their min, max and range: the variation that training randomness alone causes, which an
improvement must exceed to mean anything. Each of these PNGs has a JSON sidecar of the numbers it
draws, so the figure can be checked or redrawn without reading pixels. With several seeds, the
paired comparison pools each seed's difference to its baseline over splits × seeds (paired.json).

Plots use matplotlib's ``Figure`` with the Agg canvas directly (never pyplot), so rendering is
headless, leaves no global figure state behind, and matplotlib is imported only when plotting.
Every file is written to a temporary name and moved into place, so a crash never leaves a
half-written report.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import textwrap
from collections.abc import Iterable
from pathlib import Path

from featurestore.files import atomic_write_bytes

METRICS = ("srcc", "plcc", "acc", "emd")
METRIC_LABELS = {"srcc": "SRCC", "plcc": "PLCC", "acc": "Acc", "emd": "EMD"}
TABLE_COLUMNS = ("Model", "Input", "Params (M)", "GFLOPs", "SRCC", "PLCC", "Acc", "EMD", "Wall time")
MISSING = "–"
MINUS = "−"
SCATTER_PNG = "scatter.png"
CATEGORIES_PNG = "categories.png"
TRAINING_CURVES_PNG = "training_curves.png"
SPLITS_PNG = "splits.png"
TEACHER_SEEDS_PNG = "teacher_seeds.png"
PAIRED_JSON = "paired.json"
#: the metrics of the paper's Figs. 6 and 7 (its ranges are given for these three)
FIGURE_METRICS = ("srcc", "plcc", "acc")
SEED_LINESTYLES = ("-", "--", ":", "-.")


# ---------------------------------------------------------------- numbers


def mean_sd(values: Iterable[float | None]) -> dict:
    """``{"mean", "sd", "n"}`` of the values that are not None; sd is the sample sd (ddof = 1).

    mean is None without values, sd None with fewer than two.
    """
    present = [float(v) for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "sd": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present)}


def summarize(model: dict) -> dict:
    """One model's runs in aggregate: ``{"runs", "seconds", "reused", "metrics": {m: mean_sd}}``.

    ``seconds`` is the mean wall time per run; ``reused`` is True only when every run was reused.
    """
    runs = model["runs"]
    if not runs:
        raise ValueError(f"model {model['name']!r} has no runs")
    return {"runs": len(runs),
            "seconds": statistics.fmean(float(run["seconds"]) for run in runs),
            "reused": all(run["reused"] for run in runs),
            "metrics": {m: mean_sd(run["metrics"].get(m) for run in runs) for m in METRICS}}


def format_stat(stat: dict) -> str:
    """``0.512 ± 0.031`` (several values), ``0.512`` (one) or ``–`` (none)."""
    if stat["mean"] is None:
        return MISSING
    if stat["sd"] is None:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def format_signed(x: float) -> str:
    """``+0.012`` / ``−0.070`` with a typographic minus."""
    return f"{x:+.3f}".replace("-", MINUS)


def format_seconds(seconds: float) -> str:
    """``4.2s`` below ten seconds, ``42s``, ``1m 23s``, ``2h 05m``."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def format_scaled(value: float | None, scale: float) -> str:
    """``value / scale`` with two decimals, ``–`` when unknown (params in M, FLOPs in G)."""
    return MISSING if value is None else f"{value / scale:.2f}"


def display_name(model: dict) -> str:
    """The model's name, with ``(3 seeds)`` when it has several runs."""
    runs = len(model["runs"])
    return f"{model['name']} ({runs} seeds)" if runs > 1 else model["name"]


# ---------------------------------------------------------------- markdown


def markdown_cell(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = [markdown_cell(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_row(model: dict) -> list[str]:
    summary = summarize(model)
    wall = format_seconds(summary["seconds"]) + (" (reused)" if summary["reused"] else "")
    return [display_name(model), model["input"], format_scaled(model.get("params"), 1e6),
            format_scaled(model.get("flops"), 1e9),
            *(format_stat(summary["metrics"][m]) for m in METRICS), wall]


def results_table(results: dict) -> str:
    """The paper's Table V/VIII for these runs, one row per model (mean ± sample sd over seeds)."""
    return markdown_table(TABLE_COLUMNS, (results_row(model) for model in results["models"]))


def setup_table(setup: dict) -> str:
    return markdown_table(("Setup", "Value"), ((key, value) for key, value in setup.items()))


# ---------------------------------------------------------------- comparisons


def verdict(loss: str, difference: float, spread: float | None, higher_is_better: bool) -> str:
    """Better / worse only when |difference of means| exceeds the larger seed sd ``spread``."""
    if spread is not None and abs(difference) <= spread:
        return "within the seed spread — no clear difference"
    if difference == 0:
        return "no difference"
    better = (difference > 0) == higher_is_better
    if spread is None:
        return f"{loss} is {'better' if better else 'worse'} in this single run (seed spread unknown)"
    return f"{loss} is {'better' if better else 'worse'} here"


def metric_comparison(metric: str, loss: str, candidate: dict, baseline: dict) -> str | None:
    """``SRCC a vs b, a difference of d; <verdict>.`` or None when either mean is missing."""
    a, b = candidate["metrics"][metric], baseline["metrics"][metric]
    if a["mean"] is None or b["mean"] is None:
        return None
    difference = a["mean"] - b["mean"]
    spreads = [sd for sd in (a["sd"], b["sd"]) if sd is not None]
    higher_is_better = metric != "emd"
    label = METRIC_LABELS[metric] + ("" if higher_is_better else " (lower is better)")
    return (f"{label} {format_stat(a)} vs {format_stat(b)}, a difference of {format_signed(difference)}; "
            f"{verdict(loss, difference, max(spreads) if spreads else None, higher_is_better)}.")


def seeds_phrase(candidate: dict, baseline: dict) -> str:
    a, b = candidate["runs"], baseline["runs"]
    if a == b:
        return f"{a} seed" + ("s" if a > 1 else "")
    return f"{a} vs {b} seeds"


def loss_pairs(results: dict) -> list[tuple[str, dict, dict]]:
    """``(group, model, baseline)`` for every student loss other than the baseline whose group has
    a baseline: the pairs every KD-vs-baseline comparison of the report is made of."""
    groups: dict[str, list[dict]] = {}
    for model in results["models"]:
        if model["role"] == "student" and model.get("group") is not None:
            groups.setdefault(model["group"], []).append(model)
    pairs = []
    for group, models in groups.items():
        baseline = next((m for m in models if m.get("loss") == "baseline"), None)
        if baseline is not None:
            pairs += [(group, m, baseline) for m in models if m.get("loss") not in (None, "baseline")]
    return pairs


def comparison_lines(results: dict) -> list[str]:
    """One sentence per non-baseline loss of every student group that has a baseline: SRCC and EMD;
    then, with several splits, the range of the improvement over them."""
    lines = []
    for group, model, baseline in loss_pairs(results):
        loss = model["loss"]
        summary, baseline_summary = summarize(model), summarize(baseline)
        clauses = [c for m in ("srcc", "emd") if (c := metric_comparison(m, loss, summary, baseline_summary))]
        lines.append(f"{loss} vs baseline ({group}, {seeds_phrase(summary, baseline_summary)}): "
                     + (" ".join(clauses) if clauses else "no metric is available for both."))
    return lines + split_range_lines(split_comparisons(results))


def split_comparisons(results: dict) -> list[dict]:
    """Fig. 6's numbers: one ``{"student", "loss", "split", "metrics": {m: {"loss", "baseline":
    mean_sd, "gain": difference of means or None}}}`` per non-baseline loss of a student on a split.
    ``student`` is the group's name without its `` [split]`` suffix, so it is the same on every split."""
    rows = []
    for group, model, baseline in loss_pairs(results):
        split = model.get("split")
        if split is None:
            continue
        ours, theirs = summarize(model)["metrics"], summarize(baseline)["metrics"]
        metrics = {}
        for m in FIGURE_METRICS:
            a, b = ours[m]["mean"], theirs[m]["mean"]
            metrics[m] = {"loss": ours[m], "baseline": theirs[m], "gain": None if a is None or b is None else a - b}
        rows.append({"student": group.removesuffix(f" [{split}]"), "loss": model["loss"], "split": split,
                     "metrics": metrics})
    return rows


def compared_splits(comparisons: list[dict]) -> list[str]:
    """The splits of these comparisons, in order of appearance."""
    return list(dict.fromkeys(row["split"] for row in comparisons))


def split_range_lines(comparisons: list[dict]) -> list[str]:
    """Fig. 6 in words: per student and loss on two or more splits, the range of the SRCC
    improvement and on how many splits it is positive, then PLCC's and Acc's ranges."""
    by_pair: dict[tuple[str, str], list[dict]] = {}
    for row in comparisons:
        if row["metrics"]["srcc"]["gain"] is not None:
            by_pair.setdefault((row["student"], row["loss"]), []).append(row)
    lines = []
    for (student, loss), rows in by_pair.items():
        if len(rows) < 2:
            continue
        srcc = [row["metrics"]["srcc"]["gain"] for row in rows]
        line = (f"{loss} vs baseline ({student}) over {len(rows)} splits: SRCC improvement from "
                f"{format_signed(min(srcc))} to {format_signed(max(srcc))} "
                f"(mean {format_signed(sum(srcc) / len(srcc))}); positive on {sum(v > 0 for v in srcc)} "
                f"of {len(srcc)}.")
        for m in FIGURE_METRICS[1:]:
            gains = [row["metrics"][m]["gain"] for row in rows]
            if None not in gains:
                line += f" {METRIC_LABELS[m]} from {format_signed(min(gains))} to {format_signed(max(gains))}."
        lines.append(line)
    return lines


def sign_test_p(positive: int, negative: int) -> float:
    """Two-sided exact sign test: the probability, were gains and losses equally likely, of a split
    at least this uneven (ties are left out, as the test does)."""
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(positive, negative) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparisons(results: dict) -> list[dict]:
    """The KD evidence over splits × seeds: per student and non-baseline loss, each seed's run on a
    split paired with the baseline's run of the same seed on the same split (same test images,
    same initialisation, same data order), for each of FIGURE_METRICS and EMD. Per metric:
    ``pairs``, the ``mean`` and sample ``sd`` of the paired differences, how many are
    ``better``/``worse`` (EMD: lower is better), the sign test's ``p``, the mean over splits of
    the larger seed sd (``seed_sd``, the paper's yardstick) and whether the mean exceeds it."""
    grouped: dict[tuple[str, str], list[tuple[dict, dict, str | None]]] = {}
    for group, model, baseline in loss_pairs(results):
        split = model.get("split")
        student = group.removesuffix(f" [{split}]") if split else group
        grouped.setdefault((student, model["loss"]), []).append((model, baseline, split))
    rows = []
    for (student, loss), pairs in grouped.items():
        metrics = {}
        for m in (*FIGURE_METRICS, "emd"):
            differences, seed_sds = [], []
            for model, baseline, _ in pairs:
                theirs = {run["seed"]: run["metrics"].get(m) for run in baseline["runs"]}
                differences += [run["metrics"][m] - theirs[run["seed"]] for run in model["runs"]
                                if run["metrics"].get(m) is not None and theirs.get(run["seed"]) is not None]
                sds = [sd for sd in (summarize(model)["metrics"][m]["sd"], summarize(baseline)["metrics"][m]["sd"])
                       if sd is not None]
                if sds:
                    seed_sds.append(max(sds))
            if not differences:
                continue
            sign = 1 if m != "emd" else -1
            better, worse = sum(sign * d > 0 for d in differences), sum(sign * d < 0 for d in differences)
            stat = mean_sd(differences)
            seed_sd = statistics.fmean(seed_sds) if seed_sds else None
            metrics[m] = {"pairs": len(differences), "mean": stat["mean"], "sd": stat["sd"], "better": better,
                          "worse": worse, "p": sign_test_p(better, worse), "seed_sd": seed_sd,
                          "exceeds_seed_sd": None if seed_sd is None else abs(stat["mean"]) > seed_sd}
        if metrics:
            rows.append({"student": student, "loss": loss, "splits": len(pairs), "metrics": metrics})
    return rows


def shown_pairs(results: dict) -> list[dict]:
    """The paired comparisons the report shows (and writes as paired.json): none unless some
    metric has two or more pairs."""
    rows = paired_comparisons(results)
    return rows if any(stat["pairs"] > 1 for row in rows for stat in row["metrics"].values()) else []


def paired_table(rows: list[dict]) -> str:
    """The paired comparison as a table, one row per student, loss and metric."""
    header = ("Student", "Loss", "Metric", "Pairs (splits × seeds)", "Mean paired difference ± sd", "Better / worse",
              "Sign test p", "Seed sd", "Exceeds seed sd")
    lines = []
    for row in rows:
        for m, stat in row["metrics"].items():
            lines.append([row["student"], row["loss"], METRIC_LABELS[m] + (" (lower is better)" if m == "emd" else ""),
                          f"{stat['pairs']} ({row['splits']} × {stat['pairs'] // max(row['splits'], 1)})",
                          format_stat(stat), f"{stat['better']} / {stat['worse']}", f"{stat['p']:.3g}",
                          MISSING if stat["seed_sd"] is None else f"{stat['seed_sd']:.3f}",
                          MISSING if stat["exceeds_seed_sd"] is None else ("yes" if stat["exceeds_seed_sd"] else "no")])
    return markdown_table(header, lines)


def format_gain(gain: float | None) -> str:
    return MISSING if gain is None else format_signed(gain)


def split_table(comparisons: list[dict]) -> str:
    """Fig. 6 as a table: per student, loss and split, SRCC of the loss and of the baseline (mean
    ± sample sd over seeds) and the gain of each metric (difference of means)."""
    header = ("Student", "Loss", "Split", "SRCC", "Baseline SRCC",
              *(f"{METRIC_LABELS[m]} gain" for m in FIGURE_METRICS))
    rows = ([row["student"], row["loss"], row["split"], format_stat(row["metrics"]["srcc"]["loss"]),
             format_stat(row["metrics"]["srcc"]["baseline"]),
             *(format_gain(row["metrics"][m]["gain"]) for m in FIGURE_METRICS)] for row in comparisons)
    return markdown_table(header, rows)


def split_bars(comparisons: list[dict]) -> list[dict]:
    """What ``splits.png`` draws: per student, its splits and one bar series per loss (the
    baseline first), SRCC mean and sample sd per split (None where the loss has no run there)."""
    students: dict[str, dict] = {}
    for row in comparisons:
        student = students.setdefault(row["student"], {"student": row["student"], "splits": [], "srcc": {}})
        if row["split"] not in student["splits"]:
            student["splits"].append(row["split"])
        for loss, stat in (("baseline", row["metrics"]["srcc"]["baseline"]), (row["loss"], row["metrics"]["srcc"]["loss"])):
            student["srcc"].setdefault(loss, {})[row["split"]] = stat
    return [{"student": s["student"], "splits": s["splits"],
             "bars": [{"loss": loss, "mean": [by_split.get(split, mean_sd(()))["mean"] for split in s["splits"]],
                       "sd": [by_split.get(split, mean_sd(()))["sd"] for split in s["splits"]]}
                      for loss, by_split in s["srcc"].items()]}
            for s in students.values()]


# ---------------------------------------------------------------- teacher seeds


def teacher_seed_values(results: dict) -> dict[str, list[float]]:
    """What ``teacher_seeds.png`` draws: each metric's values over the teacher seeds that have it."""
    fits = results.get("teacher_seeds") or []
    return {m: [float(fit["metrics"][m]) for fit in fits if fit["metrics"].get(m) is not None] for m in METRICS}


def teacher_seed_table(results: dict) -> str:
    """Fig. 7's ranges: per metric the number of seeds, min, max, range (max − min) and mean ± sd."""
    rows = ([METRIC_LABELS[m], str(len(values)), f"{min(values):.3f}", f"{max(values):.3f}",
             f"{max(values) - min(values):.3f}", format_stat(mean_sd(values))]
            for m, values in teacher_seed_values(results).items() if values)
    return markdown_table(("Metric", "Seeds", "Min", "Max", "Range", "Mean ± sd"), rows)


def teacher_seed_fits_table(results: dict) -> str:
    """One row per teacher seed: its test metrics and its knowledge entry."""
    rows = ([str(fit["seed"]), *(MISSING if fit["metrics"].get(m) is None else f"{fit['metrics'][m]:.3f}"
                                 for m in METRICS),
             f"`{fit['entry']}`" + (" (reused)" if fit["reused"] else "")]
            for fit in results["teacher_seeds"])
    return markdown_table(("Seed", *(METRIC_LABELS[m] for m in METRICS), "Knowledge entry"), rows)


def significance_line(results: dict, comparisons: list[dict]) -> str | None:
    """The paper's use of Fig. 7: how many per-split SRCC improvements exceed the teacher's SRCC
    range over training seeds (None without both)."""
    srcc = teacher_seed_values(results)["srcc"]
    gains = [row["metrics"]["srcc"]["gain"] for row in comparisons if row["metrics"]["srcc"]["gain"] is not None]
    if len(srcc) < 2 or len(compared_splits(comparisons)) < 2 or not gains:
        return None
    spread = max(srcc) - min(srcc)
    return (f"The teacher's SRCC varies by {spread:.3f} over {len(srcc)} training seeds; "
            f"{sum(g > spread for g in gains)} of {len(gains)} per-split SRCC improvements exceed that.")


# ---------------------------------------------------------------- per category


def category_names(results: dict) -> list[str]:
    """Every category of any run, largest first (by its largest ``n``), ties in order of appearance."""
    largest: dict[str, int] = {}
    for model in results["models"]:
        for run in model["runs"]:
            for row in run.get("per_category", ()):
                largest[row["name"]] = max(largest.get(row["name"], 0), int(row["n"]))
    return sorted(largest, key=lambda name: -largest[name])


def category_srcc(model: dict) -> dict[str, dict]:
    """``{category: mean_sd of SRCC over the model's runs}``."""
    values: dict[str, list] = {}
    for run in model["runs"]:
        for row in run.get("per_category", ()):
            values.setdefault(row["name"], []).append(row.get("srcc"))
    return {name: mean_sd(srccs) for name, srccs in values.items()}


def category_sizes(results: dict) -> dict[str, str]:
    """``{category: "12"}``, or ``"10–12"`` when models were scored on different image counts."""
    sizes: dict[str, set[int]] = {}
    for model in results["models"]:
        for run in model["runs"]:
            for row in run.get("per_category", ()):
                sizes.setdefault(row["name"], set()).add(int(row["n"]))
    return {name: str(min(n)) if len(n) == 1 else f"{min(n)}–{max(n)}" for name, n in sizes.items()}


def category_table(results: dict) -> str:
    """Categories × models: SRCC mean ± sample sd over seeds (``–`` where too few images)."""
    sizes = category_sizes(results)
    per_model = [category_srcc(model) for model in results["models"]]
    rows = ([name, sizes[name], *(format_stat(srcc.get(name, mean_sd(()))) for srcc in per_model)]
            for name in category_names(results))
    return markdown_table(("Category", "Images", *(display_name(m) for m in results["models"])), rows)


# ---------------------------------------------------------------- plots


def new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (headless, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def message_figure(text: str):
    figure = new_figure(6, 2.5)
    axes = figure.subplots()
    axes.axis("off")
    axes.text(0.5, 0.5, text, ha="center", va="center", fontsize=14)
    return figure


def save_figure(figure, out_dir: str | os.PathLike, name: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(Path(out_dir) / name, buffer.getvalue())
    return name


def wrapped(text: str, width: int = 42) -> str:
    return textwrap.fill(text, width)


def plot_scatter(results: dict, out_dir: str | os.PathLike) -> str:
    """Predicted vs ground-truth mean score on the test split: one panel per model, colour per seed."""
    import matplotlib

    models = [m for m in results["models"] if any(len(run.get("gt_mean", ())) for run in m["runs"])]
    if not models:
        return save_figure(message_figure("no test predictions"), out_dir, SCATTER_PNG)
    columns = min(3, len(models))
    rows = math.ceil(len(models) / columns)
    figure = new_figure(4.3 * columns, 4.5 * rows)
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    seed_colours = matplotlib.colormaps["tab10"]
    for axes, model in zip(panels, models):
        low, high = math.inf, -math.inf
        for i, run in enumerate(r for r in model["runs"] if len(r.get("gt_mean", ()))):
            gt, pred = run["gt_mean"], run["pred_mean"]
            axes.scatter(gt, pred, s=10, alpha=0.6, color=seed_colours(i % 10), label=f"seed {run['seed']}")
            low, high = min(low, min(gt), min(pred)), max(high, max(gt), max(pred))
        axes.plot([low, high], [low, high], color="grey", linewidth=1, label="y = x")
        axes.set_xlabel("ground-truth mean score")
        axes.set_ylabel("predicted mean score")
        srcc = format_stat(summarize(model)["metrics"]["srcc"])
        axes.set_title(f"{wrapped(model['name'])}\nSRCC {srcc}", fontsize=9)
        axes.legend(fontsize="x-small", loc="upper left")
    for axes in panels[len(models):]:
        axes.axis("off")
    return save_figure(figure, out_dir, SCATTER_PNG)


def plot_categories(results: dict, out_dir: str | os.PathLike) -> str:
    """SRCC per semantic category (mean over seeds), one bar per model; empty where undefined."""
    names = category_names(results)
    if not names:
        return save_figure(message_figure("no per-category results"), out_dir, CATEGORIES_PNG)
    models = results["models"]
    figure = new_figure(max(7.0, 0.3 * len(names) * len(models) + 3), 5.5)
    axes = figure.subplots()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        srcc = category_srcc(model)
        heights = [srcc.get(name, mean_sd(()))["mean"] for name in names]
        axes.bar([c + (i - (len(models) - 1) / 2) * width for c in range(len(names))],
                 [math.nan if h is None else h for h in heights], width, label=wrapped(model["name"], 60))
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(names)), names, rotation=40, ha="right")
    axes.set_ylabel("SRCC (mean over seeds)")
    axes.set_title("SRCC per semantic category (test split; empty: too few images)")
    figure.legend(loc="outside lower center", ncols=min(2, len(models)), fontsize="small")
    return save_figure(figure, out_dir, CATEGORIES_PNG)


def plot_training_curves(results: dict, out_dir: str | os.PathLike) -> str:
    """Training loss and validation SRCC vs epoch, one line per student run (colour per model)."""
    import matplotlib
    import matplotlib.ticker

    students = [(m, [r for r in m["runs"] if r.get("history")]) for m in results["models"]
                if m["role"] == "student"]
    students = [(m, runs) for m, runs in students if runs]
    if not students:
        return save_figure(message_figure("no training history"), out_dir, TRAINING_CURVES_PNG)
    figure = new_figure(12, 5.5)
    loss_axes, val_axes = figure.subplots(1, 2)
    model_colours = matplotlib.colormaps["tab10"]
    for i, (model, runs) in enumerate(students):
        for j, run in enumerate(runs):
            style = {"color": model_colours(i % 10), "linestyle": SEED_LINESTYLES[j % len(SEED_LINESTYLES)],
                     "marker": ".", "label": f"{model['name']} seed {run['seed']}"}
            losses = [(h["epoch"], h["loss"]) for h in run["history"] if h.get("loss") is not None]
            val = [(h["epoch"], h["val_srcc"]) for h in run["history"] if h.get("val_srcc") is not None]
            if losses:
                loss_axes.plot(*zip(*losses), **style)
            if val:
                val_axes.plot(*zip(*val), **style)
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    val_axes.set(xlabel="epoch", ylabel="SRCC", title="Validation SRCC")
    for axes in (loss_axes, val_axes):
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if not val_axes.lines:
        val_axes.text(0.5, 0.5, "no validation SRCC recorded", ha="center", va="center",
                      transform=val_axes.transAxes)
    handles, labels = loss_axes.get_legend_handles_labels()
    if not handles:
        handles, labels = val_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    return save_figure(figure, out_dir, TRAINING_CURVES_PNG)


def save_figure_data(data, out_dir: str | os.PathLike, png: str) -> None:
    """The numbers a figure draws, as JSON beside its PNG (``splits.png`` → ``splits.json``)."""
    text = json.dumps(data, indent=1, ensure_ascii=False, default=plain)
    atomic_write_bytes(Path(out_dir) / Path(png).with_suffix(".json").name, text.encode())


def plot_splits(comparisons: list[dict], out_dir: str | os.PathLike) -> str:
    """Fig. 6: per split, SRCC of each loss beside its student's baseline (mean over seeds, error
    bars ± sample sd where a split has several seeds), one panel per student."""
    import matplotlib

    bars = split_bars(comparisons)
    figure = new_figure(max(7.0, 1.2 * max(len(s["splits"]) for s in bars) + 3), 4.5 * len(bars))
    colours = matplotlib.colormaps["tab10"]
    for axes, student in zip(figure.subplots(len(bars), 1, squeeze=False).ravel(), bars):
        width = 0.8 / len(student["bars"])
        for i, series in enumerate(student["bars"]):
            x = [c + (i - (len(student["bars"]) - 1) / 2) * width for c in range(len(student["splits"]))]
            heights = [math.nan if v is None else v for v in series["mean"]]
            errors = [0.0 if v is None else v for v in series["sd"]]
            axes.bar(x, heights, width, yerr=errors if any(errors) else None, capsize=3,
                     color=colours(i % 10), label=series["loss"])
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xticks(range(len(student["splits"])), student["splits"], rotation=30, ha="right")
        axes.set_ylabel("test SRCC (mean over seeds)")
        axes.set_title(f"{student['student']}: KD vs baseline per train-test split", fontsize=10)
        axes.legend(fontsize="small")
    save_figure_data(bars, out_dir, SPLITS_PNG)
    return save_figure(figure, out_dir, SPLITS_PNG)


def plot_teacher_seeds(results: dict, out_dir: str | os.PathLike) -> str:
    """Fig. 7: the teacher's SRCC, PLCC and Acc over distiller seeds, one box plot each, with
    every seed's value drawn over its box."""
    values = teacher_seed_values(results)
    figure = new_figure(10, 4)
    for axes, metric in zip(figure.subplots(1, len(FIGURE_METRICS)), FIGURE_METRICS):
        label = METRIC_LABELS[metric]
        if not values[metric]:
            axes.axis("off")
            axes.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=axes.transAxes)
            continue
        axes.boxplot([values[metric]], widths=0.5, showfliers=False)  # every seed's value is a point
        axes.scatter([1.0] * len(values[metric]), values[metric], s=14, color="black", alpha=0.6, zorder=3)
        axes.set_xticks([1], [label])
        spread = max(values[metric]) - min(values[metric])
        axes.set_title(f"{label}: range {spread:.3f} over {len(values[metric])} seeds", fontsize=10)
    figure.suptitle("Teacher (distiller) test metrics over training seeds")
    save_figure_data({m: values[m] for m in FIGURE_METRICS}, out_dir, TEACHER_SEEDS_PNG)
    return save_figure(figure, out_dir, TEACHER_SEEDS_PNG)


# ---------------------------------------------------------------- report


def plain(value):
    """NumPy arrays and scalars as lists and numbers, for ``json``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"results hold a {type(value).__name__}, which JSON cannot store")


INTRO = ("Teacher and students of *Distilling Knowledge from Object Classification to Aesthetics "
         "Assessment*, scored on the test split in the shape of the paper's Tables V and VIII. "
         "SRCC, PLCC and Acc: higher is better; EMD: lower is better. A cell with ± is the mean ± "
         "sample sd over the model's seeds. GFLOPs are for one forward pass of one image, one "
         "multiply-add counted as one FLOP as in the paper; the teacher's are the backbones' at the "
         "median test image size plus the distiller's. Wall time is the mean per run; *(reused)* "
         "marks results found in the store or in an earlier run's record, not recomputed.")

COMPARISON_RULE = ("A loss is called better or worse than the baseline only when the difference of "
                   "means exceeds the larger of the two seed sds; a smaller one is reported as no clear difference.")


SPLITS_TEXT = ("Each non-baseline loss of a student against that student's baseline on every train-test "
               "split, as in the paper's Fig. 6: SRCC is the mean ± sample sd over seeds, a gain is the "
               "difference of means.")

PAIRED_TEXT = ("Each seed's run of a loss against the baseline's run of the same seed on the same split (same "
               "test images, initialisation and data order), pooled over splits: the mean and sample sd of the "
               "paired differences, how many pairs favour each side, the two-sided exact sign test, and the "
               "paper's yardstick, the larger seed sd of the two runs' groups (mean over splits). "
               "The numbers are in paired.json.")

TEACHER_SEEDS_TEXT = ("The distiller refitted with each seed on the same split, as in the paper's Fig. 7: how much "
                      "the teacher's test metrics move through training randomness alone. Range = max − min.")


def report_markdown(results: dict, table: str, plots: dict[str, str], paired: list[dict]) -> str:
    comparisons = comparison_lines(results)
    sections = [f"# {results['title']}", INTRO, "## Setup", setup_table(results.get("setup", {})),
                "## Results", table, "## Comparison"]
    if comparisons:
        sections += [COMPARISON_RULE, "\n".join(f"- {line}" for line in comparisons)]
    else:
        sections.append("No student group has both a baseline and another loss, so there is nothing to compare.")
    sections += list(results.get("notes", ()))
    by_split = split_comparisons(results)
    if "splits" in plots:
        sections += ["## KD vs baseline per split (Fig. 6)", SPLITS_TEXT,
                     f"![SRCC per split, each loss beside its baseline]({plots['splits']})", split_table(by_split)]
    if paired:
        sections += ["## Paired comparison over splits × seeds", PAIRED_TEXT, paired_table(paired)]
    if "teacher_seeds" in plots:
        sections += ["## Teacher over training seeds (Fig. 7)", TEACHER_SEEDS_TEXT,
                     f"![Teacher SRCC, PLCC and Acc over seeds]({plots['teacher_seeds']})",
                     teacher_seed_table(results), teacher_seed_fits_table(results)]
        if line := significance_line(results, by_split):
            sections.append(line)
    sections += ["## Predicted vs ground truth (test split)",
                 f"![Predicted vs ground-truth mean score]({plots['scatter']})",
                 "## SRCC per semantic category",
                 f"![SRCC per semantic category]({plots['categories']})",
                 category_table(results),
                 "## Training curves",
                 f"![Training loss and validation SRCC]({plots['training_curves']})"]
    return "\n\n".join(sections) + "\n"


def write_report(results: dict, out_dir: str | os.PathLike) -> dict:
    """Write report.md, results.json and the PNGs into ``out_dir`` (created): always the scatter,
    per-category and training-curve plots; ``splits.png`` (Fig. 6) when students were compared on
    two or more splits and ``teacher_seeds.png`` (Fig. 7) when the results have teacher seeds, each
    with its JSON sidecar.

    Returns ``{"report": path of report.md, "table": the results table, "plots": [PNG paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {"scatter": plot_scatter(results, out), "categories": plot_categories(results, out),
             "training_curves": plot_training_curves(results, out)}
    by_split = split_comparisons(results)
    if len(compared_splits(by_split)) >= 2:
        plots["splits"] = plot_splits(by_split, out)
    if results.get("teacher_seeds"):
        plots["teacher_seeds"] = plot_teacher_seeds(results, out)
    if paired := shown_pairs(results):
        atomic_write_bytes(out / PAIRED_JSON, json.dumps(paired, indent=1, ensure_ascii=False, default=plain).encode())
    as_json = json.dumps(results, indent=1, ensure_ascii=False, default=plain)
    atomic_write_bytes(out / "results.json", as_json.encode())
    table = results_table(results)
    atomic_write_bytes(out / "report.md", report_markdown(results, table, plots, paired).encode())
    return {"report": str(out / "report.md"), "table": table, "plots": [str(out / name) for name in plots.values()]}
