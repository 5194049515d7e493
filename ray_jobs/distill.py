"""Knowledge distiller: fit BN + 3×Linear on stored GSFs, write teacher knowledge into the store.

    python -m ray_jobs.distill --config configs/distill_demo.yaml [key=value ...]

``gsf_entry`` is the GSF entry that ``ray_jobs.extract`` reported, or the path of the extraction
config that produced it. ``dataset.path`` / ``dataset.format`` name the labelled dataset to fit
on (default: the one recorded at extraction; a moved or relabelled copy joins the features by
image hash) and ``dataset.split`` the split (``official``, ``file:PATH``, ``cv:K:FOLD[:SEED]``,
``random:FRACTION:SEED``). Any subset of the entry's backbones can be chosen by name, so the
ablations of Tables I–III need no re-extraction. Knowledge with the same features, labels,
split and distiller spec (including seed) is reused without refitting. The fit runs in this
process, or on one GPU worker when the Ray cluster has GPUs and this driver has none. Last
stdout line: JSON with entry, gsf_entry, reused, test (srcc, plcc, acc, emd), train_rows,
test_rows, rows_without_features, seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from featurestore.backends import StoreError
from featurestore.datasets import DatasetError
from featurestore.sources import SourceError
from featurestore.splits import SplitError
from featurestore.reader import EntryNotFound
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, load_config, option, run_job
from ray_jobs.dataset_input import DatasetConfig, load_table
from ray_jobs.runtime import cluster_gpus, init_ray, is_local, log
from trainers.distiller import LABELS, DistillerSpec
from trainers.knowledge import KnowledgeError, distill

JOB = "distill"


@dataclass(frozen=True)
class DistillConfig:
    store: str = option(help="feature store URL (local directory or s3://bucket/prefix)")
    gsf_entry: str = option(help="GSF entry key, or the path of the extraction config that made it")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    backbones: tuple[str, ...] = option((), help="subset of the entry's backbones; empty = all")
    label: str = option("distribution", help=f"one of {', '.join(LABELS)}")
    seed: int = option(0, help="initialisation and shuffling seed (part of the knowledge key)")
    hidden: tuple[int, ...] = option((2048, 512), help="widths of the first two Linear layers; the second is |f_t|")
    epochs: int = option(12, help="paper: 12")
    batch_size: int = option(512, help="paper: 512")
    lr: float = option(3e-5, help="Adam learning rate; paper: 3e-5")
    lr_step_epochs: int = option(3, help="divide the lr by 10 every this many epochs; paper: 3")
    matching: bool = option(False, help="also run the Table IV matching analysis (GSF vs f_t nearest neighbour)")
    ray_address: str | None = option(None, help="Ray cluster address; default RAY_ADDRESS or none (local)")

    def __post_init__(self):
        if self.label not in LABELS:
            raise ConfigError(f"label {self.label!r} is not one of {LABELS}")
        if len(self.hidden) != 2:
            raise ConfigError("hidden needs exactly two widths, e.g. [2048, 512]")

    def spec(self) -> DistillerSpec:
        return DistillerSpec(backbones=self.backbones, label=self.label, hidden=tuple(self.hidden),
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             lr_step_epochs=self.lr_step_epochs, seed=self.seed)


def resolve_gsf_entry(cfg: DistillConfig, store: FeatureStore) -> str:
    if not cfg.gsf_entry.endswith((".yaml", ".yml")):
        return cfg.gsf_entry
    from ray_jobs.extract import ExtractConfig, resolve_entry

    return resolve_entry(load_config(ExtractConfig, cfg.gsf_entry, [f"store={cfg.store}"]), store)


def run(store_url: str, gsf_entry: str, spec: DistillerSpec, dataset: DatasetConfig, matching: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = load_table(dataset) if dataset.path else None
    return distill(FeatureStore(store_url), gsf_entry, spec, device, table, dataset.split_spec(), matching,
                   log=lambda m: log(JOB, m))


def main(cfg: DistillConfig) -> dict:
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


if __name__ == "__main__":
    sys.exit(run_job(JOB, DistillConfig, main, user_errors=(KnowledgeError, StoreError, EntryNotFound, DatasetError,
                                                            SplitError, SourceError)))
