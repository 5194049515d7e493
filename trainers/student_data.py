"""One DDP rank's stream of student batches: the student's view of each image, and its knowledge.

Each rank reads only its own share. The rows are a split's usable rows (:func:`split_rows`:
labelled rows whose image has teacher knowledge, joined by image hash, so a moved or re-split
dataset finds it). Every epoch is a shuffle-buffered plan (``featurestore.partition.plan_shuffled``):
rows grouped by the block that stores them, blocks in an order drawn from (seed, epoch), equal
pieces per rank (padding rows have weight 0, so each real row counts exactly once per epoch and
every rank takes the same number of steps, which DDP needs), and each window of
``window_blocks`` blocks permuted row by row, so batches mix rows of several shards and differ
from epoch to epoch.

A background thread loads the next window while the current one is trained on, and keeps up to
``prefetch`` batches ready. Images come from one of two sources:

* :class:`StoredImages` (the default): the stored views (featurestore/pixels.py, decoded once by
  trainers/student_views.py). A block is a stored shard; a window reads each of its shards with
  one GET, in parallel (``EntryReader.read_rows``). Nothing is decoded per epoch.
* :class:`StoredPooledFeatures`, for a student with a frozen backbone: its pooled feature of
  each image's stored view (trainers/student_features.py), computed once; the batch's
  ``images`` are then those features and the backbone is skipped.
* :class:`DecodedImages`: image bytes read (local or s3://), checked against their indexed
  SHA-256 and decoded to the view with DALI every epoch; a block is ``locality_rows`` rows in
  knowledge order.

Knowledge rows are read per window (``EntryReader.read_rows``: whole shards where the window's
rows are dense, runs of inner chunks elsewhere; stored views likewise). An image
that cannot be used (its view failed, or its bytes are gone, changed or undecodable) gets weight
0, never stalls the epoch, and is counted in :attr:`StudentStream.unreadable` (the trainer fails
a run past a threshold).

There is no random augmentation: stored knowledge belongs to one fixed view of each image (see
DESIGN §3).
"""

from __future__ import annotations

import dataclasses
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
from featurestore.errors import UserError
from featurestore.partition import ShuffledEpoch, World, plan_shuffled
from featurestore.features import GSF_ARRAY, FeatureIndex
from featurestore.pixels import PIXELS_ARRAY
from featurestore.reader import EntryReader, read_ahead
from featurestore.splits import validation_mask
from featurestore.store import FeatureStore
from trainers.images import ImageDecoder
from trainers.knowledge import knowledge_rows
from trainers.labels import LabelError, labelled_rows, table_targets, two_hot
from trainers.student_features import StoredPooled
from trainers.student_views import StoredViews

READ_THREADS = 8


@dataclass
class StudentBatch:
    rows: np.ndarray              # global row indices
    images: torch.Tensor          # uint8 [B, 3, H, W], or a frozen backbone's pooled features float32 [B, F]
    weight: torch.Tensor          # float32 [B]: 0 for padding rows and undecodable images
    gt: torch.Tensor              # ground truth in the label's form
    teacher_feature: torch.Tensor  # f_t [B, F]
    teacher_prediction: torch.Tensor  # D_t [B, 10] (or [B])
    unreadable: tuple[tuple[str, str], ...] = ()  # (uri, reason) of the real rows that cannot be used
    tags: torch.Tensor | None = None  # two-hot tag vectors [B, T] for a student that uses tags, else None


