"""The student stage: Ray Train DDP workers stream images + teacher knowledge and fit the KD loss.

Each worker streams its own partition of the train split from the dataset and the knowledge
entry; nothing is gathered on the driver. ``num_workers`` is a count or a ``[min, max]`` range:
the run is elastic and uses as many workers as the cluster offers. A checkpoint is written every
epoch to ``storage_path/name``. A killed worker or node resumes from the last checkpoint (up to
``max_failures`` times), and running again under the same ``name`` resumes the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from featurestore.features import extractor_key
from featurestore.pixels import pixels_key
from featurestore.store import FeatureStore
from featurestore.views import put_table
from ray_jobs.config import ConfigError, as_dict, find_user_error, option
from ray_jobs.stages.dataset_input import DatasetConfig, knowledge_table
from ray_jobs.runtime import cluster_gpus, init_ray, is_local, log
from trainers.knowledge import knowledge_hashes
from trainers.labels import TAG_LOSSES, check_loss, check_tags
from trainers.losses import KINDS, LossSpec
from trainers.student import StudentSpec
from trainers.student_data import BatchPlanError, batch_plan, student_splits
from trainers.student_features import ensure_pooled
from trainers.student_views import StoredViews, ensure_views, pixel_view
from trainers.weights import check_local_file

# Ray Train V2 (elastic scaling, the controller's failure handling) is chosen when ray.train is
# first imported; the stage needs it, whichever module imported Ray first.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

JOB = "train_student"
IMAGE_SOURCES = ("stored", "decode")


@dataclass(frozen=True)
class StudentConfig:
    """``StudentSpec``'s keys that a config sets, with its defaults and checks; the feature width
    and label come from the knowledge entry, the seed from the run, the tag width from the
    dataset and the tag head from the loss (``multitask``)."""

    backbone: str = option(help="timm name or alias, e.g. swsl_resnext101_32x8d, resnet50, tf_efficientnet_lite0")
    weights: str = option(StudentSpec.weights, help="hub | packaged | random:<seed> | path | s3:// URI (backbone only)")
    view: str = option(StudentSpec.view, help="resize:<S> | resize:<H>x<W> | pad_crop:800:640 (Table VII)")
    freeze_backbone: bool = option(StudentSpec.freeze_backbone, help="train only the FC layers (Table V)")
    semantic: str | None = option(StudentSpec.semantic, help="multimodal: also read the image's two-hot semantic "
                                                             "tag vector (Table XII; needs a dataset with tags)")

    def __post_init__(self):
        # StudentSpec's checks; the tag width is the dataset's, known at training (any positive one here)
        self.spec(StudentSpec.feature_width, StudentSpec.label, seed=0, tag_width=int(self.semantic is not None))

    def spec(self, feature_width: int, label: str, seed: int, tag_width: int = 0,
             tag_head: bool = False) -> StudentSpec:
        return StudentSpec(backbone=self.backbone, weights=self.weights, feature_width=feature_width, label=label,
                           view=self.view, freeze_backbone=self.freeze_backbone, seed=seed, semantic=self.semantic,
                           tag_width=tag_width, tag_head=tag_head)


@dataclass(frozen=True)
class LossConfig:
    """``LossSpec``'s keys, with its defaults and checks."""

    kind: str = option(LossSpec.kind, help=f"one of {', '.join(KINDS)}")
    feature_weight: float = option(LossSpec.feature_weight, help="weight of MSE(f_t, f_s)")
    output_weight: float = option(LossSpec.output_weight, help="weight of the output term (EMD/BCE/MSE)")
    alpha: float = option(LossSpec.alpha, help="ground truth's share in mixed_loss / mixed_label (paper: 0.5)")

    def __post_init__(self):
        self.spec()

    def spec(self) -> LossSpec:
        return LossSpec(**dataclasses.asdict(self))


