"""Features belong to images: one feature table per extractor, keyed by image content.

A GSF row is determined by the image's bytes (SHA-256) and the extractor spec, and by nothing a
dataset adds (labels, splits, names, URIs, row order). So features are stored per extractor, as
immutable **segments**: ordinary entries (kind ``gsfseg``) whose rows are distinct image hashes
in sorted order, with the ``gsf`` array and a ``sha256`` array row-aligned. A segment's key
hashes the extractor and its hash list, so it is a pure function of what it holds: a killed
extraction that plans the same new images resumes the same segment, shard by shard.

A first extraction (the extractor's table is empty, so there is nothing to reuse) does not
hash images before it plans: its segment's rows are the images of known hash, as above, then
the not yet hashed ones in dataset order, keyed by their URI, size and version; the workers
that read each image to decode it hash it and write the hash into ``sha256``. So every image
is read once, and the ``sha256`` array, not the key, says which image a row holds (the same
bytes under two URIs then take two rows; the index uses the first).

An extraction computes only the hashes the extractor's table lacks, as one new segment; a
dataset that gains k images costs k forward passes, and images shared by two datasets (or
repeated in one) are computed once. A finished segment is registered under
``_tables/<extractor key>/``, so finding the table's segments is one listing, not a walk over
every entry in the store.

Rows that failed (undecodable bytes, a file that changed since indexing) are never reused as
answers: an image whose only row failed is planned again by the next extraction that needs it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .dataset_table import HASH_DTYPE, MISSING_HASH, hash_bytes, hashes_of
from .layout import STATUS_OK
from .reader import EntryReader
from .specs import EntrySpec, ExtractorSpec, entry_key
from .store import FeatureStore

SEGMENT_KIND = "gsfseg"
GSF_ARRAY = "gsf"
HASH_ARRAY = "sha256"
TABLES_PREFIX = "_tables"


def extractor_key(extractor: ExtractorSpec) -> str:
    """``extractor-<24 hex>``: names the feature table of one extractor."""
    return entry_key("extractor", extractor.to_json())


def segment_spec(extractor: ExtractorSpec, hashes: np.ndarray, unhashed: Sequence[str] = ()) -> EntrySpec:
    """The spec of a segment holding exactly ``hashes`` (sorted, distinct) under ``extractor``,
    then the images known by the ``unhashed`` fingerprints (``IndexedDataset.fingerprints``)."""
    images = hashlib.sha256(hash_bytes(hashes).tobytes()).hexdigest()
    identity = {"extractor": extractor.to_json(), "images": images, "rows": int(len(hashes) + len(unhashed))}
    if unhashed:  # absent otherwise, so the keys of segments of hashed images do not depend on this
        identity["unhashed"] = hashlib.sha256("\n".join(unhashed).encode()).hexdigest()
    return EntrySpec(kind=SEGMENT_KIND, identity=identity)


def write_segment(store: FeatureStore, extractor: ExtractorSpec, hashes: np.ndarray, gsf: np.ndarray,
                  failures: dict[int, str] | None = None, shard_rows: int = 1024) -> EntryReader:
    """Write features computed elsewhere as one complete, registered segment.

    ``hashes`` are sorted and distinct, ``gsf`` [n, width] row-aligned; ``failures`` maps a row
    to its reason (its features are stored as zeros). Extraction writes segments shard by shard
    from its workers; this is the same layout for features that already exist (and for tests).
    """
    from .layout import ArraySpec, EntryLayout

    spec = segment_spec(extractor, hashes)
    if (done := store.find(spec)) is None:
        layout = EntryLayout(rows=len(hashes), shard_rows=shard_rows, chunk_rows=math.gcd(32, shard_rows),
                             arrays=(ArraySpec(GSF_ARRAY, extractor.width, extractor.dtype),
                                     ArraySpec(HASH_ARRAY, 32, "uint8")))
        writer = store.create(spec, layout, attrs={"columns": {n: list(r) for n, r in extractor.column_ranges().items()}})
        raw, failures = hash_bytes(hashes), dict(failures or {})
        for shard in writer.missing_shards():
            start, stop = layout.shard_range(shard)
            block = np.array(gsf[start:stop], extractor.dtype)
            mine = {r: why for r, why in failures.items() if start <= r < stop}
            block[[r - start for r in mine]] = 0
            writer.write_shard(shard, {GSF_ARRAY: block, HASH_ARRAY: raw[start:stop]}, failures=mine)
        writer.finalize()
        done = store.open(spec.key)
    register_segment(store, extractor, done)
    return done


def registration_path(table: str, segment: str) -> str:
    return f"{TABLES_PREFIX}/{table}/{segment}.json"


def segment_table(segment: EntryReader) -> str:
    """The table a segment belongs to: its ``attrs.table`` (image views, pixels.py), else the
    feature table of its extractor."""
    return segment.attrs.get("table") or extractor_key(ExtractorSpec.from_json(segment.spec.identity["extractor"]))


def register_in_table(store: FeatureStore, table: str, segment: EntryReader) -> None:
    """Record a complete segment in ``table`` (idempotent)."""
    store.backend.create_json(registration_path(table, segment.key), {"segment": segment.key, "rows": segment.rows})


def register_segment(store: FeatureStore, extractor: ExtractorSpec, segment: EntryReader) -> None:
    """Record a complete feature segment in its extractor's table (idempotent)."""
    register_in_table(store, extractor_key(extractor), segment)


