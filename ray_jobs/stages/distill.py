"""The distillation stage: fit BN + 3×Linear on stored GSFs, write teacher knowledge into the store.

``gsf_entry`` is the GSF view that the extraction stage reported, or the path of the extraction
config that produced it. ``dataset.path`` / ``dataset.format`` name the labelled dataset to fit
on (default: the one recorded at extraction; a moved or relabelled copy joins the features by
image hash) and ``dataset.split`` the split. Any subset of the entry's backbones can be chosen by
name, so the ablations of Tables I–III need no re-extraction. Knowledge with the same features,
labels, split and distiller spec (including seed) is reused without refitting. The fit runs in
this process, or on one GPU worker when the Ray cluster has GPUs and this driver has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from featurestore.store import FeatureStore
from ray_jobs.config import load_config, option
from ray_jobs.stages.dataset_input import DatasetConfig, load_table
from ray_jobs.runtime import cluster_gpus, init_ray, is_local, log
from trainers.distiller import DistillerSpec
from trainers.labels import LABELS
from trainers.knowledge import distill as fit_knowledge

JOB = "distill"


@dataclass(frozen=True)
class DistillConfig:
    """The distiller's keys are ``DistillerSpec``'s, with its defaults and checks (one definition
    each), plus where to read and what to run."""

    store: str = option(help="feature store URL (local directory or s3://bucket/prefix)")
    gsf_entry: str = option(help="GSF entry key, or the path of the extraction config that made it")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbones: tuple[str, ...] = option((), help="subset of the entry's backbones; empty = all")
    label: str = option(DistillerSpec.label, help=f"one of {', '.join(LABELS)}")
    seed: int = option(DistillerSpec.seed, help="initialisation and shuffling seed (part of the knowledge key)")
    hidden: tuple[int, ...] = option(DistillerSpec.hidden, help="widths of the first two Linear layers; the "
                                                                "second is |f_t|")
    epochs: int = option(DistillerSpec.epochs, help="paper: 12")
    batch_size: int = option(DistillerSpec.batch_size, help="paper: 512")
    lr: float = option(DistillerSpec.lr, help="Adam learning rate; paper: 3e-5")
    lr_step_epochs: int = option(DistillerSpec.lr_step_epochs, help="divide the lr by 10 every this many epochs; "
                                                                    "paper: 3")
    matching: bool = option(False, help="also run the Table IV matching analysis (GSF vs f_t nearest neighbour)")
    ray_address: str | None = option(None, help="Ray cluster address; default RAY_ADDRESS or none (local)")

    def __post_init__(self):
        self.spec()  # DistillerSpec's checks; the loader reports them as config errors

    def spec(self) -> DistillerSpec:
        return DistillerSpec(backbones=self.backbones, label=self.label, hidden=tuple(self.hidden),
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             lr_step_epochs=self.lr_step_epochs, seed=self.seed)


def resolve_gsf_entry(cfg: DistillConfig, store: FeatureStore) -> str:
    if not cfg.gsf_entry.endswith((".yaml", ".yml")):
        return cfg.gsf_entry
    from ray_jobs.stages.extract import ExtractConfig, resolve_entry

    return resolve_entry(load_config(ExtractConfig, cfg.gsf_entry, [f"store={cfg.store}"]), store)


@dataclass(frozen=True)
class DistillResult:
    """The knowledge ``entry`` fitted (or ``reused``) on ``gsf_entry``; ``test`` the teacher's
    metrics on the split's test rows (srcc, plcc, acc, emd); ``rows_without_features`` dataset
    rows the view has no features for (failed images); ``matching`` Table IV's analysis when
    asked for; ``seconds`` the fit's wall time (0 when reused)."""

    entry: str
    gsf_entry: str
    reused: bool
    test: dict[str, Any] | None
    train_rows: int
    test_rows: int
    rows_without_features: int
    seconds: float
    matching: dict[str, Any] | None = None


def plan_distill(cfg: DistillConfig, store: FeatureStore | None) -> dict:
    """The knowledge entry ``distill(cfg)`` would fit or reuse (``entry`` None while its GSF view
    does not exist yet: its key depends on which images have features), found without fitting."""
    from featurestore.views import GsfView
    from trainers.knowledge import knowledge_entry_spec

    if store is None or store.state(cfg.gsf_entry) != "complete":
        return {"entry": None, "reused": False}
    table = load_table(cfg.dataset) if cfg.dataset.path else None
    entry = knowledge_entry_spec(GsfView(store, cfg.gsf_entry), cfg.spec(), table, cfg.dataset.split_spec())
    return {"entry": entry.key, "reused": store.state(entry.key) == "complete"}


def run(store_url: str, gsf_entry: str, spec: DistillerSpec, dataset: DatasetConfig, matching: bool) -> DistillResult:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = load_table(dataset) if dataset.path else None
    return DistillResult(**fit_knowledge(FeatureStore(store_url), gsf_entry, spec, device, table,
                                         dataset.split_spec(), matching, log=lambda m: log(JOB, m)))


def distill(cfg: DistillConfig) -> DistillResult:
    """Fit the distiller on ``cfg``'s split of the view's features, or reuse the knowledge entry."""
    store = FeatureStore(cfg.store)
    gsf_entry = resolve_gsf_entry(cfg, store)
    log(JOB, f"GSF entry {gsf_entry}, split {cfg.dataset.split}")
    if is_local(cfg.ray_address):
        return run(store.url, gsf_entry, cfg.spec(), cfg.dataset, cfg.matching)
    init_ray(cfg.ray_address)
    if torch.cuda.is_available() or not cluster_gpus():
        return run(store.url, gsf_entry, cfg.spec(), cfg.dataset, cfg.matching)
    import ray

    task = ray.remote(num_gpus=1)(run)
    return ray.get(task.remote(store.url, gsf_entry, cfg.spec(), cfg.dataset, cfg.matching))