@dataclass(frozen=True)
class TrainConfig:
    store: str = option(help="feature store URL")
    knowledge_entry: str = option(help="knowledge entry key (from ray_jobs.distill)")
    student: StudentConfig
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    max_unreadable_fraction: float = option(0.01, help="fail the run when more of an epoch's train images than "
                                                       "this cannot be read or no longer match the index")
    loss: LossConfig = field(default_factory=LossConfig)
    num_workers: int | tuple[int, ...] = option(2, help="DDP workers: a count, or [min, max] for an elastic run")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per worker")
    epochs: int = option(12, help="paper: 12")
    val_fraction: float = option(0.1, help="share of the train images held out (by image id) and scored every epoch; "
                                           "the dataset's own val split instead when it has one; 0: none")
    score_test: bool = option(True, help="score the test split once after the last epoch (the result's metrics); "
                                         "the pipeline scores it with the evaluate stage instead")
    global_batch_size: int = option(16, help="rows per optimizer step over all workers (paper: 16); each worker "
                                             "takes its share (± 1 row when the world size does not divide it)")
    micro_batch_size: int | None = option(None, help="most rows one worker forwards at once; fewer than its share "
                                                     "of the global batch means gradient accumulation")
    images: str = option("stored", help="stored: the student views decoded once into the store and reused | "
                                        "decode: read and decode every image every epoch")
    frozen_features: bool = option(True, help="a student with freeze_backbone trains its FC layers on the backbone's "
                                              "pooled features, computed once per image into the store from the "
                                              "stored views (seconds per run); false: the frozen backbone forwards "
                                              "every step")
    window_blocks: int = option(8, help="shuffle window: stored shards whose rows are mixed into batches")
    checkpoint_every_steps: int = option(0, help="also checkpoint every this many optimizer steps (0: per epoch only)")
    log_every_steps: int = option(50, help="print the running loss every this many steps (the only host sync)")
    deterministic: bool = option(False, help="deterministic kernels on GPU too (torch.use_deterministic_algorithms; "
                                             "slower). CPU runs are bit-reproducible without it")
    lr: float = option(3e-5, help="Adam; paper: 3e-5")
    lr_step_epochs: int = option(3, help="lr ÷ 10 every this many epochs; paper: 3")
    seed: int = option(0, help="initialisation and data order")
    storage_path: str = option("./ray_results", help="checkpoints: local directory or s3://bucket/prefix")
    name: str = option("student", help="run name; the same name resumes the run")
    max_failures: int = option(3, help="worker/node failures to recover from before giving up")
    device: str = option("auto", help="auto | cpu | cuda")
    ray_address: str | None = option(None, help="Ray cluster address; default RAY_ADDRESS or a local instance")
    num_cpus: int | None = option(None, help="logical CPUs of a local Ray instance (default max(4, cores))")

    def __post_init__(self):
        workers = (self.num_workers,) if isinstance(self.num_workers, int) else tuple(self.num_workers)
        if not 1 <= len(workers) <= 2 or min(workers) < 1 or workers != tuple(sorted(workers)):
            raise ConfigError(f"num_workers must be a count ≥ 1 or [min, max], got {self.num_workers!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ConfigError("max_unreadable_fraction must be between 0 and 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} must be auto, cpu or cuda")
        if self.images not in IMAGE_SOURCES:
            raise ConfigError(f"images {self.images!r} must be one of {', '.join(IMAGE_SOURCES)}")
        if self.pooled and self.images != "stored":
            raise ConfigError("frozen_features pools the stored views: with images=decode set frozen_features=false")
        for name in ("global_batch_size", "window_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ConfigError("micro_batch_size must be ≥ 1 (or unset)")
        if self.checkpoint_every_steps < 0 or self.log_every_steps < 0:
            raise ConfigError("checkpoint_every_steps and log_every_steps must be ≥ 0")
        try:
            for world_size in workers:
                batch_plan(self.global_batch_size, world_size, self.micro_batch_size)
        except BatchPlanError as exc:
            raise ConfigError(f"num_workers={self.num_workers!r}: {exc}") from None


    @property
    def pooled(self) -> bool:
        """Whether this run trains from stored pooled features (a frozen backbone)."""
        return self.student.freeze_backbone and self.frozen_features


def storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class TrainResult:
    """A finished student run: its ``checkpoint`` URI, ``metrics`` on the test split after the last
    epoch (srcc, plcc, acc, emd, n; empty with ``score_test: false``), ``history`` (every epoch's
    metrics, ``val_*`` on the validation set), ``epochs`` trained in
    all, ``train_rows`` rows seen in the last epoch and ``unreadable_rows`` of them skipped,
    ``global_batch_size``, the ``world_sizes`` the run used, optimizer ``steps`` per epoch, and
    the stored views it read (``views``: table key and images decoded by this run; None with
    ``images: decode``) and, for a frozen backbone with ``frozen_features``, the pooled features
    it trained from (``pooled``: feature table key and images pooled by this run)."""

    checkpoint: str | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    epochs: int
    train_rows: int | None
    unreadable_rows: int | None
    knowledge_entry: str
    loss: str
    student: dict[str, Any]
    global_batch_size: int
    world_sizes: list[int]
    steps: list[int]
    views: dict[str, Any] | None
    pooled: dict[str, Any] | None
    seconds: float


def train(cfg: TrainConfig) -> TrainResult:
    """Fit one student on Ray Train (resuming ``cfg.name`` when it has a checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.train_loop import load_history, train_loop_per_worker

    started = time.perf_counter()
    store = FeatureStore(cfg.store)
    knowledge = store.open(cfg.knowledge_entry)
    if knowledge.spec.kind != "knowledge":
        raise ConfigError(f"knowledge_entry {cfg.knowledge_entry} is a {knowledge.spec.kind!r} entry")
    label = knowledge.spec.producer["label"]
    check_loss(label, cfg.loss.kind)  # before any worker starts
    table = knowledge_table(cfg.dataset, store, knowledge)
    tag_width = check_tags(table, cfg.student.semantic, cfg.loss.kind)  # also before any worker starts
    student = cfg.student.spec(knowledge.layout.arrays[0].width, label, cfg.seed, tag_width=tag_width,
                               tag_head=cfg.loss.kind in TAG_LOSSES)
    if is_local(cfg.ray_address):  # the workers share this machine's files: check before starting them
        check_local_file(cfg.student.weights)
    init_ray(cfg.ray_address, cfg.num_cpus)
    gpus = cluster_gpus()
    if cfg.device == "cuda" and not gpus:
        raise ConfigError("device=cuda but the Ray cluster has no GPUs")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    workers = cfg.num_workers if isinstance(cfg.num_workers, int) else tuple(cfg.num_workers)
    workers = workers[0] if isinstance(workers, tuple) and len(workers) == 1 else workers
    log(JOB, f"student {student.backbone} ({student.view}) with loss {cfg.loss.kind} on {workers} "
             f"{'GPU' if use_gpu else 'CPU'} worker(s); knowledge {cfg.knowledge_entry}")
    hashes = knowledge_hashes(knowledge)
    views = prepare_views(store.url, table, hashes, student, use_gpu, cfg.val_fraction) \
        if cfg.images == "stored" else None
    pooled = ensure_pooled(store.url, student, views, hashes, use_gpu,
                           log=lambda line: log(JOB, line)) if cfg.pooled else None
    loop_config = {"store": store.url, "knowledge_entry": cfg.knowledge_entry, "student": student.to_json(),
                   "dataset_table": put_table(store, table), "max_unreadable_fraction": cfg.max_unreadable_fraction,
                   "loss": as_dict(cfg.loss), "epochs": cfg.epochs, "global_batch_size": cfg.global_batch_size,
                   "micro_batch_size": cfg.micro_batch_size, "lr": cfg.lr, "lr_step_epochs": cfg.lr_step_epochs,
                   "seed": cfg.seed, "images": cfg.images, "val_fraction": cfg.val_fraction,
                   "score_test": cfg.score_test, "view": views.view.to_json() if views else None,
                   "pooled": pooled.extractor.to_json() if pooled else None,
                   "window_blocks": cfg.window_blocks, "checkpoint_every_steps": cfg.checkpoint_every_steps,
                   "log_every_steps": cfg.log_every_steps, "deterministic": cfg.deterministic}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage_uri(cfg.storage_path),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train raises the workers' errors wrapped
        if (error := find_user_error(exc)) is not None:  # e.g. UnreadableImages: its own message, no tracebacks
            raise error from None
        raise
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    metrics = result.metrics or {}
    test = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")}
    history = []
    if result.checkpoint:
        with result.checkpoint.as_directory() as directory:
            history = load_history(directory)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" not in checkpoint and cfg.storage_path.startswith("s3://"):
        checkpoint = f"s3://{checkpoint}"
    log(JOB, f"done: checkpoint {checkpoint}; test {test}")
    return TrainResult(checkpoint=checkpoint, metrics=test, history=history, epochs=metrics.get("epoch", -1) + 1,
                       train_rows=metrics.get("train_rows_seen"), unreadable_rows=metrics.get("unreadable_rows"),
                       knowledge_entry=cfg.knowledge_entry, loss=cfg.loss.kind, student=student.to_json(),
                       global_batch_size=cfg.global_batch_size,
                       world_sizes=history[-1]["world_sizes"] if history else [],
                       steps=[h["steps"] for h in history],
                       views={"table": pixels_key(views.view), "decoded": views.decoded} if views else None,
                       pooled={"table": extractor_key(pooled.extractor), "computed": pooled.computed} if pooled else None,
                       seconds=round(time.perf_counter() - started, 3))


def prepare_views(store_url: str, table, hashes: np.ndarray, student: StudentSpec, use_gpu: bool,
                  val_fraction: float) -> StoredViews:
    """Decode the student views that the run's train, validation and test images lack into the
    store, one set after the other: each set's images then sit in shards of their own, so
    validating reads only validation images."""
    view, decoded = pixel_view(student.view, use_gpu), 0
    for rows in student_splits(table, hashes, student.label, val_fraction).values():
        distinct, first = np.unique(rows.sha256, return_index=True)
        views = ensure_views(store_url, view, distinct, [rows.uris[i] for i in first], log=lambda line: log(JOB, line))
        decoded += views.decoded
    log(JOB, f"student views {pixels_key(view)}: {decoded} images decoded by this run, {len(views.index)} stored")
    return dataclasses.replace(views, decoded=decoded)

