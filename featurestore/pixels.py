"""Stored image views: the fixed view a student sees of each image, decoded once, keyed by content.

A student has no random augmentation (DESIGN §3), so its input is a pure function of the image's
bytes, the view (``resize:300``, ``pad_crop:800:640``) and the decoder that made it. Decoding a
full-resolution JPEG is the dearest part of that input; stored once as uint8 pixels, an epoch
becomes a sequence of whole-shard reads, shared by every student run, seed and loss with the view.

The layout is the feature table's (features.py): per view, a table of immutable **segments**
(kind ``pixelseg``) whose rows are distinct image hashes in sorted order, with the ``pixels``
array (``H*W*3`` bytes per row, HWC) and the ``sha256`` array row-aligned, registered under
``_tables/<pixels key>/``. Images added later cost only their own decode. A row whose image
could not be decoded, or whose file is gone or changed, is failed with its reason; a transient
read error fails the shard instead (uncommitted, retried), never a row.

The decoder is part of the identity: GPU (nvJPEG) and CPU (libjpeg-turbo) decodes, and CUDA and
CPU resizes, differ in the last bit, so views from one are not silently reused for the other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .dataset_table import hash_bytes
from .features import HASH_ARRAY, FeatureIndex, register_in_table, registered_segments
from .layout import ArraySpec, EntryLayout, default_shard_rows
from .reader import EntryReader
from .specs import EntrySpec, entry_key
from .store import FeatureStore
from .writer import EntryWriter

PIXELS_KIND = "pixelseg"
PIXELS_ARRAY = "pixels"
#: A shard is a whole-object GET of about this size: large enough for S3 throughput, small
#: enough that a shuffle window of several shards stays a few hundred MB per rank.
SHARD_BYTES = 16 << 20
CHUNK_ROWS = 8


@dataclass(frozen=True)
class PixelViewSpec:
    """What a stored view is: the view string, its output size and the decoder that made it."""

    view: str
    height: int
    width: int
    decoder: str  # "dali-cpu", "dali-mixed" or "pil"

    @property
    def row_bytes(self) -> int:
        return self.height * self.width * 3

    def to_json(self) -> dict[str, Any]:
        return {"view": self.view, "height": self.height, "width": self.width, "decoder": self.decoder}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PixelViewSpec:
        return cls(view=data["view"], height=int(data["height"]), width=int(data["width"]), decoder=data["decoder"])


def pixels_key(view: PixelViewSpec) -> str:
    """``pixels-<24 hex>``: names the table of stored views under ``view``."""
    return entry_key("pixels", view.to_json())


def segment_spec(view: PixelViewSpec, hashes: np.ndarray, uris: Sequence[str]) -> EntrySpec:
    """The spec of a segment holding exactly ``hashes`` (sorted, distinct) under ``view``, read
    from ``uris``. The URIs are part of it because a row can fail for where it was read (a file
    gone since indexing): the same images read from elsewhere (a moved dataset) are tried again."""
    images = hashlib.sha256(hash_bytes(hashes).tobytes()).hexdigest()
    where = hashlib.sha256()
    for uri in uris:  # streamed: no joined copy of millions of URIs
        where.update(uri.encode() + b"\n")
    return EntrySpec(kind=PIXELS_KIND, identity={"view": view.to_json(), "images": images,
                                                 "sources": where.hexdigest(), "rows": int(len(hashes))})


def segment_layout(view: PixelViewSpec, rows: int) -> EntryLayout:
    shard_rows = default_shard_rows(view.row_bytes, target_bytes=SHARD_BYTES, chunk_rows=CHUNK_ROWS)
    return EntryLayout(rows=rows, shard_rows=shard_rows, chunk_rows=CHUNK_ROWS,
                       arrays=(ArraySpec(PIXELS_ARRAY, view.row_bytes, "uint8"), ArraySpec(HASH_ARRAY, 32, "uint8")))


def create_segment(store: FeatureStore, view: PixelViewSpec, hashes: np.ndarray, uris: Sequence[str]) -> EntryWriter:
    """Create (or reopen, to finish) the segment of ``hashes`` read from ``uris``; its workers
    write shards with :func:`write_pixel_shard`, the caller finalizes and :func:`register`s it."""
    spec = segment_spec(view, hashes, uris)
    return store.create(spec, segment_layout(view, len(hashes)),
                        attrs={"table": pixels_key(view), "summary": f"{view.view} views ({view.decoder}), "
                                                                     f"{len(hashes)} images"})


def write_pixel_shard(writer: EntryWriter, shard: int, hashes: np.ndarray, pixels: np.ndarray,
                      failures: Mapping[int, str]) -> None:
    """Commit shard ``shard``: ``hashes`` and ``pixels`` ([rows, H, W, 3] uint8) are the shard's
    rows; ``failures`` maps a row of the shard to its reason (its pixels are stored as zeros)."""
    rows = len(hashes)
    block = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(rows, -1)
    for row in failures:
        block[row] = 0
    start, _ = writer.layout.shard_range(shard)
    writer.write_shard(shard, {PIXELS_ARRAY: block, HASH_ARRAY: hash_bytes(hashes)},
                       failures={start + r: why for r, why in failures.items()})


def register(store: FeatureStore, segment: EntryReader) -> None:
    register_in_table(store, pixels_key(PixelViewSpec.from_json(segment.spec.identity["view"])), segment)


def pixel_index(store: FeatureStore, view: PixelViewSpec) -> FeatureIndex:
    """Where each image's stored view is: hash → (segment, row), ok rows only."""
    return FeatureIndex.build(store, registered_segments(store, pixels_key(view)))
