"""A dataset's view of a feature table: the ``gsf`` entry that extraction reports.

The view is cheap and separate from the features it points at. It holds the dataset table
(ids, URIs, hashes, the dataset's own split, labels; Parquet, ``blobs/dataset.parquet``), the
per-row feature status (ok, or failed with the reason), and the segments whose rows it uses
(``attrs.uses``: lineage, and what gc must keep). Its key hashes the extractor and the whole
dataset table, URIs included: a re-split, a relabel or a move makes a new view in seconds,
with no forward pass, because the features are found by image hash.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .dataset_table import DatasetTable
from .dataset_table import MISSING_HASH, hashes_to_hex
from .features import FeatureIndex, extractor_key, read_features, table_segments, write_segment
from .layout import STATUS_ARRAY, EntryLayout
from .reader import EntryReader
from .specs import EntrySpec, ExtractorSpec
from .store import FeatureStore

VIEW_KIND = "gsf"
DATASET_BLOB = "dataset.parquet"
VIEW_SHARD_ROWS = 65536
DATASETS_PREFIX = "_datasets"


def view_spec(extractor: ExtractorSpec, dataset: DatasetTable) -> EntrySpec:
    return EntrySpec(kind=VIEW_KIND, identity={"extractor": extractor.to_json(),
                                                "dataset": dataset.content_digest(with_uris=True),
                                                "rows": len(dataset)})


def write_view(store: FeatureStore, extractor: ExtractorSpec, dataset: DatasetTable, index: FeatureIndex,
               failures: dict[str, str], attrs: dict[str, Any] | None = None) -> EntryReader:
    """Create (or finish) the view of ``dataset`` over ``index``; returns it, complete.

    ``failures`` maps an image hash (hex) to its failure reason, for rows whose image
    failed in every segment; missing files fail by themselves.
    """
    spec = view_spec(extractor, dataset)
    if (done := store.find(spec)) is not None:
        return done
    found, segment, _ = index.lookup(dataset.sha256)
    used = tuple(index.segments[s] for s in sorted(set(segment[found].tolist())))
    layout = EntryLayout(rows=len(dataset), shard_rows=VIEW_SHARD_ROWS, chunk_rows=VIEW_SHARD_ROWS // 8, arrays=())
    writer = store.create(spec, layout, attrs={
        **(attrs or {}), "extractor": extractor_key(extractor), "uses": list(used),
        "columns": {name: list(r) for name, r in extractor.column_ranges().items()}})
    writer.write_blob(DATASET_BLOB, dataset.to_parquet())
    writer.write_document("segments", {"segments": list(used)})
    missing = dataset.missing
    for shard in writer.missing_shards():
        start, stop = layout.shard_range(shard)
        reasons = {}
        for r in np.flatnonzero(~found[start:stop]) + start:
            reasons[int(r)] = (f"missing file {dataset.uris[r]} (absent when the dataset was indexed)"
                               if missing[r] else failures.get(hashes_to_hex(dataset.sha256[r:r + 1])[0], "features not extracted"))
        writer.write_shard(shard, {}, failures=reasons)
    writer.finalize({"summary": attrs.get("summary") if attrs else None})
    return store.open(spec.key)


def import_features(store: FeatureStore, extractor: ExtractorSpec, dataset: DatasetTable, gsf: np.ndarray,
                    failures: dict[int, str] | None = None, shard_rows: int = 1024) -> EntryReader:
    """Store features computed elsewhere for ``dataset``'s rows (``gsf`` row-aligned with it,
    ``failures`` by dataset row) and return the dataset's complete view of them."""
    hashes, first = np.unique(dataset.sha256, return_index=True)
    keep = hashes != MISSING_HASH
    hashes, first = hashes[keep], first[keep]
    row_failures = dict(failures or {})
    segment_failures = {i: row_failures[int(r)] for i, r in enumerate(first) if int(r) in row_failures}
    write_segment(store, extractor, hashes, np.asarray(gsf)[first], segment_failures, shard_rows)
    index = FeatureIndex.build(store, table_segments(store, extractor))
    reasons = {hashes_to_hex(hashes[i:i + 1])[0]: why for i, why in segment_failures.items()}
    return write_view(store, extractor, dataset, index, reasons)


def put_table(store: FeatureStore, table: DatasetTable) -> str:
    """Store ``table`` content-addressed under ``_datasets/`` (once) and return its path, so
    workers read the very table the driver resolved instead of indexing the dataset again."""
    path = f"{DATASETS_PREFIX}/{table.content_digest(with_uris=True)[:32]}.parquet"
    if not store.backend.exists(path):
        store.backend.write_bytes(path, table.to_parquet())
    return path


def get_table(store: FeatureStore, path: str, columns: Sequence[str] | None = None) -> DatasetTable:
    data = store.backend.read_buffer(path)
    if data is None:
        raise FileNotFoundError(f"store {store.url} has no dataset table {path}")
    return DatasetTable.from_parquet(data, columns)


class GsfView:
    """Read side of a view: its dataset, per-row feature status, and GSF rows by dataset row."""

    def __init__(self, store: FeatureStore, key: str):
        self.store = store
        self.entry = store.open(key)
        if self.entry.spec.kind != VIEW_KIND:
            raise ValueError(f"entry {key} is a {self.entry.spec.kind!r} entry, not a GSF view "
                             "(the 'entry' that ray_jobs.extract reports)")
        self.key = key
        self.extractor = ExtractorSpec.from_json(self.entry.spec.identity["extractor"])
        self.segments: tuple[str, ...] = tuple(self.entry.attrs["uses"])
        self._index: FeatureIndex | None = None
        self._segments: dict = {}  # opened segment readers, by index position

    @property
    def rows(self) -> int:
        return self.entry.rows

    @property
    def columns(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(r) for name, r in self.entry.attrs["columns"].items()}

    @property
    def index(self) -> FeatureIndex:
        if self._index is None:
            self._index = FeatureIndex.build(self.store, self.segments)
        return self._index

    def dataset(self, columns: Sequence[str] | None = None) -> DatasetTable:
        return DatasetTable.from_parquet(self.entry.read_blob(DATASET_BLOB), columns)

    def status(self) -> np.ndarray:
        return self.entry.array(STATUS_ARRAY)[:]

    def failures(self) -> dict[int, str]:
        return self.entry.failures()

    def features(self, hashes: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """GSF rows (float16) of images by hash; every hash must have ok features here."""
        return read_features(self.store, self.index, hashes, columns, self._segments)

