"""Teacher features for one segment shard: read → verify → decode → full-resolution forward → pool → write.

A shard is the unit of work of the extraction job: one ``ShardExtractor`` (inside one Ray actor)
computes every row of it and writes it whole, so the store's one-writer-per-shard rule holds and
a crashed job resumes at shard granularity.

The teacher sees each image at full resolution. Images of identical size are batched together
(up to ``batch_size`` images and ``batch_pixels`` pixels); nothing is ever padded, so no padding
leaks into the pooled features. A size group of a shard that does not fill its last batch is
topped up with images of the same size from the next shard of the same call (``shard_batches``),
so sizes batch across the pending work while the unit of commit stays a whole shard. Grouping
depends only on the call's shards, in order; on the CPU at photo sizes a row's bytes do not
depend on its batch companions (tests/test_extract_speed_paths.py), elsewhere they may differ by
a few float16 ulps, as any two attempts at a shard on a GPU may.

Every row ends up either ok or failed with a reason that belongs to the image (missing file,
changed bytes, undecodable, forward error, non-finite features); the job never stops for one bad
image. An I/O error that is not "the object is gone" fails the shard instead, so a transient
fault is retried and never becomes a permanent failed row.

``run_all`` pipelines the shards of one call so the backbones do not wait on I/O: while shard
*i* is forwarded, a loader thread reads, hashes (checking the indexed hash where there is one)
and decodes shards *i + 1* and *i + 2* (two
ahead, because shard *i + 1* must be decoded before shard *i*'s topped-up batches run; memory holds
at most three shards of images) and a writer thread commits shard *i − 1* (one write pending). A
shard whose read or write fails stays uncommitted while the others of the call go on; the call
then raises, and no result is returned before every shard's commit has returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from featurestore import sources
from featurestore.datasets import MISSING_SHA256
from featurestore.errors import UserError
from featurestore.features import GSF_ARRAY, HASH_ARRAY
from featurestore.layout import EntryLayout
from featurestore.specs import EntrySpec, ExtractorSpec
from featurestore.store import FeatureStore
from trainers.backbones import build_extractor
from trainers.images import ImageDecoder

READ_THREADS = 8  # image reads are I/O bound (S3 especially)

#: glibc malloc settings an extraction worker process starts with (glibc reads them once, at
#: start-up). Full-resolution activations are blocks of megabytes. By default glibc maps each
#: fresh and unmaps it when freed, so every op of every forward pass faults in zeroed pages again.
#: Measured on 2 CPU cores, lite trio, 32 demo images: the first passes took 3.9 M minor faults and
#: 9 s of kernel time (2.3 img/s); with these settings 0.35 M and 0.9 s (4.35 img/s). Freed memory
#: then stays in the process for the next batch, so the worker's resident memory stays at its peak,
#: which ``batch_size`` and ``batch_pixels`` bound.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

#: Pixels per forward batch the workers allow by default: a batch of large images holds fewer.
BATCH_PIXELS = 4 * 1024 * 1024


class SpecMismatch(UserError, RuntimeError):
    """A worker loaded weights that differ from the ones the entry's key was computed from."""


@dataclass(frozen=True)
class ShardTask:
    """A shard's rows: where to read each image and its hex SHA-256 from the dataset's index, to
    check the bytes against; ``""`` for an image not hashed yet, which is hashed as it is read
    and written into the segment's ``sha256`` array (a first extraction: one read per image)."""

    shard: int
    start: int
    uris: tuple[str, ...]
    sha256: tuple[str, ...]


@dataclass(frozen=True)
class ShardResult:
    shard: int
    rows: int
    ok: int
    failed: int
    forward_passes: int
    seconds: float


def input_policy(max_pixels: int) -> str:
    return f"full-resolution;max-pixels={max_pixels}"


