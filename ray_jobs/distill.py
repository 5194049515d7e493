"""Knowledge distiller: fit BN + 3×Linear on stored GSFs, write teacher knowledge into the store.

    python -m ray_jobs.distill --config configs/distill_demo.yaml [key=value ...]

``gsf_entry`` is a GSF entry key, or the path of the extraction config that produced it. Any
subset of that entry's backbones can be chosen by name (their recorded column ranges), so the
ablations of Tables I–III need no re-extraction. A knowledge entry with the same parent and
distiller spec (including seed) is reused without refitting. The fit runs in this process, or
on one GPU worker when the Ray cluster has GPUs and this driver has none. Last stdout line: JSON
with entry, parent, reused, test (srcc, plcc, acc, emd), train_rows, test_rows, seconds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from featurestore.backends import StoreError
from featurestore.reader import EntryNotFound
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, load_config, option, run_job
from ray_jobs.runtime import cluster_gpus, init_ray, is_local, log
from trainers.distiller import LABELS, DistillerSpec
from trainers.knowledge import KnowledgeError, distill

JOB = "distill"


@dataclass(frozen=True)
class DistillConfig:
    store: str = option(help="feature store URL (local directory or s3://bucket/prefix)")
    gsf_entry: str = option(help="GSF entry key, or the path of the extraction config that made it")
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


def run(store_url: str, parent: str, spec: DistillerSpec, matching: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return distill(FeatureStore(store_url), parent, spec, device, matching, log=lambda m: log(JOB, m))


def main(cfg: DistillConfig) -> dict:
    store = FeatureStore(cfg.store)
    parent = resolve_gsf_entry(cfg, store)
    log(JOB, f"GSF entry {parent}")
    if is_local(cfg.ray_address):
        return run(store.url, parent, cfg.spec(), cfg.matching)
    init_ray(cfg.ray_address)
    if torch.cuda.is_available() or not cluster_gpus():
        return run(store.url, parent, cfg.spec(), cfg.matching)
    import ray

    task = ray.remote(num_gpus=1)(run)
    return ray.get(task.remote(store.url, parent, cfg.spec(), cfg.matching))


if __name__ == "__main__":
    sys.exit(run_job(JOB, DistillConfig, main, user_errors=(KnowledgeError, StoreError, EntryNotFound)))