@dataclass(frozen=True)
class SplitRows:
    """The usable rows of a split: dataset row, knowledge row, image URI and hash, target, and tag
    ids (aligned). ``tags`` is [n, 2] (0 = none), or [n, 0] for a dataset without tags: ids, not
    two-hot vectors, so 10M rows stay small; the stream encodes a batch's in the student's width."""

    rows: np.ndarray
    knowledge_rows: np.ndarray
    uris: tuple[str, ...]
    sha256: np.ndarray
    targets: np.ndarray
    tags: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, keep: np.ndarray) -> SplitRows:
        """The rows where boolean ``keep`` is true, every field alike."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return SplitRows(**{name: tuple(np.asarray(value, object)[keep]) if isinstance(value, tuple) else value[keep]
                            for name, value in fields.items()})


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
    tags = np.zeros((len(table), 0), np.int64) if table.tags is None else np.asarray(table.tags, np.int64)
    return SplitRows(rows, krows[rows], tuple(table.uris[rows]), table.sha256[rows], targets[rows], tags[rows])


def student_splits(table: DatasetTable, hashes: np.ndarray, label: str, val_fraction: float) -> dict[str, SplitRows]:
    """A student run's three sets of :func:`split_rows`: ``train`` is fitted, ``val`` scored
    every epoch, ``test`` scored once at the end (never used to pick anything).

    ``val`` is the dataset's own ``val`` split when it has labelled rows there; otherwise
    ``val_fraction`` of the train images, carved out by image id
    (``featurestore.splits.validation_mask``), so every student, seed and loss of a split holds
    out the same images. The teacher was fitted on all train images, val ones included: the
    per-epoch curves are for watching a run, the test split is what the report compares."""
    train, test, val = (split_rows(table, hashes, split, label) for split in ("train", "test", "val"))
    if not len(val) and val_fraction > 0:
        held = validation_mask(table.image_ids[train.rows], val_fraction)
        train, val = train.take(~held), train.take(held)
    return {"train": train, "val": val, "test": test}


@dataclass
class Unreadable:
    """Rows of one epoch whose image could not be used, with one example to show the user."""

    count: int = 0
    example: str | None = None

    def add(self, uri: str, reason: str) -> None:
        self.count += 1
        self.example = self.example or f"{uri}: {reason}"

    def add_batch(self, batch: StudentBatch) -> None:
        for uri, reason in batch.unreadable:
            self.add(uri, reason)


@dataclass(frozen=True, eq=False)
class LoadedImages:
    """A window's inputs, ``uint8 [n, H, W, 3]`` images (or a frozen backbone's pooled features,
    ``float32 [n, F]``), and for each row why it is unusable (or None)."""

    pixels: np.ndarray
    reasons: list[str | None]


class StoredRows:
    """A split's rows of a stored table (the features.py layout): each window reads the stored
    shards its rows are in, once each, in parallel; shards it needs only a few rows of are read
    by inner chunk instead. A row the table lacks is unusable, with its ``failures`` reason."""

    def __init__(self, store_url: str, index: FeatureIndex, failures: dict[bytes, str], array: str,
                 shape: tuple[int, ...], dtype: type, data: SplitRows):
        self.store, self.index, self.array, self.shape, self.dtype = (FeatureStore(store_url, create=False), index,
                                                                      array, shape, dtype)
        found, self.segment, self.row = index.lookup(data.sha256)
        self.reasons = [None if ok else failures.get(bytes(h), "no stored view") for ok, h in zip(found, data.sha256)]
        self._readers: dict[int, EntryReader] = {}
        shard_rows = {int(s): self._reader(int(s)).layout.shard_rows for s in np.unique(self.segment[found])}
        shard = np.array([r // shard_rows[int(s)] if s >= 0 else 0 for s, r in zip(self.segment, self.row)], np.int64)
        self.block_of = np.where(found, self.segment.astype(np.int64) << 32 | shard, -1)

    def _reader(self, segment: int) -> EntryReader:
        if segment not in self._readers:
            self._readers[segment] = self.store.open(self.index.segments[segment])
        return self._readers[segment]

    def load(self, positions: np.ndarray) -> LoadedImages:
        values = np.zeros((len(positions), *self.shape), self.dtype)
        segment = self.segment[positions]
        for s in np.unique(segment[segment >= 0]):  # each segment's shards are read in parallel
            picked = np.flatnonzero(segment == s)
            rows = self._reader(int(s)).read_rows(self.row[positions[picked]], [self.array])[self.array]
            values[picked] = rows.reshape(len(picked), *self.shape)
        return LoadedImages(values, [self.reasons[p] for p in positions])


class StoredImages(StoredRows):
    """Images from the stored views (featurestore/pixels.py)."""

    def __init__(self, store_url: str, views: StoredViews, data: SplitRows):
        super().__init__(store_url, views.index, views.failures, PIXELS_ARRAY, (views.view.height, views.view.width, 3),
                         np.uint8, data)


class StoredPooledFeatures(StoredRows):
    """A frozen backbone's pooled features, stored once per image (trainers/student_features.py):
    a frozen student's input in place of its images."""

    def __init__(self, store_url: str, pooled: StoredPooled, data: SplitRows):
        super().__init__(store_url, pooled.index, pooled.failures, GSF_ARRAY, (pooled.extractor.width,), np.float32,
                         data)


