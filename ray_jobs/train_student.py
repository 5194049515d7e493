"""Student training: Ray Train DDP workers stream images + teacher knowledge and fit the KD loss.

    python -m ray_jobs.train_student --config configs/train_student_demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ray_jobs.train_student --config FILE ...

Each worker streams its own partition of the train split from the dataset and the knowledge
entry; nothing is gathered on the driver. ``num_workers`` is a count or a ``[min, max]`` range:
the run is elastic and uses as many workers as the cluster offers. A checkpoint is written every
epoch to ``storage_path/name``. A killed worker or node resumes from the last checkpoint (up to
``max_failures`` times), and running again under the same ``name`` resumes the run. The last
stdout line is JSON: ``checkpoint`` (URI), ``metrics`` (srcc, plcc, acc, emd on the test split),
``history`` (per-epoch metrics), ``seconds``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.backends import StoreError
from featurestore.datasets import DatasetError
from featurestore.sources import SourceError
from featurestore.splits import SplitError
from featurestore.reader import EntryNotFound
from featurestore.store import FeatureStore
from featurestore.views import put_table
from ray_jobs.config import ConfigError, as_dict, option, run_job
from ray_jobs.dataset_input import DatasetConfig, knowledge_table
from ray_jobs.runtime import cluster_gpus, init_ray, is_local, log
from trainers.losses import KINDS, LossSpec
from trainers.student import StudentSpec
from trainers.train_loop import UnreadableImages
from trainers.weights import WeightsError, check_local_file

JOB = "train_student"


@dataclass(frozen=True)
class StudentConfig:
    backbone: str = option(help="timm name or alias, e.g. swsl_resnext101_32x8d, resnet50, tf_efficientnet_lite0")
    weights: str = option("random:0", help="hub | packaged | random:<seed> | path | s3:// URI (backbone only)")
    view: str = option("resize:300", help="resize:<S> | resize:<H>x<W> | pad_crop:800:640 (Table VII)")
    freeze_backbone: bool = option(False, help="train only the FC layers (Table V)")


@dataclass(frozen=True)
class LossConfig:
    kind: str = option("kd", help=f"one of {', '.join(KINDS)}")
    feature_weight: float = option(1.0, help="weight of MSE(f_t, f_s)")
    output_weight: float = option(1.0, help="weight of the output term (EMD/BCE/MSE)")
    alpha: float = option(0.5, help="ground truth's share in mixed_loss / mixed_label (paper: 0.5)")


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
    batch_size: int = option(16, help="per worker; paper: 16")
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
        if not 0 <= self.max_unreadable_fraction <= 1:
            raise ConfigError("max_unreadable_fraction must be between 0 and 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} must be auto, cpu or cuda")
        try:
            LossSpec(**as_dict(self.loss))
        except ValueError as exc:
            raise ConfigError(f"loss: {exc}") from None


def storage_uri(path: str) -> str:
    return path if "://" in path else str(Path(path).expanduser().resolve())


def main(cfg: TrainConfig) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from trainers.train_loop import load_history, train_loop_per_worker

    started = time.perf_counter()
    store = FeatureStore(cfg.store)
    knowledge = store.open(cfg.knowledge_entry)
    if knowledge.spec.kind != "knowledge":
        raise ConfigError(f"knowledge_entry {cfg.knowledge_entry} is a {knowledge.spec.kind!r} entry")
    label = knowledge.spec.producer["label"]
    student = StudentSpec(backbone=cfg.student.backbone, weights=cfg.student.weights,
                          feature_width=knowledge.layout.arrays[0].width, label=label, view=cfg.student.view,
                          freeze_backbone=cfg.student.freeze_backbone, seed=cfg.seed)
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
    table = knowledge_table(cfg.dataset, store, knowledge)
    loop_config = {"store": store.url, "knowledge_entry": cfg.knowledge_entry, "student": student.to_json(),
                   "dataset_table": put_table(store, table), "max_unreadable_fraction": cfg.max_unreadable_fraction,
                   "loss": as_dict(cfg.loss), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "lr_step_epochs": cfg.lr_step_epochs, "seed": cfg.seed}
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
        marker = f"{UnreadableImages.__name__}: "
        if marker in str(exc):  # a user's problem: one clear message, not the workers' tracebacks
            raise UnreadableImages(str(exc).split(marker, 1)[1].strip().splitlines()[0]) from None
        raise
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")
    metrics = result.metrics or {}
    test = {k.removeprefix("val_"): metrics[k] for k in ("val_srcc", "val_plcc", "val_acc", "val_emd", "val_n")
            if k in metrics}
    history = []
    if result.checkpoint:
        with result.checkpoint.as_directory() as directory:
            history = load_history(directory)
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and "://" not in checkpoint and cfg.storage_path.startswith("s3://"):
        checkpoint = f"s3://{checkpoint}"
    log(JOB, f"done: checkpoint {checkpoint}; test {test}")
    return {"checkpoint": checkpoint, "metrics": test, "history": history, "epochs": metrics.get("epoch", -1) + 1,
            "train_rows": metrics.get("train_rows_seen"), "unreadable_rows": metrics.get("unreadable_rows"),
            "knowledge_entry": cfg.knowledge_entry, "loss": cfg.loss.kind, "student": student.to_json(),
            "seconds": round(time.perf_counter() - started, 3)}


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    sys.exit(run_job(JOB, TrainConfig, main, user_errors=(StoreError, EntryNotFound, WeightsError, DatasetError,
                                                          SplitError, SourceError, UnreadableImages)))
