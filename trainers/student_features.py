"""A frozen student backbone's pooled features, computed once per image into the store.

A student with ``freeze_backbone`` (Table V, "non-trainable") trains only its FC layers; what
they see of an image is the backbone's pooled feature at the student's view, a pure function of
the stored view (featurestore/pixels.py) and the backbone's weights, since a frozen backbone
stays in eval mode. So it is stored like any other feature: a feature table of an extractor
whose one backbone is the student's (its weight digest), whose input policy is the stored view
(``pixels_key``, which names view and decoder) and whose pooling is the backbone's own
(``timm``'s forward with the classifier removed), in float32, the dtype training uses. Every
seed, loss, split and experiment with that backbone and view then reads the rows it needs, and a
frozen KD-vs-baseline run costs the FC layers' steps, not a backbone forward per step.

The rows are computed from the stored views by Ray tasks, a group of segment shards each (in
this process when no Ray instance runs). An image without a stored view has no row; the stream
counts it as unreadable with the view's failure reason, as it would have counted the view.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from featurestore.dataset_table import hash_bytes, hashes_from_hex, hashes_to_hex
from featurestore.errors import UserError
from featurestore.features import (GSF_ARRAY, HASH_ARRAY, FeatureIndex, read_features, register_segment, segment_spec,
                                   table_segments)
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows
from featurestore.pixels import PIXELS_ARRAY, PixelViewSpec, pixel_index, pixels_key
from featurestore.specs import BackboneSpec, EntrySpec, ExtractorSpec
from featurestore.store import FeatureStore
from trainers.backbones import backbone_specs, canonical_name, create_model, pooled_width
from trainers.student import Student, StudentSpec
from trainers.student_views import StoredViews, run_shard_tasks

POOLING = "backbone"  # the backbone's own global pooling: timm's forward with num_classes=0
LAYER = "pooled"
CHUNK_ROWS = 32
BATCH_ROWS = 64


class PooledFailed(UserError, RuntimeError):
    """Some shards of pooled student features could not be written, even after retries."""


@dataclass(frozen=True, eq=False)
class StoredPooled:
    """Where the pooled features of a run's images are (``index``: ok rows only), why the others
    have none (``failures``: the stored views' reasons) and how many rows this call computed."""

    extractor: ExtractorSpec
    index: FeatureIndex
    failures: dict[bytes, str]
    computed: int


def pooled_extractor(student: StudentSpec, view: PixelViewSpec, use_gpu: bool) -> ExtractorSpec:
    """The feature table a frozen ``student`` reads at the stored ``view``: keyed by the backbone's
    weight digest (from the digest cache; no weights loaded here), the view and the precision."""
    name = canonical_name(student.backbone)
    weights = backbone_specs([name], student.weights)[0].weights
    width = pooled_width(name)
    return ExtractorSpec(backbones=(BackboneSpec(name=name, weights=weights, layers=(LAYER,), width=width),),
                         input_policy=f"stored-view:{pixels_key(view)}", pooling=POOLING,
                         compute_dtype="bfloat16" if use_gpu else "float32", dtype="float32")


def stored_pooled(store_url: str, extractor: ExtractorSpec, views: StoredViews) -> StoredPooled:
    """The pooled features under ``extractor`` as they are (a worker's read side)."""
    store = FeatureStore(store_url, create=False)
    return StoredPooled(extractor, FeatureIndex.build(store, table_segments(store, extractor)), views.failures, 0)


def ensure_pooled(store_url: str, student: StudentSpec, views: StoredViews, hashes: np.ndarray, use_gpu: bool,
                  log: Callable[[str], None] = lambda line: None) -> StoredPooled:
    """Make sure every image of ``hashes`` that has a stored view also has its pooled feature
    under ``student``'s frozen backbone; compute the missing ones from the stored views."""
    store = FeatureStore(store_url)
    extractor = pooled_extractor(student, views.view, use_gpu)
    hashes = np.unique(hashes)
    viewed = hashes[views.index.lookup(hashes)[0]]
    todo = FeatureIndex.build(store, table_segments(store, extractor)).missing(viewed)
    if not len(todo):
        return stored_pooled(store_url, extractor, views)
    spec = segment_spec(extractor, todo)
    shard_rows = default_shard_rows(extractor.width * 4, chunk_rows=CHUNK_ROWS)
    layout = EntryLayout(rows=len(todo), shard_rows=shard_rows, chunk_rows=CHUNK_ROWS,
                         arrays=(ArraySpec(GSF_ARRAY, extractor.width, extractor.dtype), ArraySpec(HASH_ARRAY, 32, "uint8")))
    writer = store.create(spec, layout, attrs={"summary": f"{extractor.backbones[0].name} pooled features at "
                                                          f"{views.view.view}, {len(todo)} images"})
    shards = writer.missing_shards()
    computed = sum(len(range(*layout.shard_range(s))) for s in shards)
    if shards:
        log(f"pooling {computed} images through the frozen {extractor.backbones[0].name} into {spec.key}")
        errors = run_shard_tasks(write_pooled_shards, layout, shards, 1 if use_gpu else 0, lambda lo, hi, group: (
            store_url, spec.to_json(), layout.to_json(), student.to_json(), views.view.to_json(),
            hashes_to_hex(todo[lo:hi]), group, lo))
        if failed := writer.missing_shards():
            raise PooledFailed(f"pooled features {spec.key}: {len(failed)} of {layout.num_shards} shard(s) could not "
                               f"be written ({str(errors[0]).splitlines()[-1] if errors else 'no error reported'}); "
                               "the others are committed: rerun to retry exactly those")
    writer.finalize()
    register_segment(store, extractor, store.open(spec.key))
    return replace(stored_pooled(store_url, extractor, views), computed=computed)


def write_pooled_shards(store_url: str, spec: dict, layout: dict, student: dict, view: dict, hashes_hex: list[str],
                        shards: list[int], first_row: int) -> int:
    """Ray task: compute and commit ``shards`` of pooled-feature segment ``spec`` from the stored
    ``view``s of their images; ``hashes_hex`` covers the shards' rows from ``first_row`` on."""
    entry, layout_ = EntrySpec.from_json(spec), EntryLayout.from_json(layout)
    extractor = ExtractorSpec.from_json(entry.identity["extractor"])
    store = FeatureStore(store_url, create=False)
    writer = store.create(entry, layout_)
    pixel_view = PixelViewSpec.from_json(view)
    spec_ = StudentSpec.from_json(student)
    backbone, digest = create_model(spec_.backbone, spec_.weights)
    if digest != extractor.backbones[0].weights:
        raise PooledFailed(f"the weights {spec_.weights!r} of {spec_.backbone} changed since this run was planned "
                           "(their digest differs); rerun to plan with the new weights")
    backbone.reset_classifier(0)  # as trainers.student builds it: the backbone outputs the pooled feature
    device = torch.device("cuda" if extractor.compute_dtype == "bfloat16" else "cpu")
    model = Student(spec_, backbone).to(device)
    hashes = hashes_from_hex(hashes_hex)
    views_index = pixel_index(store, pixel_view)
    written = 0
    for shard in shards:
        if writer.is_committed(shard):
            continue
        start, stop = layout_.shard_range(shard)
        rows = hashes[start - first_row:stop - first_row]
        pooled = np.empty((len(rows), extractor.width), np.float32)
        for i in range(0, len(rows), BATCH_ROWS):
            part = rows[i:i + BATCH_ROWS]
            pixels = read_features(store, views_index, part, array=PIXELS_ARRAY)
            images = torch.from_numpy(pixels.reshape(len(part), pixel_view.height, pixel_view.width, 3))
            pooled[i:i + len(part)] = pool(model, images.permute(0, 3, 1, 2).to(device))
        writer.write_shard(shard, {GSF_ARRAY: pooled, HASH_ARRAY: hash_bytes(rows)})
        written += len(rows)
    return written


@torch.inference_mode()
def pool(model, images: torch.Tensor) -> np.ndarray:
    """``model.pool`` of NCHW uint8 images as float32 numpy, under bf16 autocast on CUDA (as the
    training forward of the same frozen backbone)."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
        return model.pool(images).float().cpu().numpy()

