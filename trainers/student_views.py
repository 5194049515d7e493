"""Decode each image's student view once into the store (featurestore/pixels.py), before training.

A run asks for the views of the images it will train and validate on. The ones the view's
table lacks are decoded by Ray tasks, one group of shards each, on GPUs (DALI "mixed") when the
run trains on GPUs, else on CPUs; every later run, seed and loss with the same view reads them.

A task reads each image once, checks its SHA-256 against the dataset index, decodes it to the
view and commits whole shards. A missing file, changed bytes or an undecodable image fails its
row, with the reason, and the loader skips it (counted as unreadable); any other read error is
transient: the task raises, Ray retries it, and a shard that still fails stays uncommitted so
that the next run retries exactly it.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from featurestore import sources
from featurestore.dataset_table import hashes_from_hex, hashes_of, hashes_to_hex
from featurestore.errors import UserError
from featurestore.features import HASH_ARRAY, FeatureIndex
from featurestore.layout import EntryLayout
from featurestore.pixels import PixelViewSpec, create_segment, pixel_index, register, write_pixel_shard
from featurestore.specs import EntrySpec
from featurestore.store import FeatureStore
from trainers.images import ImageDecoder, _dali_installed
from trainers.student import parse_view, view_size

READ_THREADS = 8
TASK_RETRIES = 3
SHARDS_PER_TASK = 4


class ViewsFailed(UserError, RuntimeError):
    """Some shards of stored views could not be written, even after retries."""


def decoder_name(device: str) -> str:
    return "pil" if device == "pil" else f"dali-{device}"


def pixel_view(view: str, use_gpu: bool) -> PixelViewSpec:
    """The stored view a run on GPUs (``use_gpu``) or CPUs decodes and reads."""
    device = "mixed" if use_gpu else "cpu" if _dali_installed() else "pil"
    height, width = view_size(view)
    return PixelViewSpec(view=view, height=height, width=width, decoder=decoder_name(device))


def view_decoder(view: PixelViewSpec, batch_size: int = 32) -> ImageDecoder:
    kind, size = parse_view(view.view)
    device = view.decoder.removeprefix("dali-")
    return ImageDecoder(device, batch_size=batch_size, **{kind: size})


@dataclass(frozen=True, eq=False)
class StoredViews:
    """Where the views of a run's images are (``index``: ok rows only), why the others have none
    (``failures``: image hash → reason) and how many images this call decoded."""

    view: PixelViewSpec
    index: FeatureIndex
    failures: dict[bytes, str]
    decoded: int


def ensure_views(store_url: str, view: PixelViewSpec, hashes: np.ndarray, uris: list[str],
                 log: Callable[[str], None] = lambda line: None) -> StoredViews:
    """Make sure every image of ``hashes`` (sorted, distinct; ``uris[i]`` is where to read
    ``hashes[i]``) has a
    stored view or a recorded failure; decode the missing ones on Ray tasks (in this process
    when no Ray instance is running: a library caller on a laptop, a benchmark)."""
    store = FeatureStore(store_url)
    index = pixel_index(store, view)
    todo = index.missing(hashes)
    if not len(todo):
        return stored_views(store_url, view)
    todo_uris = [uris[i] for i in np.searchsorted(hashes, todo)]
    writer = create_segment(store, view, todo, todo_uris)
    shards = writer.missing_shards()
    decoded = sum(len(range(*writer.layout.shard_range(s))) for s in shards)
    if shards:
        log(f"decoding the {view.view} view of {decoded} images into {writer.key} ({len(shards)} shards)")
        gpus = 1 if view.decoder == decoder_name("mixed") else 0
        errors = run_shard_tasks(write_shards, writer.layout, shards, gpus, lambda lo, hi, group: (
            store_url, writer.spec.to_json(), writer.layout.to_json(), hashes_to_hex(todo[lo:hi]), todo_uris[lo:hi],
            group, lo))
        if failed := writer.missing_shards():
            raise ViewsFailed(f"stored views {writer.key}: {len(failed)} of {writer.layout.num_shards} shard(s) could "
                              f"not be written ({str(errors[0]).splitlines()[-1] if errors else 'no error reported'}); "
                              "the others are committed: rerun to retry exactly those")
    writer.finalize()
    register(store, store.open(writer.key))
    return replace(stored_views(store_url, view), decoded=decoded)


def run_shard_tasks(task: Callable[..., int], layout: EntryLayout, shards: list[int], gpus: int,
                    arguments: Callable[[int, int, list[int]], tuple]) -> list[Exception]:
    """Run ``task(*arguments(lo, hi, group))`` for each group of ``SHARDS_PER_TASK`` shards, where
    ``[lo, hi)`` are the rows from the group's first shard to its last: as Ray tasks (retried
    ``TASK_RETRIES`` times) when a Ray instance runs, else in this process. Returns the errors of
    the groups that failed; the caller names the shards they left uncommitted."""
    import ray

    if ray.is_initialized():
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=TASK_RETRIES)(task)
        submit, result = remote.remote, ray.get
    else:
        submit, result = task, lambda done: done
    pending, errors = [], []
    for i in range(0, len(shards), SHARDS_PER_TASK):
        group = shards[i:i + SHARDS_PER_TASK]
        lo, hi = layout.shard_range(group[0])[0], layout.shard_range(group[-1])[1]
        try:
            pending.append(submit(*arguments(lo, hi, group)))
        except Exception as exc:  # noqa: BLE001 - in-process: reported by the caller, with the shards it left
            errors.append(exc)
    for ref in pending:
        try:
            result(ref)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, with the shards it left
            errors.append(exc)
    return errors


def stored_views(store_url: str, view: PixelViewSpec) -> StoredViews:
    """The stored views under ``view`` as they are (a worker's read side of :func:`ensure_views`);
    an image that failed in one segment but has a view in another is not a failure."""
    store = FeatureStore(store_url, create=False)
    index = pixel_index(store, view)
    failures: dict[bytes, str] = {}
    for key in index.segments:
        segment = store.open(key)
        if reasons := segment.failures():
            row_hashes = hashes_of(segment.read_range(0, segment.rows, [HASH_ARRAY])[HASH_ARRAY])
            rows = np.fromiter(reasons, np.int64, len(reasons))
            viewed = index.lookup(row_hashes[rows])[0]
            failures.update({bytes(row_hashes[r]): reasons[int(r)] for r in rows[~viewed]})
    return StoredViews(view, index, failures, 0)


def write_shards(store_url: str, spec: dict, layout: dict, hashes_hex: list[str], uris: list[str],
                 shards: list[int], first_row: int) -> int:
    """Ray task: decode and commit ``shards`` of segment ``spec``; ``hashes_hex``/``uris`` cover
    the shards' rows from ``first_row`` on. Returns the rows written."""
    entry = EntrySpec.from_json(spec)
    view = PixelViewSpec.from_json(entry.identity["view"])
    hashes = hashes_from_hex(hashes_hex)
    writer = FeatureStore(store_url, create=False).create(entry, EntryLayout.from_json(layout))
    decoder = view_decoder(view)
    written = 0
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="view-read") as pool:
        for shard in shards:
            if writer.is_committed(shard):
                continue
            start, stop = writer.layout.shard_range(shard)
            local = range(start - first_row, stop - first_row)
            encoded = list(pool.map(lambda i: _read(uris[i], hashes_hex[i]), local))
            failures = {r: e for r, e in enumerate(encoded) if isinstance(e, str)}
            results = decoder.decode([e if isinstance(e, bytes) else b"" for e in encoded])
            pixels = np.zeros((len(local), view.height, view.width, 3), np.uint8)
            for r, result in enumerate(results):
                if r in failures:
                    continue
                if result.image is None:
                    failures[r] = f"cannot decode {uris[local[r]]}: {result.reason}"
                else:
                    pixels[r] = result.image.cpu().numpy()
            write_pixel_shard(writer, shard, hashes[local.start:local.stop], pixels, failures)
            written += len(local)
    return written


def _read(uri: str, sha256_hex: str) -> bytes | str:
    """The image's bytes, or why its row fails for good; a transient error raises (task retry)."""
    try:
        data = sources.read_bytes(uri)
    except sources.MissingSourceError as exc:
        return f"cannot read: {exc}"
    if hashlib.sha256(data).hexdigest() != sha256_hex:
        return f"{uri}: its bytes differ from the indexed image (sha256 mismatch); re-index the dataset"
    return data
