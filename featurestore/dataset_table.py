"""A dataset as columns: the labelled view of a set of images, stored as Parquet.

Labels, tags, splits, ids and URIs belong to a dataset, never to the features of its images
(those are keyed by image content, see features.py). So a dataset is kept as its own small,
columnar table: numpy columns in memory, one Parquet object in the store. Parquet keeps 10M
rows compact and lets a reader take only the columns it needs (a worker that wants URIs and
hashes does not parse vote counts), where a JSON document would be parsed whole by everyone.

Image hashes are held as raw 32-byte values (numpy ``S32``): a tenth of the memory of hex
strings, and sortable, so joins by content are ``searchsorted`` rather than dictionaries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import sources
from .specs import NUM_BINS, DatasetManifest
from .splits import SplitSpec, assign_splits

HASH_DTYPE = np.dtype("S32")
#: The hash of a row whose image did not exist when the dataset was indexed.
MISSING_HASH = np.zeros(1, HASH_DTYPE)[0]
ROW_GROUP = 65536
COLUMNS = ("image_id", "uri", "sha256", "split", "votes", "mean_score", "tag1", "tag2")


def hashes_from_hex(hexes: Sequence[str]) -> np.ndarray:
    """Hex SHA-256 strings → ``S32`` raw digests (fast: one ``bytes.fromhex`` over the lot)."""
    if not len(hexes):
        return np.zeros(0, HASH_DTYPE)
    return np.frombuffer(bytes.fromhex("".join(hexes)), HASH_DTYPE).copy()


def hashes_to_hex(hashes: np.ndarray) -> list[str]:
    raw = np.ascontiguousarray(hashes, HASH_DTYPE).view(np.uint8).reshape(-1, 32)
    return [row.tobytes().hex() for row in raw]


def hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """``S32`` digests as a ``uint8 [n, 32]`` array (how the store keeps them)."""
    return np.ascontiguousarray(hashes, HASH_DTYPE).view(np.uint8).reshape(-1, 32)


def hashes_of(raw: np.ndarray) -> np.ndarray:
    """The inverse of :func:`hash_bytes`."""
    return np.ascontiguousarray(raw, np.uint8).reshape(-1, 32).view(HASH_DTYPE).ravel()


@dataclass(frozen=True, eq=False)
class DatasetTable:
    """One row per image: id, URI, content hash, the dataset's own split, and labels.

    ``splits`` is the split the data defines (AVA's lists, a CSV column, or a hash split); other
    splits are derived from it and the ids by :mod:`featurestore.splits`. ``votes`` [N, 10] and
    ``mean_scores`` [N] may be absent; ``tags`` [N, 2] hold semantic tag ids (0 = none).
    """

    name: str
    image_ids: np.ndarray
    uris: np.ndarray
    sha256: np.ndarray
    splits: np.ndarray
    votes: np.ndarray | None = None
    mean_scores: np.ndarray | None = None
    tags: np.ndarray | None = None
    tag_names: tuple[tuple[int, str], ...] = ()

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def missing(self) -> np.ndarray:
        """Rows whose image did not exist when the dataset was indexed."""
        return self.sha256 == MISSING_HASH

    def resplit(self, split: SplitSpec) -> DatasetTable:
        """This table with ``splits`` assigned by ``split`` (``official`` keeps the table's own)."""
        splits = assign_splits(split, self.image_ids, self.splits,
                               read_text=lambda uri: sources.read_bytes(uri).decode("utf-8-sig"))
        return dataclasses.replace(self, splits=np.asarray(splits, object))

    @classmethod
    def from_manifest(cls, manifest: DatasetManifest) -> DatasetTable:
        def array(values, dtype):
            return None if values is None else np.asarray(values, dtype)

        return cls(name=manifest.name, image_ids=np.asarray(manifest.image_ids, object),
                   uris=np.asarray(manifest.uris, object), sha256=hashes_from_hex(manifest.sha256),
                   splits=np.asarray(manifest.splits, object), votes=array(manifest.votes, np.int64),
                   mean_scores=array(manifest.mean_scores, np.float64), tags=array(manifest.tags, np.int64),
                   tag_names=tuple(manifest.tag_names))

    def content_digest(self, with_uris: bool) -> str:
        """SHA-256 over every column (URIs only when asked), independent of the Parquet encoding."""
        h = hashlib.sha256(json.dumps({"name": self.name, "rows": len(self),
                                       "tag_names": [list(t) for t in self.tag_names]}).encode())
        text_columns = [self.image_ids, self.splits] + ([self.uris] if with_uris else [])
        for column in text_columns:
            for start in range(0, len(self), ROW_GROUP):  # bounded temporaries at 10M rows
                h.update("\0".join(map(str, column[start:start + ROW_GROUP])).encode() + b"\1")
        h.update(hash_bytes(self.sha256).tobytes())
        for column in (self.votes, self.mean_scores, self.tags):
            h.update(b"-" if column is None else np.ascontiguousarray(column, "<f8").tobytes())
        return h.hexdigest()

    # -- Parquet ---------------------------------------------------------------------------------

    def to_parquet(self) -> bytes:
        columns = {"image_id": pa.array(self.image_ids.tolist(), pa.string()),
                   "uri": pa.array(self.uris.tolist(), pa.string()),
                   "sha256": pa.array(list(map(bytes, hash_bytes(self.sha256))), pa.binary(32)),
                   "split": pa.array(self.splits.tolist(), pa.string()).dictionary_encode()}
        if self.votes is not None:
            flat = pa.array(np.asarray(self.votes, np.int32).ravel())
            columns["votes"] = pa.FixedSizeListArray.from_arrays(flat, NUM_BINS)
        if self.mean_scores is not None:
            columns["mean_score"] = pa.array(np.asarray(self.mean_scores, np.float64))
        if self.tags is not None:
            columns["tag1"] = pa.array(np.asarray(self.tags[:, 0], np.int32))
            columns["tag2"] = pa.array(np.asarray(self.tags[:, 1], np.int32))
        meta = {"name": self.name, "tag_names": [list(t) for t in self.tag_names]}
        table = pa.table(columns).replace_schema_metadata({"aesthetic_kd": json.dumps(meta)})
        out = io.BytesIO()
        pq.write_table(table, out, row_group_size=ROW_GROUP, compression="zstd")
        return out.getvalue()

    @classmethod
    def from_parquet(cls, data: bytes | memoryview, columns: Sequence[str] | None = None) -> DatasetTable:
        """Read the table back; ``columns`` limits what is decoded (ids and hashes always are)."""
        file = pq.ParquetFile(pa.BufferReader(data))
        present = set(file.schema_arrow.names)
        wanted = [c for c in COLUMNS if c in present and (columns is None or c in columns
                                                           or c in ("image_id", "sha256"))]
        table = file.read(columns=wanted)
        meta = json.loads(file.schema_arrow.metadata[b"aesthetic_kd"])

        def strings(name: str) -> np.ndarray:
            if name not in table.column_names:
                return np.full(table.num_rows, "", object)
            return np.asarray(table.column(name).cast(pa.string()).to_pylist(), object)

        votes = None
        if "votes" in table.column_names:
            votes = table.column("votes").combine_chunks().flatten().to_numpy().reshape(-1, NUM_BINS).astype(np.int64)
        tags = None
        if "tag1" in table.column_names:
            tags = np.stack([table.column(t).to_numpy() for t in ("tag1", "tag2")], 1).astype(np.int64)
        raw = np.frombuffer(b"".join(table.column("sha256").to_pylist()), np.uint8)
        return cls(name=meta["name"], image_ids=strings("image_id"), uris=strings("uri"), sha256=hashes_of(raw),
                   splits=strings("split"), votes=votes,
                   mean_scores=table.column("mean_score").to_numpy() if "mean_score" in table.column_names else None,
                   tags=tags, tag_names=tuple((int(i), str(n)) for i, n in meta["tag_names"]))