class DecodedImages:
    """Images decoded every epoch: read (local or s3://), checked against the indexed SHA-256, and
    decoded to the view; blocks are ``locality_rows`` consecutive rows (knowledge order)."""

    def __init__(self, data: SplitRows, decoder: ImageDecoder, size: tuple[int, int], locality_rows: int):
        self.data, self.decoder, self.size = data, decoder, size
        self.block_of = np.arange(len(data), dtype=np.int64) // max(1, locality_rows)
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="student-read")

    def load(self, positions: np.ndarray) -> LoadedImages:
        encoded = list(self._pool.map(self._read, positions))
        decoded = self.decoder.decode([e if isinstance(e, bytes) else b"" for e in encoded])
        pixels = np.zeros((len(positions), *self.size, 3), np.uint8)
        reasons: list[str | None] = []
        for i, (p, e, d) in enumerate(zip(positions, encoded, decoded)):
            if isinstance(e, str):
                reasons.append(e)
            elif d.image is None:
                reasons.append(f"cannot decode: {d.reason}")
            else:
                pixels[i] = d.image.cpu().numpy()
                reasons.append(None)
        return LoadedImages(pixels, reasons)

    def _read(self, position: int) -> bytes | str:
        """The image's bytes, or why they cannot be used."""
        try:
            data = sources.read_bytes(self.data.uris[position])
        except sources.SourceError as exc:
            return f"cannot read: {exc}"
        if hashlib.sha256(data).digest() != self.data.sha256[position].ljust(32, b"\0"):
            return "its bytes differ from the indexed image (sha256 mismatch); re-index the dataset"
        return data


@dataclass(frozen=True, eq=False)
class Window:
    """The loaded rows of one shuffle window: ``offset`` is where it starts in the epoch's plan."""

    offset: int
    positions: np.ndarray
    pad: np.ndarray
    images: LoadedImages
    knowledge: dict[str, np.ndarray]

    @property
    def end(self) -> int:
        return self.offset + len(self.positions)


