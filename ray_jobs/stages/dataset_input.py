"""The ``dataset:`` section every job shares: where the images are now, and which split to use.

Extraction needs a dataset; every later job may name one (a moved copy, a relabelled CSV, a
re-split) or leave ``path`` out to use the dataset recorded at extraction. The split is applied
here, on top of the dataset's own one, so that a re-split never touches features.
"""

from __future__ import annotations

from dataclasses import dataclass

from featurestore.dataset_table import DatasetTable
from featurestore.datasets import FORMATS, IndexedDataset, index_dataset, load_dataset
from featurestore.reader import EntryReader
from featurestore.store import FeatureStore
from featurestore.views import GsfView
from featurestore.splits import SplitError, SplitSpec
from ray_jobs.config import ConfigError, option


@dataclass(frozen=True)
class DatasetConfig:
    path: str | None = option(None, help="dataset root (local dir or s3://bucket/prefix), or the CSV file for "
                                         "format=csv; omitted: the dataset recorded at extraction")
    format: str = option("ava", help=f"one of {', '.join(FORMATS)}")
    name: str | None = option(None, help="dataset name; default from the format")
    test_fraction: float | None = option(None, help="hash-based test split for data without one")
    split: str | None = option(None, help="official | file:PATH | cv:K:FOLD[:SEED] | random:FRACTION:SEED; "
                                          "default: official for distill, the knowledge's split after it")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"dataset.format {self.format!r} is not one of {FORMATS}")
        if self.split is not None:
            try:
                SplitSpec.parse(self.split)
            except SplitError as exc:
                raise ConfigError(f"dataset.split: {exc}") from None

    def split_spec(self, default: str = "official") -> SplitSpec:
        return SplitSpec.parse(self.split or default)


def knowledge_table(cfg: DatasetConfig, store: FeatureStore, knowledge: EntryReader) -> DatasetTable:
    """The labelled dataset a student of ``knowledge`` trains or is scored on: ``cfg.path`` when
    given (a moved or relabelled copy), else the one recorded at extraction; split by
    ``cfg.split``, else by the split the knowledge was fitted with."""
    table = load_table(cfg) if cfg.path else GsfView(store, knowledge.attrs["view"]).dataset()
    return table.resplit(cfg.split_spec(knowledge.attrs.get("split") or "official"))


def load_table(cfg: DatasetConfig) -> DatasetTable:
    """Index the dataset at ``cfg.path`` (hashes come from the cache when files are unchanged)."""
    if cfg.path is None:
        raise ConfigError("dataset.path is required here")
    manifest = load_dataset(cfg.path, cfg.format, name=cfg.name, test_fraction=cfg.test_fraction)
    return DatasetTable.from_manifest(manifest)


def index_table(cfg: DatasetConfig) -> IndexedDataset:
    """:func:`load_table` without reading the images the hash cache does not know (the
    extraction job has its workers hash those as they read them)."""
    if cfg.path is None:
        raise ConfigError("dataset.path is required here")
    return index_dataset(cfg.path, cfg.format, name=cfg.name, test_fraction=cfg.test_fraction)
