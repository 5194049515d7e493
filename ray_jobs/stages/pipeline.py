"""The whole paper as one composition of stages: teacher features → knowledge → students → report.

Stages, each the same function its own job calls, and each reusing what the store already holds:

1. ``demo_data`` (optional): generate the demo dataset at ``dataset.path`` (once);
2. extraction (``ray_jobs.stages.extract``): backbones at full resolution → GSF entry. A complete entry
   means zero forward passes;
3. distillation (``ray_jobs.stages.distill``): GSFs → knowledge entry. A complete entry means no refit.
   With ``teacher_seeds``, the distiller is also fitted once per seed on the first split (Fig. 7:
   the teacher's spread over training randomness), each fit its own entry; the students still
   learn from the distill section's seed;
4. students (``ray_jobs.stages.train``): every ``students`` × ``losses`` × ``seeds`` experiment
   on Ray Train, then ``ray_jobs.stages.evaluate`` on the test split. A finished experiment is recorded
   in ``report/runs/<name>.json`` (the name hashes its whole training config and the knowledge
   entry), and a later run with the same experiment reads the record instead of training;
5. the report: ``report/report.md`` with the Tables V/VIII-shaped table (model, input, params,
   FLOPs, SRCC, PLCC, Acc, EMD, wall time), the KD-vs-baseline comparison over seeds, and PNG
   plots (predicted vs ground truth, per category, training curves; KD vs baseline per split
   with several splits, Fig. 6; the teacher over its seeds with ``teacher_seeds``, Fig. 7).

``report`` is a local directory or an ``s3://`` prefix. An S3 report is assembled in a local
staging directory that starts with the prefix's run records and is uploaded at the end, also
when the run fails, so no finished record is lost. One failed experiment is named on stderr and
in the result, and the others still run. ``plan`` says what a run would reuse and compute
without doing any of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load as load_safetensors

from featurestore.backends import Backend
from featurestore.datasets import DatasetError
from featurestore.dataset_table import DatasetTable
from featurestore.files import atomic_write_text
from featurestore.splits import SplitError, SplitSpec
from featurestore.views import GsfView
from featurestore.sources import SourceError, read_bytes
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, as_dict, from_dict, option
from ray_jobs.make_demo_data import DemoDataConfig
from ray_jobs.runtime import cluster_gpus, is_local, log
from ray_jobs.stages import report
from ray_jobs.stages.dataset_input import DatasetConfig
from ray_jobs.stages.distill import DistillConfig, DistillResult, distill, plan_distill
from ray_jobs.stages.evaluate import METRICS, EvaluateConfig, EvaluateResult, evaluate, write_predictions
from ray_jobs.stages.extract import ExtractConfig, ExtractResult, extract, plan_extract
from ray_jobs.stages.train import LossConfig, StudentConfig, TrainConfig, train
from trainers.labels import LabelError, check_loss, labelled_rows
from trainers.metrics import mean_score
from trainers.student import StudentSpec, view_size

JOB = "pipeline"
#: Keys of the stage sections that the pipeline sets itself, from its top-level keys.
SET_BY_PIPELINE = {
    "extract": ("dataset", "store", "ray_address", "num_cpus"),
    "distill": ("dataset", "store", "gsf_entry", "ray_address"),
    "train": ("store", "knowledge_entry", "student", "loss", "seed", "name", "ray_address", "num_cpus", "score_test"),
}
SIZE_SAMPLE = 32  # images whose size gives the teacher's "full res" input in the table


@dataclass(frozen=True)
class PipelineConfig:
    dataset: DatasetConfig
    students: tuple[StudentConfig, ...] = option(help="student models, each trained with every loss and seed")
    store: str = option("./store", help="feature store: local directory or s3://bucket/prefix")
    demo_data: DemoDataConfig | None = option(None, help="generate the demo dataset at dataset.path first")
    extract: dict[str, Any] = option(default_factory=dict, help="ray_jobs.extract keys (not dataset/store)")
    distill: dict[str, Any] = option(default_factory=dict, help="ray_jobs.distill keys (not store/gsf_entry)")
    train: dict[str, Any] = option(default_factory=dict, help="ray_jobs.train_student keys (epochs, lr, num_workers…)")
    losses: tuple[str | LossConfig, ...] = option(("kd", "baseline"), help="loss kinds or loss sections")
    seeds: tuple[int, ...] = option((0, 1, 2), help="one student run per seed")
    splits: tuple[str, ...] = option((), help="dataset.split specs (official, file:PATH, cv:K:FOLD[:SEED], "
                                              "random:FRACTION:SEED): one knowledge entry and one set of student "
                                              "runs each (Fig. 6); empty: dataset.split")
    teacher_seeds: tuple[int, ...] = option((), help="distiller seeds to fit on the first split, one knowledge entry "
                                                     "each, for the teacher's spread over training randomness "
                                                     "(Fig. 7); students still learn from distill.seed's knowledge; "
                                                     "empty: none")
    evaluate_batch_size: int = option(32, help="images per forward pass when scoring the test split")
    report: str = option("report", help="report.md, plots, predictions and run records: local directory or s3:// prefix")
    ray_address: str | None = option(None, help="Ray cluster address; default RAY_ADDRESS or a local instance")
    num_cpus: int | None = option(None, help="logical CPUs of a local Ray instance (default max(4, cores))")

    def __post_init__(self):
        if not self.students or not self.losses or not self.seeds:
            raise ConfigError("students, losses and seeds must each name at least one")
        for split in self.splits:
            try:
                SplitSpec.parse(split)
            except SplitError as exc:
                raise ConfigError(f"splits: {exc}") from None
        if len(set(self.split_list)) != len(self.split_list):
            raise ConfigError(f"splits repeat: {list(self.splits)}")
        if len(set(self.teacher_seeds)) != len(self.teacher_seeds):
            raise ConfigError(f"teacher_seeds repeat: {list(self.teacher_seeds)}")
        if self.dataset.path is None:
            raise ConfigError("dataset.path is required: the dataset the pipeline extracts and trains on")
        if self.demo_data and (self.dataset.format != "ava" or "://" in self.dataset.path):
            raise ConfigError("demo_data writes an AVA-layout dataset to a local dataset.path with dataset.format ava")
        for stage, keys in SET_BY_PIPELINE.items():
            if taken := sorted(set(getattr(self, stage)) & set(keys)):
                raise ConfigError(f"{stage}.{taken[0]} is set by the pipeline; set the top-level key instead")


    @property
    def split_list(self) -> tuple[str, ...]:
        return tuple(str(SplitSpec.parse(s)) for s in self.splits) or (self.dataset.split or "official",)


@dataclass(frozen=True)
class Experiment:
    """One student run: a training config whose name identifies it, and how to label it."""

    config: TrainConfig
    model: str  # the report's row: student and loss (and split, when there are several)
    group: str  # students in one group differ only in loss
    split: str


def stage_configs(cfg: PipelineConfig) -> tuple[ExtractConfig, DistillConfig]:
    common = {"ray_address": cfg.ray_address}
    ex = from_dict(ExtractConfig, {**cfg.extract, **common, "dataset": as_dict(cfg.dataset),
                                   "store": cfg.store, "num_cpus": cfg.num_cpus}, prefix="extract.")
    di = from_dict(DistillConfig, {**cfg.distill, **common, "store": cfg.store, "gsf_entry": "(extract)",
                                   "dataset": {"split": cfg.dataset.split}}, prefix="distill.")
    for loss in cfg.losses:  # a loss that cannot fit the teacher's label fails now, not on a worker
        try:
            check_loss(di.label, loss if isinstance(loss, str) else loss.kind)
        except LabelError as exc:
            raise ConfigError(f"losses: {exc}") from None
    return ex, di


#: Training keys that do not change what a student run computes, so not part of its name.
NOT_IDENTITY = ("ray_address", "num_cpus", "storage_path", "max_failures", "store", "checkpoint_every_steps",
                "log_every_steps", "name")


def plan_experiments(cfg: PipelineConfig, knowledge_entry: str, split: str | None = None) -> list[Experiment]:
    """Students × losses × seeds on one split's knowledge, each named ``<loss>-<backbone>-s<seed>-<hash>``:
    the hash covers the knowledge entry (and so the split) and every training key with its
    default filled in, so equal names mean equal experiments, and a changed default is a new name."""
    split = split or cfg.split_list[0]
    suffix = f" [{split}]" if len(cfg.split_list) > 1 else ""
    losses = [from_dict(LossConfig, {"kind": loss}, prefix="losses.") if isinstance(loss, str) else loss
              for loss in cfg.losses]
    experiments = []
    names = student_names(cfg.students)
    for student, who in zip(cfg.students, names):
        for loss in losses:
            for seed in cfg.seeds:
                tree = {**cfg.train, "store": cfg.store, "knowledge_entry": knowledge_entry,
                        "student": as_dict(student), "loss": as_dict(loss), "seed": seed,
                        "ray_address": cfg.ray_address, "num_cpus": cfg.num_cpus,
                        "score_test": False}  # scored once, by the evaluate stage
                config = from_dict(TrainConfig, tree, prefix="train.")
                identity = {k: v for k, v in as_dict(config).items() if k not in NOT_IDENTITY}
                digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
                config = replace(config, name=f"{loss.kind}-{student.backbone}-s{seed}-{digest}".replace("/", "_"))
                experiments.append(Experiment(config, model=f"Student {who}, {loss.kind}{suffix}",
                                              group=f"{who}@{student.view}{suffix}", split=split))
    return experiments


def student_names(students: Sequence[StudentConfig]) -> list[str]:
    """What the report calls each student: its backbone, marked frozen (Table V's rows) and with
    its semantic input (Table XII's), plus its view where only the view tells two apart."""
    names = [s.backbone + (" (frozen)" if s.freeze_backbone else "") + (f" ({s.semantic})" if s.semantic else "")
             for s in students]
    return [f"{name} {s.view}" if names.count(name) > 1 else name for name, s in zip(names, students)]


@dataclass(frozen=True)
class PipelineResult:
    """What one pipeline run did: the ``report`` written and its ``table``; ``extract`` and
    ``distill`` (the first split's knowledge) in brief; ``splits`` one knowledge entry each;
    ``teacher_seeds`` one distiller fit per teacher seed (its entry and test metrics);
    ``students`` one per experiment (trained or reused); ``failed`` student runs with their errors."""

    report: str
    table: str
    extract: dict[str, Any]
    distill: dict[str, Any]
    splits: list[dict[str, Any]]
    teacher_seeds: list[dict[str, Any]]
    students: list[dict[str, Any]]
    trained: int
    reused_students: int
    failed: list[dict[str, str]]
    seconds: float


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Run every stage of ``cfg``, reusing every entry and student record the store already has."""
    started = time.perf_counter()
    extract_cfg, distill_cfg = stage_configs(cfg)
    plan_experiments(cfg, "knowledge-0")  # every student config is checked before any slow step
    with staged_report(cfg.report) as out:
        result = run(cfg, extract_cfg, distill_cfg, out)
    location = f"{cfg.report.rstrip('/')}/{Path(result['report']).name}" if "://" in cfg.report else result["report"]
    return PipelineResult(**{**result, "report": location, "seconds": round(time.perf_counter() - started, 1)})


def plan(cfg: PipelineConfig) -> dict:
    """What ``run_pipeline(cfg)`` would reuse and compute, found without computing, fitting or
    training anything: every stage section is checked, and each entry and student run is marked
    ``reused`` (complete in the store, or recorded in the report) or not. A knowledge entry whose
    GSF view does not exist yet, and so its students, have no key yet (``entry``/``name`` null)."""
    extract_cfg, distill_cfg = stage_configs(cfg)
    plan_experiments(cfg, "knowledge-0")  # every student config is checked
    exists = "://" in cfg.store or Path(cfg.store).is_dir()
    store = FeatureStore(cfg.store, create=False) if exists else None  # a check creates nothing
    generate = bool(cfg.demo_data) and not Path(cfg.dataset.path).exists()
    if generate:  # the demo dataset does not exist yet: every image is to compute, no key is known
        extraction = {"entry": None, "reused": False, "rows": cfg.demo_data.n, "missing_rows": cfg.demo_data.n}
    else:
        extraction = dataclasses.asdict(plan_extract(extract_cfg, store, use_gpu=plans_gpu(extract_cfg)))
    records = Backend(cfg.report, create=False) if "://" in cfg.report or Path(cfg.report).is_dir() else None

    def plan_knowledge(split: str, seed: int) -> dict:
        return {"entry": None, "reused": False} if generate else \
            plan_distill(replace(distill_cfg, gsf_entry=extraction["entry"], seed=seed,
                                 dataset=replace(distill_cfg.dataset, split=split)), store)

    splits, students = [], []
    for split in cfg.split_list:
        knowledge = plan_knowledge(split, distill_cfg.seed)
        splits.append({"split": split, **knowledge})
        for experiment in plan_experiments(cfg, knowledge["entry"] or "(not yet known)", split):
            name = experiment.config.name if knowledge["entry"] else None
            students.append({"name": name, "split": split, "backbone": experiment.config.student.backbone,
                             "loss": experiment.config.loss.kind, "seed": experiment.config.seed,
                             "reused": bool(name and records and records.exists(f"runs/{name}.json"))})
    first = splits[0]  # the distill seed's own fit is the students' knowledge, planned above
    teacher_fits = [{"seed": seed, "split": first["split"],
                     **({k: first[k] for k in ("entry", "reused")} if seed == distill_cfg.seed
                        else plan_knowledge(first["split"], seed))} for seed in cfg.teacher_seeds]
    fits = sum(not s["reused"] for s in splits) + sum(not t["reused"] for t in teacher_fits
                                                      if t["seed"] != distill_cfg.seed)
    return {"store": cfg.store, "report": cfg.report, "demo_data": generate, "extract": extraction, "splits": splits,
            "teacher_seeds": teacher_fits, "students": students,
            "to_compute": {"images": extraction["missing_rows"], "knowledge_fits": fits,
                           "student_runs": sum(not s["reused"] for s in students)}}


def plans_gpu(cfg: ExtractConfig) -> bool:
    """Whether an extraction would run on GPUs, decided without starting Ray: on a cluster with
    ``device: auto`` it is assumed to (the shipped clusters' extraction pools have GPUs)."""
    if cfg.device != "auto":
        return cfg.device == "cuda"
    if not is_local(cfg.ray_address):
        return True
    import torch

    return torch.cuda.is_available()


@contextmanager
def staged_report(location: str) -> Iterator[Path]:
    """The report's local directory: ``location``, or for an ``s3://`` prefix a staging directory
    that starts with the prefix's run records and is uploaded when the run ends (even by an error)."""
    if "://" not in location:
        (Path(location) / "runs").mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    backend = Backend(location)
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        stage = Path(tmp)
        (stage / "runs").mkdir()
        for obj in backend.list("runs/"):
            (stage / obj["path"]).write_bytes(backend.read_bytes(obj["path"]))
        try:
            yield stage
        finally:
            for file in sorted(p for p in stage.rglob("*") if p.is_file()):
                backend.write_bytes(file.relative_to(stage).as_posix(), file.read_bytes())
            log(JOB, f"report uploaded to {location}")


def run(cfg: PipelineConfig, extract_cfg: ExtractConfig, distill_cfg: DistillConfig,
        out: Path) -> dict:
    """Every stage, writing the report into the local directory ``out``."""
    if cfg.demo_data:
        from ray_jobs.make_demo_data import DemoDataError, generate

        d = cfg.demo_data
        log(JOB, f"demo dataset at {cfg.dataset.path} ({d.n} images, seed {d.seed})")
        try:
            generate(Path(cfg.dataset.path), d.n, d.seed, d.test_fraction, tuple(d.long_side))
        except DemoDataError as exc:
            raise ConfigError(str(exc)) from None

    log(JOB, "stage 1/3: teacher features (GSFs)")
    extracted = extract(extract_cfg)
    log(JOB, f"GSF entry {extracted.entry}: {extracted.forward_passes} forward passes, "
             f"{'reused' if extracted.reused else 'computed'} ({extracted.seconds:.0f} s)")
    store = FeatureStore(cfg.store)
    dataset = GsfView(store, extracted.entry).dataset()
    log(JOB, f"stage 2/3: teacher knowledge (distiller) for {len(cfg.split_list)} split(s)"
             + (f" and {len(cfg.teacher_seeds)} teacher seed(s)" if cfg.teacher_seeds else ""))
    distilled, teachers, experiments = {}, [], []
    for split in cfg.split_list:
        result = distill(replace(distill_cfg, gsf_entry=extracted.entry,
                                 dataset=replace(distill_cfg.dataset, split=split)))
        log(JOB, f"split {split}: knowledge entry {result.entry}: "
                 f"{'reused, no refit' if result.reused else 'fitted'} ({result.seconds:.0f} s); "
                 f"teacher test {fmt_metrics(result.test)}")
        distilled[split] = result
        teachers.append(teacher_model(store.open(result.entry), dataset.resplit(SplitSpec.parse(split)), out,
                                      extracted, result, split if len(cfg.split_list) > 1 else None))
        experiments += plan_experiments(cfg, result.entry, split)

    teacher_seeds = fit_teacher_seeds(cfg, distill_cfg, extracted.entry, distilled[cfg.split_list[0]])

    log(JOB, f"stage 3/3: {len(experiments)} student runs ({len(cfg.students)} students × "
             f"{len(cfg.losses)} losses × {len(cfg.seeds)} seeds × {len(cfg.split_list)} splits)")
    runs, failed = [], []
    for i, experiment in enumerate(experiments, 1):
        name = experiment.config.name
        try:
            record = run_experiment(cfg, experiment, out, f"{i}/{len(experiments)}")
        except Exception as exc:  # noqa: BLE001 — one failed experiment must not stop the others
            log(JOB, f"error: student run {name} failed: {type(exc).__name__}: {exc}; the other runs go on")
            failed.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        runs.append((experiment, record))

    first = distilled[cfg.split_list[0]]
    results = report_input(cfg, dataset.resplit(SplitSpec.parse(cfg.split_list[0])), extracted, first, teachers,
                           experiments[0].config, runs, failed, teacher_seeds)
    written = report.write_report(results, out)
    for line in written["table"].splitlines():
        log(JOB, line)
    for line in report.comparison_lines(results):
        log(JOB, line)
    log(JOB, f"report: {written['report']}")
    return {"report": written["report"], "table": written["table"],
            "extract": {k: getattr(extracted, k) for k in ("entry", "forward_passes", "reused", "computed_rows",
                                                           "seconds")},
            "distill": {k: getattr(first, k) for k in ("entry", "reused", "test", "seconds")},
            "splits": [{"split": split, **{k: getattr(d, k) for k in ("entry", "reused", "test", "train_rows",
                                                                      "test_rows")}}
                       for split, d in distilled.items()],
            "teacher_seeds": teacher_seeds,
            "students": [{"name": e.config.name, "loss": e.config.loss.kind, "seed": e.config.seed,
                          "backbone": e.config.student.backbone, "reused": r["reused"], "metrics": r["metrics"],
                          "checkpoint": r["checkpoint"], "seconds": r["seconds"]} for e, r in runs],
            "trained": sum(not r["reused"] for _, r in runs), "reused_students": sum(r["reused"] for _, r in runs),
            "failed": failed}


def fit_teacher_seeds(cfg: PipelineConfig, distill_cfg: DistillConfig, gsf_entry: str,
                      students_knowledge: DistillResult) -> list[dict]:
    """Fig. 7: the distiller fitted once per ``cfg.teacher_seeds`` seed on the first split, each fit
    its own knowledge entry (the seed is part of its key), reused when complete. The distill
    section's own seed is ``students_knowledge``, already fitted. Returns one ``{"seed", "split",
    "entry", "reused", "metrics" (the fit's test metrics), "seconds"}`` per seed."""
    split = cfg.split_list[0]
    on_split = replace(distill_cfg, gsf_entry=gsf_entry, dataset=replace(distill_cfg.dataset, split=split))
    fits = []
    for seed in cfg.teacher_seeds:
        result = students_knowledge if seed == distill_cfg.seed else distill(replace(on_split, seed=seed))
        log(JOB, f"teacher seed {seed}: knowledge entry {result.entry}: "
                 f"{'reused, no refit' if result.reused else 'fitted'}; test {fmt_metrics(result.test)}")
        fits.append({"seed": seed, "split": split, "entry": result.entry, "reused": result.reused,
                     "metrics": result.test or {}, "seconds": result.seconds})
    return fits


def run_experiment(cfg: PipelineConfig, experiment: Experiment, out: Path, position: str) -> dict:
    """Train and evaluate one student, or read its record if an earlier run finished it."""
    name = experiment.config.name
    record_path = out / "runs" / f"{name}.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        log(JOB, f"student {position} {name}: finished earlier, reusing its record (no training)")
        return {**record, "reused": True}
    log(JOB, f"student {position} {name}: training")
    trained = train(experiment.config)
    log(JOB, f"student {position} {name}: scoring the test split")
    scored = evaluate_on_test(cfg, trained.checkpoint)
    write_predictions(out / "predictions" / f"{name}.csv", scored)
    record = {"name": name, "config": as_dict(experiment.config), "student": trained.student,
              "checkpoint": trained.checkpoint,
              "metrics": scored.metrics, "per_category": scored.per_category, "n": scored.n,
              "failed_images": scored.failed, "history": trained.history, "seconds": trained.seconds,
              "gt_mean": scored.images.gt_mean.tolist(), "pred_mean": scored.images.pred_mean.tolist()}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    log(JOB, f"student {position} {name}: test {fmt_metrics(record['metrics'])} ({record['seconds']:.0f} s training)")
    return {**record, "reused": False}


def evaluate_on_test(cfg: PipelineConfig, checkpoint: str) -> EvaluateResult:
    """The evaluation stage on the test split: here, or on a GPU worker when the cluster has GPUs
    and this driver has none."""
    # the dataset recorded at extraction, on the split of the student's knowledge: nothing re-indexed
    eval_cfg = EvaluateConfig(checkpoint=checkpoint, dataset=DatasetConfig(), store=cfg.store, split="test",
                              batch_size=cfg.evaluate_batch_size)
    if not is_local(cfg.ray_address):
        import ray
        import torch

        if cluster_gpus() and not torch.cuda.is_available():
            return ray.get(ray.remote(num_gpus=1)(evaluate).remote(eval_cfg))
    return evaluate(eval_cfg)


def teacher_model(knowledge, dataset: DatasetTable, out: Path, extracted: ExtractResult, distilled: DistillResult,
                  split: str | None) -> dict:
    """The teacher's report row: the distiller on the trio's GSFs, at full resolution (on ``split``,
    named in the row when the report has several)."""
    from trainers.cost import teacher_cost
    from trainers.knowledge import knowledge_hashes, knowledge_rows

    spec = knowledge.read_document("distiller")["spec"]
    test = np.flatnonzero(np.asarray(dataset.splits, str) == "test")
    height, width = median_size([dataset.uris[i] for i in test[:SIZE_SAMPLE]] or list(dataset.uris[:SIZE_SAMPLE]))
    params, gflops = teacher_cost(spec["backbones"], height, width)
    distiller_params = sum(a.size for a in load_safetensors(knowledge.read_blob("distiller.safetensors")).values())
    metrics = knowledge.read_document("metrics")
    timing = teacher_timing(out, extracted, distilled)
    gt_mean, pred_mean = [], []
    # the teacher's test rows as the distiller's: the labelled test rows that have knowledge
    labelled_test = labelled_rows(dataset, "test", required=False)
    if spec["label"] == "distribution" and dataset.votes is not None and len(labelled_test):
        krows = knowledge_rows(knowledge_hashes(knowledge), dataset.sha256[labelled_test])
        ok = krows >= 0
        pred = knowledge.read_rows(krows[ok], ["distribution"])["distribution"]
        gt_mean = mean_score(np.asarray(dataset.votes, np.float64)[labelled_test])[ok].tolist()
        pred_mean = mean_score(pred.astype(np.float64)).tolist()
    return {"name": f"Teacher: {' + '.join(spec['backbones'])} → distiller" + (f" [{split}]" if split else ""),
            "role": "teacher", "loss": None, "group": None, "split": split,
            "input": f"full res (median {width}×{height})", "params": params + distiller_params,
            "flops": (gflops + distiller_params / 1e9) * 1e9,
            "runs": [{"seed": spec["seed"], "seconds": timing["seconds"], "reused": timing["reused"],
                      "metrics": distilled.test or {}, "gt_mean": gt_mean, "pred_mean": pred_mean,
                      "per_category": metrics.get("per_category", []),
                      "history": metrics.get("history", [])}]}


def teacher_timing(out: Path, extracted: ExtractResult, distilled: DistillResult) -> dict:
    """Wall seconds of extraction + distillation. A stage that reused its entry took no time in this
    run; its time is read from the record this pipeline wrote when it computed the entry."""
    seconds, reused = 0.0, True
    for stage, result in (("extract", extracted), ("distill", distilled)):
        path = out / "runs" / f"{stage}-{result.entry}.json"
        stage_seconds = result.seconds
        if not result.reused:
            atomic_write_text(path, json.dumps({"entry": result.entry, "seconds": result.seconds}))
            reused = False
        elif path.exists():
            stage_seconds = json.loads(path.read_text())["seconds"]
        seconds += stage_seconds
    return {"seconds": seconds, "reused": reused}


def median_size(uris: list[str]) -> tuple[int, int]:
    """Median (height, width) of these images, from their headers."""
    from PIL import Image

    sizes = []
    for uri in uris:
        try:
            with Image.open(io.BytesIO(read_bytes(uri))) as image:
                sizes.append(image.size[::-1])
        except (OSError, SourceError):
            continue  # extraction already named unreadable images
    if not sizes:
        raise DatasetError("no test image could be read to size the teacher's input")
    height, width = np.median(np.asarray(sizes), axis=0)
    return int(height), int(width)


def report_input(cfg: PipelineConfig, dataset: DatasetTable, extracted: ExtractResult, distilled: DistillResult,
                 teachers: list[dict], train_cfg: TrainConfig, runs: list[tuple[Experiment, dict]],
                 failed: list[dict], teacher_seeds: list[dict]) -> dict:
    """What ``ray_jobs.stages.report`` renders: one teacher row, one row per student × loss over seeds,
    and the teacher-seed fits (``fit_teacher_seeds``)."""
    models: dict[str, dict] = {}
    for experiment, record in runs:
        spec = StudentSpec.from_json(record["student"])
        h, w = view_size(spec.view)
        if experiment.model not in models:
            from trainers.cost import student_cost

            params, gflops = student_cost(spec)
            models[experiment.model] = {"name": experiment.model, "role": "student", "split": experiment.split,
                                        "loss": experiment.config.loss.kind, "group": experiment.group,
                                        "input": f"{h}×{w}" + (" (backbone frozen)" if spec.freeze_backbone else ""),
                                        "params": params, "flops": gflops * 1e9, "runs": []}
        models[experiment.model]["runs"].append(
            {"seed": experiment.config.seed, "seconds": record["seconds"], "reused": record["reused"],
             "metrics": record["metrics"], "gt_mean": record["gt_mean"], "pred_mean": record["pred_mean"],
             "per_category": record["per_category"], "history": record["history"]})
    splits = list(dataset.splits)
    notes = [f"Student run {f['name']} failed: {f['error']}" for f in failed]
    return {
        "title": f"Teacher vs students on {dataset.name or cfg.dataset.path}",
        "setup": {
            "dataset": f"{cfg.dataset.path} ({len(splits)} images: {splits.count('train')} train, "
                       f"{splits.count('test')} test)",
            "store": cfg.store,
            "GSF entry": f"{extracted.entry} ({'reused, 0 forward passes' if extracted.reused else 'computed'})",
            "knowledge entry": f"{distilled.entry} ({'reused, no refit' if distilled.reused else 'fitted'})",
            "students": f"{train_cfg.epochs} epochs, global batch {train_cfg.global_batch_size}, "
                        f"{train_cfg.num_workers} workers, Adam {train_cfg.lr:g} ÷10 every {train_cfg.lr_step_epochs} epochs",
            "seeds": ", ".join(map(str, cfg.seeds)),
            "splits": ", ".join(cfg.split_list),
            **({"teacher seeds": f"{', '.join(str(f['seed']) for f in teacher_seeds)} on {teacher_seeds[0]['split']}, "
                                 f"one knowledge entry each; the students learn from the knowledge entry above"}
               if teacher_seeds else {}),
        },
        "models": [*teachers, *models.values()], "notes": notes,
        **({"teacher_seeds": teacher_seeds} if teacher_seeds else {}),
    }


def fmt_metrics(metrics: dict | None) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in (metrics or {}).items() if k in METRICS and v is not None)
