"""Teacher features for one segment shard: read → verify → decode → full-resolution forward → pool → write.

A shard is the unit of work of the extraction job: one ``ShardExtractor`` (inside one Ray actor)
computes every row of it and writes it whole, so the store's one-writer-per-shard rule holds and
a crashed job resumes at shard granularity.

The teacher sees each image at full resolution. Images of identical size are batched together
(up to ``batch_size`` images and ``batch_pixels`` pixels); every other image runs as a batch of
one, so no padding ever leaks into the pooled features. Grouping depends only on the shard's
contents, so recomputing a shard reproduces it bit for bit on the same hardware.

Every row ends up either ok or failed with a reason that belongs to the image (missing file,
changed bytes, undecodable, forward error, non-finite features); the job never stops for one bad
image. An I/O error that is not "the object is gone" fails the shard instead, so a transient
fault is retried and never becomes a permanent failed row.

``run_all`` pipelines the shards of one call so the backbones do not wait on I/O: while shard
*i* is forwarded, a loader thread reads, hash-checks and decodes shard *i + 1* (one shard ahead,
so memory holds at most two shards of images) and a writer thread commits shard *i − 1* (one
write pending). Each stage does its own work in the sequential order, so rows, batches and bytes
are those of one-shard-at-a-time. A shard whose read or write fails stays uncommitted while the
others of the call go on; the call then raises, and no result is returned before every shard's
commit has returned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


class SpecMismatch(UserError, RuntimeError):
    """A worker loaded weights that differ from the ones the entry's key was computed from."""


@dataclass(frozen=True)
class ShardTask:
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


def size_batches(sizes: dict[int, tuple[int, int]], batch_size: int, batch_pixels: int) -> list[list[int]]:
    """Rows grouped by identical (H, W), in a deterministic order, split by count and pixel budget."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row in sorted(sizes):
        groups[sizes[row]].append(row)
    batches = []
    for (h, w), rows in sorted(groups.items()):
        per_batch = max(1, min(batch_size, batch_pixels // max(h * w, 1)))
        batches += [rows[i:i + per_batch] for i in range(0, len(rows), per_batch)]
    return batches


class ShardExtractor:
    """Computes and writes whole shards of a GSF entry. Built once per worker (loads the weights)."""

    def __init__(self, store: str, spec: dict, layout: dict, backbones: Sequence[str], weights: str | dict,
                 max_pixels: int, batch_size: int = 8, batch_pixels: int = 4 * 1024 * 1024,
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
        """Compute and commit ``tasks`` in order, loading the next shard and writing the previous
        one while the current one is forwarded (see the module docstring).

        A shard whose load, compute or write fails stays uncommitted and the others go on; then
        the first error is raised, so the call is retried and redoes exactly the uncommitted
        shards (a shard that fails for good does not take the rest of its call with it). A
        shard's ``seconds`` is the wall time the pipeline spent on it, so the results' sum is
        the call's wall time.
        """
        results: list[ShardResult | None] = [None] * len(tasks)
        errors: list[Exception] = []
        # Leaving the executors waits for their work: a pending write always finishes.
        with ThreadPoolExecutor(1, thread_name_prefix="shard-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="shard-write") as writer:
            upcoming = loader.submit(self._load, tasks[0]) if tasks else None
            pending: tuple[int, Future] | None = None  # the one write in flight, by task index
            mark = time.perf_counter()
            for i, task in enumerate(tasks):
                try:
                    loaded = upcoming.result()
                except Exception as exc:  # noqa: BLE001 - this shard stays uncommitted; the others go on
                    errors.append(exc)
                    continue
                finally:
                    upcoming = loader.submit(self._load, tasks[i + 1]) if i + 1 < len(tasks) else None
                if loaded is None:  # an earlier attempt committed it
                    results[i] = ShardResult(task.shard, len(task.uris), 0, 0, 0, 0.0)
                    continue
                images, failures = loaded
                forwards_before = self.forward_passes
                arrays = self._compute(task, images, failures)
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

    def _load(self, task: ShardTask) -> tuple[dict[int, torch.Tensor], dict[int, str]] | None:
        """Decoded images and failures by row; None when the shard is committed already. Runs on
        the loader thread, the only user of the decoder."""
        if self.writer.is_committed(task.shard):
            return None
        failures: dict[int, str] = {}
        encoded = self._read(task, failures)
        images = {}
        rows = sorted(encoded)
        for row, decoded in zip(rows, self.decoder.decode([encoded[r] for r in rows])):
            if decoded.image is None:
                failures[row] = f"cannot decode {task.uris[row - task.start]}: {decoded.reason}"
            else:
                images[row] = decoded.image
        return images, failures

    def _compute(self, task: ShardTask, images: dict[int, torch.Tensor],
                 failures: dict[int, str]) -> dict[str, np.ndarray]:
        """The shard's arrays as the store takes them; forward failures are added to ``failures``."""
        features = np.zeros((len(task.uris), self.extractor.width), np.float16)
        for row, vector in self._forward(images, failures).items():
            features[row - task.start] = vector
        hashes = np.frombuffer(bytes.fromhex("".join(task.sha256)), np.uint8).reshape(-1, 32)
        return {GSF_ARRAY: features, HASH_ARRAY: hashes}

    def _read(self, task: ShardTask, failures: dict[int, str]) -> dict[int, bytes]:
        """Image bytes by row; rows whose file is missing or changed since the manifest fail."""

        def read(i: int) -> tuple[int, bytes | None, str | None]:
            uri, digest = task.uris[i], task.sha256[i]
            if digest == MISSING_SHA256:
                return i, None, f"missing file {uri} (absent when the dataset was indexed)"
            try:
                data = sources.read_bytes(uri)
            except sources.MissingSourceError as exc:  # gone (404): a property of the dataset, a failed row
                return i, None, f"cannot read {uri}: {exc}"
            # any other read error (5xx after the client's retries, a reset, EIO) propagates: the
            # shard stays uncommitted and is retried, never recorded as a failed row
            if hashlib.sha256(data).hexdigest() != digest:
                return i, None, f"{uri} changed since the dataset was indexed (sha256 differs); re-index it"
            return i, data, None

        out = {}
        with ThreadPoolExecutor(READ_THREADS) as pool:
            for i, data, reason in pool.map(read, range(len(task.uris))):
                if reason is None:
                    out[task.start + i] = data
                else:
                    failures[task.start + i] = reason
        return out

    def _forward(self, images: dict[int, torch.Tensor], failures: dict[int, str]) -> dict[int, np.ndarray]:
        sizes = {row: (int(img.shape[0]), int(img.shape[1])) for row, img in images.items()}
        out: dict[int, np.ndarray] = {}
        for batch in size_batches(sizes, self.batch_size, self.batch_pixels):
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


class ShardActor:
    """Ray Data callable class: each input row is one JSON-encoded ``ShardTask``."""

    def __init__(self, **kwargs):
        torch.set_num_threads(max(1, int(kwargs.pop("threads", 1))))
        self.extractor = ShardExtractor(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks = [json.loads(str(text)) for text in batch["task"]]
        results = self.extractor.run_all([ShardTask(t["shard"], t["start"], tuple(t["uris"]), tuple(t["sha256"]))
                                          for t in tasks])
        return {"result": np.array([json.dumps(dataclasses.asdict(r)) for r in results], dtype=object)}
