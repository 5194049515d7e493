"""The extraction's faster paths against the reference path: batching sizes across the shards of
one call must give the GSF bytes of batching inside each shard, and do fewer forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_data import jpeg_bytes
from test_extract import shard_tasks

from featurestore.features import GSF_ARRAY
from featurestore.specs import EntrySpec
from featurestore.store import FeatureStore
from trainers.backbones import build_extractor
from trainers.extraction import ShardBatches, ShardExtractor, ShardResult, ShardTask, shard_batches, size_batches
from trainers.images import ImageDecoder

# (width, height) per row, three rows per shard. At these photo-like sizes resnet18's CPU forward
# gives the same bytes whatever an image's batch companions (not so at e.g. 64×48).
A, B, C = (320, 240), (240, 320), (400, 300)
ROW_SIZES = (A, B, A, A, C, B, A, A, C)
SHARD_ROWS, BATCH_SIZE = 3, 4


def images_of(sizes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {str(1000 + i): jpeg_bytes(rng, w, h) for i, (w, h) in enumerate(sizes)}


def per_shard_reference(images: dict[str, bytes], tasks) -> np.ndarray:
    """GSF rows as the per-shard path computes them: each shard's sizes batched on their own."""
    reference = build_extractor(["resnet18"], "random:0", device="cpu")
    decoded = [d.image for d in ImageDecoder(device="cpu").decode(list(images.values()))]
    expected = np.zeros((len(images), reference.width), np.float16)
    for task in tasks:
        sizes = {r: tuple(decoded[r].shape[:2]) for r in range(task.start, task.start + len(task.uris))}
        for batch in size_batches(sizes, BATCH_SIZE, 4 * 1024 * 1024):
            expected[batch] = reference(torch.stack([decoded[r] for r in batch]).permute(0, 3, 1, 2)).numpy()
    return expected


def stored_rows(kwargs) -> np.ndarray:
    reader = FeatureStore(kwargs["store"]).open(EntrySpec.from_json(kwargs["spec"]).key, require_complete=False)
    return reader.read_range(0, reader.layout.rows, [GSF_ARRAY])[GSF_ARRAY]


def test_partial_batches_are_topped_up_from_the_next_shard_by_size():
    hw = {r: (h, w) for r, (w, h) in enumerate(ROW_SIZES)}
    first = shard_batches({r: hw[r] for r in (0, 1, 2)}, {r: hw[r] for r in (3, 4, 5)}, BATCH_SIZE, 1 << 22)
    assert first == ShardBatches(full=(), topped_up=((0, 2, 3), (1, 5)))  # sorted by size: B (240 rows) first
    # a full batch borrows nothing; the pixel budget bounds a batch like the count does
    two_per_batch = 2 * 240 * 320
    assert shard_batches({0: hw[0], 2: hw[2]}, {3: hw[3]}, BATCH_SIZE, two_per_batch) == \
        ShardBatches(full=((0, 2),), topped_up=())
    assert shard_batches({0: hw[0]}, {3: hw[3], 6: hw[6]}, BATCH_SIZE, two_per_batch) == \
        ShardBatches(full=(), topped_up=((0, 3),))
    assert shard_batches({4: hw[4]}, {}, BATCH_SIZE, 1 << 22) == ShardBatches(full=(), topped_up=((4,),))


def test_batches_across_shards_give_the_per_shard_bytes_in_fewer_forward_passes(tmp_path):
    images = images_of(ROW_SIZES)
    kwargs, tasks = shard_tasks(tmp_path, images, shard_rows=SHARD_ROWS)
    kwargs["batch_size"] = BATCH_SIZE
    results = ShardExtractor(**kwargs).run_all(tasks)
    assert [(r.shard, r.ok, r.failed) for r in results] == [(0, 3, 0), (1, 3, 0), (2, 3, 0)]
    # per shard: {A×2, B}, {A, B, C}, {A×2, C} = 7 passes; across shards: [0 2 3] [1 5] [4 8] [6 7]
    assert [r.forward_passes for r in results] == [2, 1, 1]
    assert stored_rows(kwargs).tobytes() == per_shard_reference(images, tasks).tobytes()


@pytest.mark.parametrize("committed_first", [1, 2])
def test_a_committed_or_failed_next_shard_lends_nothing(tmp_path, committed_first):
    """A retried call skips its committed shards: the shards before them batch alone, same bytes.
    A row that cannot be decoded is a failed row of its own shard, never a companion."""
    images = images_of(ROW_SIZES)
    images["1008"] = b"not an image"
    kwargs, tasks = shard_tasks(tmp_path, images, shard_rows=SHARD_ROWS)
    kwargs["batch_size"] = BATCH_SIZE
    extractor = ShardExtractor(**kwargs)
    extractor.run_all([tasks[committed_first]])
    results = extractor.run_all(tasks)
    skipped = ShardResult(committed_first, SHARD_ROWS, 0, 0, 0, 0.0)  # what a committed shard reports
    assert results[committed_first] == skipped
    assert [r.failed for r in results] == [0, 0, 0 if committed_first == 2 else 1]
    decodable = tasks[:2] + [ShardTask(2, 6, tasks[2].uris[:2], tasks[2].sha256[:2])]
    expected = per_shard_reference({k: v for k, v in images.items() if k != "1008"}, decodable)
    got = stored_rows(kwargs)
    assert got[:8].tobytes() == expected[:8].tobytes() and not got[8].any()
    reader = FeatureStore(kwargs["store"]).open(EntrySpec.from_json(kwargs["spec"]).key, require_complete=False)
    assert list(reader.failures()) == [8] and "cannot decode" in reader.failures()[8]