class BatchPlanError(UserError, ValueError):
    """The global batch cannot be split over the workers."""


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step of ``global_batch_size`` rows is split: rank r takes ``quotas[r]``
    rows a step (equal, or differing by one when the world size does not divide the global
    batch), forwarded as ``accumulation`` micro-batches. Every rank takes the same number of
    steps and micro-batches, which DDP needs; :meth:`loss_scale` makes DDP's mean over ranks the
    mean over the global batch even when quotas differ."""

    global_batch_size: int
    quotas: tuple[int, ...]
    accumulation: int

    @property
    def world_size(self) -> int:
        return len(self.quotas)

    def micro_sizes(self, rank: int) -> tuple[int, ...]:
        """Rank ``rank``'s micro-batch sizes within one step (near-equal, larger first)."""
        q, a = self.quotas[rank], self.accumulation
        return tuple(q // a + (i < q % a) for i in range(a))

    def shares(self, rows: int) -> list[int]:
        """Rows per rank in an epoch over ``rows`` rows: whole steps, the last padded."""
        steps = -(-rows // self.global_batch_size)
        return [q * steps for q in self.quotas]

    def loss_scale(self, micro_rows: int) -> float:
        """Factor on a micro-batch's mean loss so that DDP's gradient (the mean over ranks of their
        summed micro-batch gradients) is the gradient of the mean loss over the global batch."""
        return micro_rows * self.world_size / self.global_batch_size


def batch_plan(global_batch_size: int, world_size: int, micro_batch_size: int | None) -> BatchPlan:
    """Split ``global_batch_size`` rows per step over ``world_size`` workers, each forwarding at
    most ``micro_batch_size`` rows at once (gradient accumulation beyond that)."""
    if global_batch_size < world_size:
        raise BatchPlanError(f"global_batch_size={global_batch_size} is smaller than the {world_size} workers; "
                             "lower num_workers or raise global_batch_size")
    quotas = tuple(global_batch_size // world_size + (r < global_batch_size % world_size) for r in range(world_size))
    accumulation = -(-quotas[0] // (micro_batch_size or quotas[0]))
    if quotas[-1] < accumulation:
        raise BatchPlanError(f"global_batch_size={global_batch_size} over {world_size} workers in micro-batches of "
                             f"≤ {micro_batch_size} rows would leave some micro-batches empty; raise micro_batch_size")
    return BatchPlan(global_batch_size, quotas, accumulation)


def _cuts(rows: int, sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive batches over ``rows`` positions, sizes cycling ``sizes``."""
    cuts, start, i = [], 0, 0
    while start < rows:
        stop = min(start + sizes[i % len(sizes)], rows)
        cuts.append((start, stop))
        start, i = stop, i + 1
    return cuts


class StudentStream:
    """Batches for one rank. Build it once per worker; call :meth:`epoch` each epoch.

    ``batch`` is a batch size (equal shares per rank, as validation reads), or a
    :class:`BatchPlan`: the rank's share and micro-batch sizes come from it. With ``tag_width``
    > 0 (a student that reads or predicts tags) each batch carries its rows' two-hot tags."""

    def __init__(self, store_url: str, knowledge_key: str, data: SplitRows, label: str, world: World,
                 batch: int | BatchPlan, images: StoredRows | DecodedImages, seed: int, window_blocks: int = 8,
                 prefetch: int = 4, channels_last: bool = False, pin_memory: bool = False, tag_width: int = 0):
        if tag_width and data.tags.shape[1] != 2:
            raise LabelError("the student uses semantic tags but the dataset has none (no tag1/tag2 columns)")
        self.tag_width = tag_width
        self.knowledge = FeatureStore(store_url, create=False).open(knowledge_key)
        self.data, self.label, self.world, self.images = data, label, world, images
        if isinstance(batch, BatchPlan):
            self.sizes, self.shares = batch.micro_sizes(world.rank), batch.shares(len(data))
        else:
            self.sizes, self.shares = (batch,), None
        self.seed, self.window_blocks = seed, window_blocks
        self.prefetch, self.channels_last, self.pin_memory = max(1, prefetch), channels_last, pin_memory
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="student-window")
        self.unreadable = Unreadable()

    def plan(self, epoch: int) -> ShuffledEpoch:
        return plan_shuffled(self.images.block_of, self.world, self.seed, epoch, self.window_blocks,
                             shares=self.shares)

    def steps(self, epoch: int) -> int:
        """Batches (micro-batches) this rank yields in ``epoch`` (the same on every rank)."""
        return len(_cuts(len(self.plan(epoch)), self.sizes))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[StudentBatch]:
        """The epoch's batches from batch ``start_batch`` on (a resumed run skips the batches it
        trained on without reading them)."""
        self.unreadable = Unreadable()
        plan = self.plan(epoch)
        cuts = _cuts(len(plan), self.sizes)[start_batch:]
        windows = [w for w in plan.windows() if cuts and w.stop > cuts[0][0]]
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                loaded: list[Window] = []
                upcoming = read_ahead(windows, lambda part: self._load(plan, part), 1, self._loader)
                for start, end in cuts:
                    while not loaded or loaded[-1].end < end:
                        loaded.append(next(upcoming))  # the next window is read meanwhile
                    loaded = [w for w in loaded if w.end > start]
                    if stop.is_set():
                        return
                    ready.put(self._batch(loaded, start, end))
                ready.put(None)
            except BaseException as exc:  # surface loader errors in the training thread
                ready.put(exc)

        thread = threading.Thread(target=produce, name="student-stream", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                self.unreadable.add_batch(item)  # counted when consumed: a checkpoint's count is exact
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def _load(self, plan: ShuffledEpoch, part: slice) -> Window:
        positions = plan.positions[part]
        knowledge = self.knowledge.read_rows(self.data.knowledge_rows[positions], ["feature", self.label])
        return Window(part.start, positions, plan.pad[part], self.images.load(positions), knowledge)

    def _batch(self, windows: list[Window], start: int, end: int) -> StudentBatch:
        parts = [(w, slice(max(start, w.offset) - w.offset, min(end, w.end) - w.offset))
                 for w in windows if w.offset < end and w.end > start]
        pos = np.concatenate([w.positions[s] for w, s in parts])
        pad = np.concatenate([w.pad[s] for w, s in parts])
        pixels = np.concatenate([w.images.pixels[s] for w, s in parts])
        reasons = [r for w, s in parts for r in w.images.reasons[s]]
        unreadable = tuple((self.data.uris[p], reason) for p, is_pad, reason in zip(pos, pad, reasons)
                           if not is_pad and reason is not None)
        images = torch.from_numpy(pixels)
        if self.pin_memory:
            images = images.pin_memory()
        if images.ndim == 4:  # images, not pooled features
            images = images.permute(0, 3, 1, 2)  # NCHW with channels-last strides, as stored
        weight = torch.tensor([0.0 if is_pad or reason is not None else 1.0 for is_pad, reason in zip(pad, reasons)])
        knowledge = {name: np.concatenate([w.knowledge[name][s] for w, s in parts]) for name in ("feature", self.label)}
        return StudentBatch(rows=self.data.rows[pos], images=images if self.channels_last else images.contiguous(),
                            weight=weight, gt=torch.from_numpy(self.data.targets[pos]),
                            teacher_feature=torch.from_numpy(knowledge["feature"]),
                            teacher_prediction=torch.from_numpy(knowledge[self.label]), unreadable=unreadable,
                            tags=torch.from_numpy(two_hot(self.data.tags[pos], self.tag_width))
                            if self.tag_width else None)