def batch_capacity(size: tuple[int, int], batch_size: int, batch_pixels: int) -> int:
    """Images of ``size`` (H, W) in one batch: ``batch_size``, fewer if they exceed ``batch_pixels``."""
    return max(1, min(batch_size, batch_pixels // max(size[0] * size[1], 1)))


def size_batches(sizes: dict[int, tuple[int, int]], batch_size: int, batch_pixels: int) -> list[list[int]]:
    """Rows grouped by identical (H, W), in a deterministic order, split by count and pixel budget."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row in sorted(sizes):
        groups[sizes[row]].append(row)
    batches = []
    for size, rows in sorted(groups.items()):
        per_batch = batch_capacity(size, batch_size, batch_pixels)
        batches += [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    return batches


@dataclass(frozen=True)
class ShardBatches:
    """A shard's forward batches: ``full`` ones need only the shard itself, so they run while the
    next shard is still loading; ``topped_up`` are its partial batches, each filled up with rows
    of the same size from the next shard (those rows are then done when that shard comes)."""

    full: tuple[tuple[int, ...], ...]
    topped_up: tuple[tuple[int, ...], ...]


def shard_batches(sizes: dict[int, tuple[int, int]], next_sizes: dict[int, tuple[int, int]], batch_size: int,
                  batch_pixels: int) -> ShardBatches:
    """Batches for a shard's rows ``sizes`` (row → (H, W)), borrowing rows of ``next_sizes`` (the
    next shard's rows not yet forwarded) to fill its partial batches, lowest rows first."""
    spare: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row in sorted(next_sizes):
        spare[next_sizes[row]].append(row)
    full, topped_up = [], []
    for batch in size_batches(sizes, batch_size, batch_pixels):
        size = sizes[batch[0]]
        room = batch_capacity(size, batch_size, batch_pixels) - len(batch)
        if room == 0:
            full.append(tuple(batch))
        else:
            borrowed, spare[size] = spare[size][:room], spare[size][room:]
            topped_up.append((*batch, *borrowed))
    return ShardBatches(tuple(full), tuple(topped_up))


class ShardExtractor:
    """Computes and writes whole shards of a GSF entry. Built once per worker (loads the weights)."""

    def __init__(self, store: str, spec: dict, layout: dict, backbones: Sequence[str], weights: str | dict,
                 max_pixels: int, batch_size: int = 8, batch_pixels: int = BATCH_PIXELS,
                 device: str | None = None):
        self.extractor = build_extractor(list(backbones), weights, device=device).eval()
        self.spec = EntrySpec.from_json(spec)
        expected = ExtractorSpec.from_json(self.spec.identity["extractor"])
        if self.extractor.specs != expected.backbones:
            raise SpecMismatch("this worker's backbones/weights differ from the entry spec: "
                               f"{self.extractor.specs} vs {expected.backbones}; make sure every node sees "
                               "the same weights files")
        self.writer = FeatureStore(store).create(self.spec, EntryLayout.from_json(layout))
        self.decoder = ImageDecoder(device="mixed" if self.extractor.cuda_mode else "cpu", max_pixels=max_pixels)
        self.batch_size, self.batch_pixels = batch_size, batch_pixels
        self.forward_passes = 0

    def run_all(self, tasks: Sequence[ShardTask]) -> list[ShardResult]:
        """Compute and commit ``tasks`` in order, loading the next shards and writing the previous
        one while the current one is forwarded, and topping up its partial batches with rows of
        the next shard (see the module docstring).

        A shard whose load, compute or write fails stays uncommitted and the others go on; then
        the first error is raised, so the call is retried and redoes exactly the uncommitted
        shards (a shard that fails for good does not take the rest of its call with it). A
        shard's ``seconds`` is the wall time the pipeline spent on it, so the results' sum is
        the call's wall time.
        """
        results: list[ShardResult | None] = [None] * len(tasks)
        errors: list[Exception] = []
        loads: dict[int, Future] = {}  # task index → its load, submitted in order to one thread
        # Leaving the executors waits for their work: a pending write always finishes.
        with ThreadPoolExecutor(1, thread_name_prefix="shard-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="shard-write") as writer:

            def load_ahead(index: int) -> None:
                if index < len(tasks) and index not in loads:
                    loads[index] = loader.submit(self._load, tasks[index])

            def loaded(index: int) -> tuple[dict[int, torch.Tensor], dict[int, str], dict[int, str]] | None:
                """The shard's images and failures; None if committed already, failed to load or
                past the end (a failed load is recorded when its own turn comes)."""
                if index >= len(tasks) or loads[index].exception() is not None:
                    return None
                return loads[index].result()

            load_ahead(0)
            early: dict[int, np.ndarray] = {}  # rows of the current shard forwarded with the previous one
            early_failures: dict[int, str] = {}
            pending: tuple[int, Future] | None = None  # the one write in flight, by task index
            mark = time.perf_counter()
            for i, task in enumerate(tasks):
                load_ahead(i + 1)
                load_ahead(i + 2)
                try:
                    shard = loads.pop(i).result()
                except Exception as exc:  # noqa: BLE001 - this shard stays uncommitted; the others go on
                    errors.append(exc)
                    continue
                if shard is None:  # an earlier attempt committed it
                    results[i] = ShardResult(task.shard, len(task.uris), 0, 0, 0, 0.0)
                    continue
                images, failures, digests = shard
                failures = {**failures, **early_failures}
                features, early, early_failures = early, {}, {}
                forwards_before = self.forward_passes
                own = {r: _size(img) for r, img in images.items() if r not in features and r not in failures}
                # full batches need only this shard: they run while the next one may still load
                alone = shard_batches(own, {}, self.batch_size, self.batch_pixels)
                features.update(self._forward(alone.full, images, failures))
                if alone.topped_up:  # partial batches: top them up from the next shard
                    nxt = loaded(i + 1)  # normally decoded already, during the previous shard
                    companions = {} if nxt is None else nxt[0]
                    topped_up = shard_batches(own, {r: _size(img) for r, img in companions.items()},
                                              self.batch_size, self.batch_pixels).topped_up
                    next_failures: dict[int, str] = {}
                    out = self._forward(topped_up, {**images, **companions}, next_failures)
                    for row, vector in out.items():
                        (features if row in images else early)[row] = vector
                    for row, reason in next_failures.items():
                        (failures if row in images else early_failures)[row] = reason
                arrays = self._arrays(task, features, digests)
                if pending is not None:
                    self._commit(results, *pending, errors)
                pending = (i, writer.submit(self.writer.write_shard, task.shard, arrays, failures=failures))
                now = time.perf_counter()
                results[i] = ShardResult(task.shard, len(task.uris), 0, 0, self.forward_passes - forwards_before,
                                         now - mark)
                mark = now
            if pending is not None:
                self._commit(results, *pending, errors)
                last = results[pending[0]]
                results[pending[0]] = dataclasses.replace(last, seconds=last.seconds + time.perf_counter() - mark)
        if errors:
            raise errors[0]
        return results

    @staticmethod
    def _commit(results: list[ShardResult | None], index: int, write: Future, errors: list[Exception]) -> None:
        """Wait for a shard's write and record its commit's counts, or its error."""
        try:
            commit = write.result()
        except Exception as exc:  # noqa: BLE001 - the shard stays uncommitted; the others go on
            errors.append(exc)
            return
        results[index] = dataclasses.replace(results[index], ok=commit.ok, failed=commit.failed)

    def _load(self, task: ShardTask) -> tuple[dict[int, torch.Tensor], dict[int, str], dict[int, str]] | None:
        """Decoded images, failures and the hex SHA-256 of the bytes read, by row; None when the
        shard is committed already. Runs on the loader thread, the only user of the decoder."""
        if self.writer.is_committed(task.shard):
            return None
        failures: dict[int, str] = {}
        digests: dict[int, str] = {}
        encoded = self._read(task, failures, digests)
        images = {}
        rows = sorted(encoded)
        for row, decoded in zip(rows, self.decoder.decode([encoded[r] for r in rows])):
            if decoded.image is None:
                failures[row] = f"cannot decode {task.uris[row - task.start]}: {decoded.reason}"
            else:
                images[row] = decoded.image
        return images, failures, digests

    def _arrays(self, task: ShardTask, vectors: dict[int, np.ndarray], digests: dict[int, str]) -> dict[str, np.ndarray]:
        """The shard's arrays as the store takes them: features by row, zeros where none; the
        indexed hash of each row, or the hash of the bytes read where the task had none (zeros
        if the image was gone)."""
        features = np.zeros((len(task.uris), self.extractor.width), np.float16)
        for row, vector in vectors.items():
            features[row - task.start] = vector
        hexes = [expected or digests.get(task.start + i, MISSING_SHA256) for i, expected in enumerate(task.sha256)]
        hashes = np.frombuffer(bytes.fromhex("".join(hexes)), np.uint8).reshape(-1, 32)
        return {GSF_ARRAY: features, HASH_ARRAY: hashes}

    def _read(self, task: ShardTask, failures: dict[int, str], digests: dict[int, str]) -> dict[int, bytes]:
        """Image bytes by row, and the hex SHA-256 of each image read into ``digests``; rows
        whose file is missing or changed since it was indexed fail."""

        def read(i: int) -> tuple[int, bytes | None, str | None, str | None]:
            uri, expected = task.uris[i], task.sha256[i]
            if expected == MISSING_SHA256:
                return i, None, None, f"missing file {uri} (absent when the dataset was indexed)"
            try:
                data = sources.read_bytes(uri)
            except sources.MissingSourceError as exc:  # gone (404): a property of the dataset, a failed row
                return i, None, None, f"cannot read {uri}: {exc}"
            # any other read error (5xx after the client's retries, a reset, EIO) propagates: the
            # shard stays uncommitted and is retried, never recorded as a failed row
            digest = hashlib.sha256(data).hexdigest()
            if expected and digest != expected:
                return i, None, digest, f"{uri} changed since the dataset was indexed (sha256 differs); re-index it"
            return i, data, digest, None

        out = {}
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for i, data, digest, reason in pool.map(read, range(len(task.uris))):
                if digest is not None:
                    digests[task.start + i] = digest
                if reason is None:
                    out[task.start + i] = data
                else:
                    failures[task.start + i] = reason
        return out

    def _forward(self, batches: Sequence[Sequence[int]], images: dict[int, torch.Tensor],
                 failures: dict[int, str]) -> dict[int, np.ndarray]:
        """Features by row for ``batches`` (rows of ``images``); rows that fail go to ``failures``."""
        out: dict[int, np.ndarray] = {}
        for batch in batches:
            batch = list(batch)
            try:
                out.update(self._forward_batch(batch, images))
            except RuntimeError as exc:  # e.g. out of memory: retry one by one to isolate the culprit
                if len(batch) == 1:
                    failures[batch[0]] = f"forward failed: {str(exc).splitlines()[0]}"
                    continue
                for row in batch:
                    try:
                        out.update(self._forward_batch([row], images))
                    except RuntimeError as single:
                        failures[row] = f"forward failed: {str(single).splitlines()[0]}"
        for row in [r for r, v in out.items() if not np.all(np.isfinite(v))]:
            failures[row] = "non-finite features (overflow in float16)"
            del out[row]
        return out

    def _forward_batch(self, rows: list[int], images: dict[int, torch.Tensor]) -> dict[int, np.ndarray]:
        batch = torch.stack([images[r] for r in rows]).permute(0, 3, 1, 2)  # NHWC uint8 → NCHW
        self.forward_passes += 1
        feats = self.extractor(batch).float().cpu().numpy().astype(np.float16)
        return dict(zip(rows, feats))


def _size(image: torch.Tensor) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])  # HWC


class ShardWorker:
    """The extraction job's Ray actor: one ``ShardExtractor``, torch at ``threads`` threads (the
    actor's CPUs). A ``UserError`` while building it (weights that differ from the entry's, an
    unknown backbone) is kept and raised by ``ready`` and ``run``, so the driver reports it as
    the user's mistake instead of Ray restarting an actor that would fail the same way."""

    def __init__(self, threads: int = 1, **kwargs):
        torch.set_num_threads(max(1, int(threads)))
        self.error: UserError | None = None
        try:
            self.extractor = ShardExtractor(**kwargs)
        except UserError as exc:
            self.error = exc

    def ready(self) -> None:
        if self.error is not None:
            raise self.error

    def run(self, tasks: Sequence[ShardTask]) -> list[ShardResult]:
        """``ShardExtractor.run_all`` on a group of shards (see there for failures)."""
        self.ready()
        return self.extractor.run_all(tasks)
