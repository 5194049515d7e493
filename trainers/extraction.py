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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
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

    def run(self, task: ShardTask) -> ShardResult:
        started = time.perf_counter()
        if self.writer.is_committed(task.shard):
            return ShardResult(task.shard, len(task.uris), 0, 0, 0, 0.0)  # an earlier attempt wrote it
        forwards_before = self.forward_passes
        failures: dict[int, str] = {}
        encoded = self._read(task, failures)
        images = {}
        rows = sorted(encoded)
        for row, decoded in zip(rows, self.decoder.decode([encoded[r] for r in rows])):
            if decoded.image is None:
                failures[row] = f"cannot decode {task.uris[row - task.start]}: {decoded.reason}"
            else:
                images[row] = decoded.image
        features = np.zeros((len(task.uris), self.extractor.width), np.float16)
        for row, vector in self._forward(images, failures).items():
            features[row - task.start] = vector
        hashes = np.frombuffer(bytes.fromhex("".join(task.sha256)), np.uint8).reshape(-1, 32)
        commit = self.writer.write_shard(task.shard, {GSF_ARRAY: features, HASH_ARRAY: hashes}, failures=failures)
        return ShardResult(task.shard, len(task.uris), commit.ok, commit.failed,
                           self.forward_passes - forwards_before, time.perf_counter() - started)

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
        results = []
        for text in batch["task"]:
            task = json.loads(str(text))
            result = self.extractor.run(ShardTask(task["shard"], task["start"], tuple(task["uris"]),
                                                  tuple(task["sha256"])))
            results.append(json.dumps(dataclasses.asdict(result)))
        return {"result": np.array(results, dtype=object)}
