"""One DDP rank's stream of student batches: image bytes from the dataset, knowledge from the store.

Each rank reads only its own partition. The partition plan (featurestore/partition.py) runs over
the positions of the usable rows of a split: its labelled rows (``trainers.labels.labelled_rows``,
the images the teacher was fitted and scored on) whose image has teacher knowledge (joined by
image hash, so a moved or re-split dataset finds it). Those rows are sorted by knowledge row, so
neighbouring positions share knowledge shards. Every rank gets the same number of rows, and so
the same number of steps, which DDP needs. Padding rows have weight 0, so each real row counts
exactly once per epoch.

A background thread stays up to ``prefetch`` batches ahead of training. It reads image bytes
(local or s3://), checks their SHA-256 against the dataset index, decodes them to the student's
fixed view with DALI, and reads the aligned knowledge rows. An image that cannot be read, has
other bytes than were indexed, or fails to decode gets weight 0, never stalls the epoch, and is
counted in :attr:`StudentStream.unreadable` (the trainer fails a run past a threshold).

There is no random augmentation: stored knowledge belongs to one fixed view of each image (see
DESIGN §3).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from featurestore import sources
from featurestore.dataset_table import DatasetTable
from featurestore.partition import World, plan_for
from featurestore.store import FeatureStore
from trainers.images import ImageDecoder
from trainers.knowledge import knowledge_rows
from trainers.labels import labelled_rows, table_targets

READ_THREADS = 8


@dataclass
class StudentBatch:
    rows: np.ndarray              # global row indices
    images: torch.Tensor          # uint8 [B, 3, H, W]
    weight: torch.Tensor          # float32 [B]: 0 for padding rows and undecodable images
    gt: torch.Tensor              # ground truth in the label's form
    teacher_feature: torch.Tensor  # f_t [B, F]
    teacher_prediction: torch.Tensor  # D_t [B, 10] (or [B])


@dataclass(frozen=True)
class SplitRows:
    """The usable rows of a split: dataset row, knowledge row, image URI and hash, target (aligned)."""

    rows: np.ndarray
    knowledge_rows: np.ndarray
    uris: tuple[str, ...]
    sha256: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def split_rows(table: DatasetTable, hashes: np.ndarray, split: str, label: str) -> SplitRows:
    """Labelled rows of ``split`` ("all" for every split) whose image has knowledge (``hashes``:
    the knowledge entry's sorted row hashes), ordered by knowledge row for read locality.

    An empty split gives no rows (an empty test split means no validation, as the trainer
    allows); a table without labels is a ``LabelError``."""
    targets = table_targets(label, table)
    krows = knowledge_rows(hashes, table.sha256)
    rows = labelled_rows(table, split, required=False)
    rows = rows[krows[rows] >= 0]
    rows = rows[np.argsort(krows[rows], kind="stable")]
    return SplitRows(rows, krows[rows], tuple(table.uris[rows]), table.sha256[rows], targets[rows])


@dataclass
class Unreadable:
    """Rows of one epoch whose image could not be used, with one example to show the user."""

    count: int = 0
    example: str | None = None

    def add(self, uri: str, reason: str) -> None:
        self.count += 1
        self.example = self.example or f"{uri}: {reason}"


class StudentStream:
    """Batches for one rank. Build it once per worker; call :meth:`epoch` each epoch."""

    def __init__(self, store_url: str, knowledge_key: str, data: SplitRows, label: str, world: World,
                 batch_size: int, decoder: ImageDecoder, image_size: tuple[int, int], seed: int,
                 locality_rows: int, prefetch: int = 2):
        self.knowledge = FeatureStore(store_url, create=False).open(knowledge_key)
        self.data, self.label, self.world = data, label, world
        self.batch_size, self.decoder, self.image_size, self.seed = batch_size, decoder, image_size, seed
        self.locality_rows, self.prefetch = locality_rows, max(1, prefetch)
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="student-read")
        self.unreadable = Unreadable()

    def positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's positions into ``data`` for ``epoch`` and their padding flags."""
        spans = plan_for(self.world, len(self.data), self.locality_rows, self.seed, epoch)
        if not spans:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        return (np.concatenate([np.arange(s.start, s.stop) for s in spans]),
                np.concatenate([np.full(len(s), s.pad) for s in spans]))

    def steps(self, epoch: int) -> int:
        return -(-len(self.positions(epoch)[0]) // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[StudentBatch]:
        self.unreadable = Unreadable()
        positions, pad = self.positions(epoch)
        chunks = [(positions[i:i + self.batch_size], pad[i:i + self.batch_size])
                  for i in range(0, len(positions), self.batch_size)]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for pos, is_pad in chunks:
                    if stop.is_set():
                        return
                    ready.put(self._batch(pos, is_pad))
                ready.put(None)
            except BaseException as exc:  # surface loader errors in the training thread
                ready.put(exc)

        thread = threading.Thread(target=produce, name="student-stream", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def _batch(self, pos: np.ndarray, pad: np.ndarray) -> StudentBatch:
        rows = self.data.rows[pos]
        encoded = list(self._readers.map(self._read, pos))
        decoded = self.decoder.decode([e if isinstance(e, bytes) else b"" for e in encoded])
        blank = torch.zeros((*self.image_size, 3), dtype=torch.uint8, device=self.decoder.output_device)
        images = torch.stack([d.image if d.image is not None else blank for d in decoded]).permute(0, 3, 1, 2)
        weight = torch.tensor([0.0 if p or d.image is None else 1.0 for p, d in zip(pad, decoded)])
        for p, is_pad, e, d in zip(pos, pad, encoded, decoded):
            if not is_pad and d.image is None:
                self.unreadable.add(self.data.uris[p], e if isinstance(e, str) else f"cannot decode: {d.reason}")
        knowledge = self.knowledge.read_rows(self.data.knowledge_rows[pos], ["feature", self.label])
        return StudentBatch(rows=rows, images=images.contiguous(), weight=weight,
                            gt=torch.from_numpy(self.data.targets[pos]),
                            teacher_feature=torch.from_numpy(knowledge["feature"]),
                            teacher_prediction=torch.from_numpy(knowledge[self.label]))

    def _read(self, position: int) -> bytes | str:
        """The image's bytes, or why they cannot be used."""
        try:
            data = sources.read_bytes(self.data.uris[position])
        except sources.SourceError as exc:
            return f"cannot read: {exc}"
        if hashlib.sha256(data).digest() != self.data.sha256[position].ljust(32, b"\0"):
            return "its bytes differ from the indexed image (sha256 mismatch); re-index the dataset"
        return data