def unregister_segment(store: FeatureStore, segment: EntryReader) -> None:
    """Drop a segment from its table; the store's gc does this before deleting the entry."""
    import obstore

    path = registration_path(segment_table(segment), segment.key)
    if store.backend.exists(path):
        obstore.delete(store.backend.objects, path)


def registered_segments(store: FeatureStore, table: str) -> tuple[str, ...]:
    """Keys of the complete segments registered in ``table``, sorted."""
    keys = [o["path"].rsplit("/", 1)[-1].removesuffix(".json") for o in store.backend.list(f"{TABLES_PREFIX}/{table}/")]
    return tuple(sorted(k for k in keys if store.state(k) == "complete"))


def table_segments(store: FeatureStore, extractor: ExtractorSpec) -> tuple[str, ...]:
    """Keys of the complete segments registered for ``extractor``, sorted."""
    return registered_segments(store, extractor_key(extractor))


@dataclass(frozen=True, eq=False)
class FeatureIndex:
    """Where each image's features are: sorted hashes → (segment, row), ok rows only.

    Built from the segments' ``sha256`` and ``status`` arrays (33 bytes per row), so it stays
    small next to the features: 330 MB for 10M images.
    """

    segments: tuple[str, ...]
    hashes: np.ndarray   # S32, sorted, distinct
    segment: np.ndarray  # int32 index into ``segments``
    row: np.ndarray      # int64 row inside that segment

    @classmethod
    def build(cls, store: FeatureStore, segments: Iterable[str]) -> FeatureIndex:
        segments = tuple(segments)
        hashes, where, rows = [], [], []
        for i, key in enumerate(segments):
            reader = store.open(key)
            raw = reader.read_range(0, reader.rows, [HASH_ARRAY])[HASH_ARRAY]
            ok = np.flatnonzero(reader.status() == STATUS_OK)
            hashes.append(hashes_of(raw)[ok])
            where.append(np.full(len(ok), i, np.int32))
            rows.append(ok.astype(np.int64))
        if not segments:
            return cls((), np.zeros(0, HASH_DTYPE), np.zeros(0, np.int32), np.zeros(0, np.int64))
        hashes, where, rows = np.concatenate(hashes), np.concatenate(where), np.concatenate(rows)
        # A hash committed in two segments (racing extractions) resolves to the first segment.
        order = np.lexsort((where, hashes))
        hashes, where, rows = hashes[order], where[order], rows[order]
        first = np.ones(len(hashes), bool)
        first[1:] = hashes[1:] != hashes[:-1]
        return cls(segments, hashes[first], where[first], rows[first])

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found, segment, row)`` for each hash; ``segment``/``row`` are -1 where not found."""
        pos = np.searchsorted(self.hashes, hashes)
        pos = np.minimum(pos, max(len(self.hashes) - 1, 0))
        found = (self.hashes[pos] == hashes) if len(self.hashes) else np.zeros(len(hashes), bool)
        return (found, np.where(found, self.segment[pos] if len(self) else -1, -1),
                np.where(found, self.row[pos] if len(self) else -1, -1))

    def missing(self, hashes: np.ndarray) -> np.ndarray:
        """The distinct hashes (sorted, never the missing-file hash) that have no ok row here."""
        distinct = np.unique(hashes[hashes != MISSING_HASH])
        return distinct[~self.lookup(distinct)[0]]


def read_features(store: FeatureStore, index: FeatureIndex, hashes: np.ndarray,
                  columns: np.ndarray | None = None, readers: dict[int, EntryReader] | None = None,
                  array: str = GSF_ARRAY) -> np.ndarray:
    """Rows of ``array`` (GSFs, float16, by default) for ``hashes`` (each must be in ``index``), in
    the order given, in the array's stored dtype.

    Each segment's rows are read with ``EntryReader.read_rows`` (whole shards where dense, runs
    of inner chunks elsewhere), only ``columns`` kept. ``readers`` caches the opened segments
    across calls. Any table of this layout reads this way (stored views: ``array="pixels"``).
    """
    found, segment, row = index.lookup(hashes)
    if not np.all(found):
        raise KeyError(f"{int(np.sum(~found))} image(s) have no features in segments {index.segments}")
    readers = {} if readers is None else readers
    out: np.ndarray | None = None
    for s in np.unique(segment):
        reader = readers.setdefault(int(s), store.open(index.segments[int(s)]))
        picked = np.flatnonzero(segment == s)
        block = reader.read_rows(row[picked], [array], columns)[array]
        if out is None:
            out = np.empty((len(hashes), block.shape[1]), block.dtype)
        out[picked] = block
    return out if out is not None else np.zeros((0, 0 if columns is None else len(columns)), np.float16)


def storage_blocks(index: FeatureIndex, hashes: np.ndarray, block_rows: int) -> np.ndarray:
    """For each hash, a block id for :func:`featurestore.partition.plan_shuffled`: its rows in
    storage order (segment, row) cut into blocks of ``block_rows``, so a block touches few inner
    chunks and a window of blocks is a handful of range reads."""
    _, segment, row = index.lookup(hashes)
    order = np.lexsort((row, segment))
    block = np.empty(len(hashes), np.int64)
    block[order] = np.arange(len(hashes)) // block_rows
    return block


def segment_uris(hashes: np.ndarray, row_hashes: np.ndarray, uris: Sequence[str]) -> list[str]:
    """For each hash, the URI of the first dataset row holding it (where to read the image)."""
    order = np.argsort(row_hashes, kind="stable")
    pos = np.searchsorted(row_hashes[order], hashes)
    return [uris[i] for i in order[pos]]
