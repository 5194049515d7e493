"""The extraction stage: run the backbones once at full resolution and store MLSP features (GSFs).

Features belong to images: a GSF row is keyed by the SHA-256 of the image bytes and the
extractor (backbones, weight digests, input policy, precision), never by labels, splits, names
or URIs. The job computes only the images the extractor's feature table lacks, as one new
segment (featurestore/features.py), then writes this dataset's view of the table: the ``gsf``
entry named in the result, which ``ray_jobs.distill`` takes as ``gsf_entry``. A re-split, a
relabel or a moved dataset costs no forward pass; a dataset that gains k images costs k.

The work unit is one segment shard, handed in small groups to plain Ray backbone actors (one GPU
each when the cluster has GPUs) by the driver (``run_shards``). ``extract`` returns an ``ExtractResult``; the job
``ray_jobs.extract`` prints it as its JSON line.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from featurestore.dataset_table import MISSING_HASH, hashes_to_hex
from featurestore.errors import UserError
from featurestore.features import (GSF_ARRAY, HASH_ARRAY, FeatureIndex, register_segment, segment_spec,
                                   segment_uris, table_segments)
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows
from featurestore.specs import ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import view_spec, write_view
from ray_jobs.config import ConfigError, option
from ray_jobs.stages.dataset_input import DatasetConfig, load_table
from ray_jobs.runtime import Progress, cluster_gpus, init_ray, is_local, log, verbose
from trainers.backbones import backbone_specs, expand_names
from trainers.extraction import ShardTask, ShardWorker, input_policy

JOB = "extract"
CHUNK_ROWS = 32
SHARD_RETRIES = 3  # attempts per shard call after the first, and actor restarts
CALLS_IN_FLIGHT = 2  # per actor: the next call is queued while it computes, no more (backpressure)


class ShardsFailed(UserError, RuntimeError):
    """Shards that could not be computed even after retries; they stay uncommitted."""


@dataclass(frozen=True)
class ExtractConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    store: str = option("./store", help="feature store: local directory or s3://bucket/prefix")
    backbones: tuple[str, ...] = option(("lite_trio",), help="timm names, aliases or groups (paper_trio, lite_trio)")
    weights: str | dict[str, str] = option(
        "packaged", help="hub | packaged | random:<seed> | path | s3:// URI, or a mapping backbone -> source")
    max_pixels: int = option(4096 * 4096, help="larger images are downscaled to this many pixels")
    shard_rows: int = option(0, help="rows per store shard = work unit; 0 picks ~16 MiB shards, ≥4 per worker")
    workers: int = option(1, help="backbone actors (one GPU each when the cluster has GPUs)")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per actor; also its torch thread count")
    batch_size: int = option(8, help="images of identical size forwarded together")
    device: str = option("auto", help="auto | cpu | cuda (auto: cuda when the cluster has GPUs)")
    ray_address: str | None = option(None, help="Ray cluster address; default RAY_ADDRESS or a local instance")
    num_cpus: int | None = option(None, help="logical CPUs of a local Ray instance (default max(4, cores))")

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} must be auto, cpu or cuda")
        if self.workers < 1 or self.batch_size < 1 or self.max_pixels < 1 or self.shard_rows < 0:
            raise ConfigError("workers, batch_size and max_pixels must be ≥ 1 and shard_rows ≥ 0")
        if self.shard_rows % CHUNK_ROWS:
            raise ConfigError(f"shard_rows must be a multiple of {CHUNK_ROWS}")
        if self.dataset.path is None:
            raise ConfigError("dataset.path is required: the dataset to extract features of")


def pick_shard_rows(rows: int, width: int, workers: int) -> int:
    """~16 MiB shards, but small enough that every worker gets at least four."""
    by_size = default_shard_rows(width * 2, chunk_rows=CHUNK_ROWS)
    by_parallelism = math.ceil(max(rows, 1) / (4 * workers) / CHUNK_ROWS) * CHUNK_ROWS
    return max(CHUNK_ROWS, min(by_size, by_parallelism))


def extractor_spec(cfg: ExtractConfig, compute_dtype: str) -> ExtractorSpec:
    """What features are keyed by: backbone specs (weight digests from the cache, no model
    loaded on the driver), input policy, precision."""
    backbones = backbone_specs(list(cfg.backbones), cfg.weights)
    return ExtractorSpec(backbones=backbones, input_policy=input_policy(cfg.max_pixels), compute_dtype=compute_dtype)


@dataclass(frozen=True)
class ExtractPlan:
    """What an extraction of a config would do, found without computing anything: ``entry`` is the
    dataset's view (complete already when ``reused``), ``missing_rows`` the images whose features
    the store lacks, i.e. the forward passes a run would make."""

    entry: str
    reused: bool
    rows: int
    missing_rows: int
    compute_dtype: str


def plan_extract(cfg: ExtractConfig, store: FeatureStore | None, use_gpu: bool) -> ExtractPlan:
    """The view a run would write or reuse (``store`` None: a store that does not exist yet). A
    complete view of either precision is reused (a CPU run can reuse a GPU extraction and the
    other way round); otherwise the plan is at the precision of this run's device."""
    table = load_table(cfg.dataset)
    run_dtype = "bfloat16" if use_gpu else "float32"
    for dtype in (run_dtype, "float32" if use_gpu else "bfloat16"):
        if store is not None and (done := store.find(view_spec(extractor_spec(cfg, dtype), table))) is not None:
            return ExtractPlan(entry=done.key, reused=True, rows=len(table), missing_rows=0, compute_dtype=dtype)
    extractor = extractor_spec(cfg, run_dtype)
    missing = np.unique(table.sha256[table.sha256 != MISSING_HASH]) if store is None else \
        FeatureIndex.build(store, table_segments(store, extractor)).missing(table.sha256)
    return ExtractPlan(entry=view_spec(extractor, table).key, reused=False, rows=len(table),
                       missing_rows=len(missing), compute_dtype=run_dtype)


def resolve_entry(cfg: ExtractConfig, store: FeatureStore) -> str:
    """The key of the complete view this extraction config produced (CPU or GPU run)."""
    if not (plan := plan_extract(cfg, store, use_gpu=False)).reused:
        raise ConfigError(f"no complete GSF entry for this extraction config in {store.url}; run ray_jobs.extract first")
    return plan.entry


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction did. ``entry`` is the dataset's GSF view (``ray_jobs.distill``'s
    ``gsf_entry``); ``segment`` the segment this run wrote or reused, None when every image
    already had features; ``computed_rows`` images computed now, ``reused_rows`` dataset rows
    whose features were stored before; ``seconds`` this run's compute wall time (0 when nothing
    was computed), ``shard_seconds`` the actors' summed time inside shards."""

    entry: str
    store: str
    rows: int
    width: int
    columns: dict[str, list[int]]
    segment: str | None
    ok: int
    failed: int
    computed_rows: int
    reused_rows: int
    forward_passes: int
    reused: bool
    seconds: float
    shard_seconds: float
    images_per_s: float


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Compute the features the store lacks for ``cfg.dataset`` and write the dataset's view."""
    expand_names(cfg.backbones)  # an unknown backbone fails before any slow step
    log(JOB, f"indexing dataset {cfg.dataset.path} ({cfg.dataset.format})")
    table = load_table(cfg.dataset)
    store = FeatureStore(cfg.store)
    # A local run's GPUs are this machine's: decide without starting Ray, so a reused entry is instant.
    if is_local(cfg.ray_address):
        import torch

        gpus = torch.cuda.device_count()
    else:
        init_ray(cfg.ray_address, cfg.num_cpus)
        gpus = cluster_gpus()
    if cfg.device == "cuda" and not gpus:
        raise ConfigError("device=cuda but the Ray cluster has no GPUs")
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    extractor = extractor_spec(cfg, "bfloat16" if use_gpu else "float32")
    columns = {name: list(cols) for name, cols in extractor.column_ranges().items()}
    summary = f"GSF {'+'.join(b.name for b in extractor.backbones)} ({extractor.width}-d), {table.name}"

    index = FeatureIndex.build(store, table_segments(store, extractor))
    todo = index.missing(table.sha256)
    segment, forward_passes, shard_seconds, failures = None, 0, 0.0, {}
    computed = np.zeros(0, todo.dtype)  # the images this run computes
    progress = Progress(JOB, 0, unit="images")
    if len(todo):
        spec = segment_spec(extractor, todo)
        segment = spec.key
        if (done := store.find(spec)) is None:
            log(JOB, f"{len(todo)} of {len(table)} images lack features under this extractor: segment {spec.key}")
            shard_rows = cfg.shard_rows or pick_shard_rows(len(todo), extractor.width, cfg.workers)
            layout = EntryLayout(rows=len(todo), shard_rows=shard_rows, chunk_rows=CHUNK_ROWS,
                                 arrays=(ArraySpec(GSF_ARRAY, extractor.width, "float16"), ArraySpec(HASH_ARRAY, 32, "uint8")))
            writer = store.create(spec, layout, attrs={"summary": f"{summary}: {len(todo)} images", "columns": columns})
            missing = writer.missing_shards()
            computed = np.concatenate([todo[slice(*layout.shard_range(shard))] for shard in missing] or [computed])
            computed_rows = len(computed)
            log(JOB, f"segment {spec.key}: {len(missing)} of {layout.num_shards} shards to compute ({computed_rows} images)")
            init_ray(cfg.ray_address, cfg.num_cpus)
            progress = Progress(JOB, computed_rows, unit="images")
            if missing:
                uris = segment_uris(todo, table.sha256, table.uris)
                forward_passes, shard_seconds = run_shards(cfg, store.url, spec, layout, todo, uris, missing,
                                                           use_gpu, progress)
            if failed := writer.missing_shards():
                raise ShardsFailed(
                    f"segment {spec.key}: {len(failed)} of {layout.num_shards} shard(s) could not be computed after "
                    f"{SHARD_RETRIES} retries (shards {failed[:10]}{', …' if len(failed) > 10 else ''}); the "
                    "others are committed. Rerun the same command to retry exactly those; add --verbose to see the "
                    "workers' errors (they are also in Ray's worker logs)")
            writer.finalize({"summary": summary})
            done = store.open(spec.key)
        else:
            log(JOB, f"segment {spec.key} of the {len(todo)} images without features is complete: reusing it")
        register_segment(store, extractor, done)
        hashes = hashes_to_hex(todo)
        failures = {hashes[r]: reason for r, reason in done.failures().items()}
        index = FeatureIndex.build(store, table_segments(store, extractor))
    else:
        log(JOB, f"all {len(table)} images have features under this extractor: reusing them, 0 forward passes")
    view = write_view(store, extractor, table, index, failures, attrs={"summary": summary})
    final = view.manifest
    computed_rows = len(computed)
    log(JOB, f"entry {view.key} complete: {final['ok']} ok, {final['failed']} failed in {progress.seconds:.1f} s")
    return ExtractResult(
        entry=view.key, store=store.url, rows=len(table), width=extractor.width, columns=columns, segment=segment,
        ok=final["ok"], failed=final["failed"], computed_rows=computed_rows,
        reused_rows=len(table) - int(np.isin(table.sha256, computed).sum()), forward_passes=forward_passes,
        reused=computed_rows == 0, seconds=round(progress.seconds, 3) if computed_rows else 0.0,
        shard_seconds=round(shard_seconds, 3), images_per_s=round(computed_rows / max(progress.seconds, 1e-9), 2))


def run_shards(cfg: ExtractConfig, store_url: str, spec, layout: EntryLayout, hashes: np.ndarray, uris: list[str],
               shards: list[int], use_gpu: bool, progress: Progress) -> tuple[int, float]:
    """Compute ``shards`` of a segment on ``cfg.workers`` backbone actors. Returns the number of
    forward passes made and the actors' summed seconds inside shards (the job's time minus start-up).

    Plain Ray actors, the driver handing out groups of shards: several shards per call let an
    actor load the next shard and write the previous one while it forwards
    (``ShardExtractor.run_all``); a few per call, so the actors still balance and a retried call
    skips its committed shards. Each actor has up to ``CALLS_IN_FLIGHT`` calls, so its next one
    is queued while it computes; the driver sleeps in ``ray.wait`` in between.

    A shard is idempotent until committed, so a failed call is retried (``SHARD_RETRIES`` times,
    on any actor), a lost actor is restarted by Ray (``max_restarts``, its calls retried) and
    replaced once Ray gives up on it, and a shard that fails for good is dropped here and reported
    by the caller (it stays uncommitted, so a rerun retries exactly it) instead of aborting the
    other shards. A user error building an actor (``SpecMismatch``) is raised at once.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    hexes = hashes_to_hex(hashes)
    tasks = []
    for shard in shards:
        start, stop = layout.shard_range(shard)
        tasks.append(ShardTask(shard, start, tuple(uris[start:stop]), tuple(hexes[start:stop])))
    workers = min(cfg.workers, len(shards))
    per_call = max(1, min(4, len(shards) // workers))
    calls = deque((tuple(tasks[i:i + per_call]), 0) for i in range(0, len(tasks), per_call))  # (group, failures)
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0,
        max_restarts=SHARD_RETRIES, max_task_retries=SHARD_RETRIES)
    options = {"store": store_url, "spec": spec.to_json(), "layout": layout.to_json(),
               "backbones": list(cfg.backbones), "weights": cfg.weights, "max_pixels": cfg.max_pixels,
               "batch_size": cfg.batch_size, "device": "cuda" if use_gpu else "cpu",
               "threads": max(1, int(cfg.cpus_per_worker))}
    actors = [actor_cls.remote(**options) for _ in range(workers)]
    try:
        ray.get([actor.ready.remote() for actor in actors])  # a user error building them surfaces here
        running: dict = {}  # ObjectRef → (slot, actor, group, failures)
        busy = [0] * workers
        forward_passes, shard_seconds = 0, 0.0
        while calls or running:
            for slot in range(workers):  # keep every actor's queue full
                while calls and busy[slot] < CALLS_IN_FLIGHT:
                    group, failures = calls.popleft()
                    running[actors[slot].run.remote(group)] = (slot, actors[slot], group, failures)
                    busy[slot] += 1
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, actor, group, failures = running.pop(ref)
            busy[slot] -= 1
            try:
                results = ray.get(ref)
            except RayError as exc:
                if isinstance(exc, RayActorError) and actors[slot] is actor:  # Ray gave up on it: a new one
                    actors[slot] = actor_cls.remote(**options)
                if verbose():
                    log(JOB, f"shards {[t.shard for t in group]} failed (attempt {failures + 1} of "
                             f"{SHARD_RETRIES + 1}): {exc}")
                if failures < SHARD_RETRIES:
                    calls.appendleft((group, failures + 1))
                continue
            for result in results:
                forward_passes += result.forward_passes
                shard_seconds += result.seconds
                progress.add(result.rows)
        return forward_passes, shard_seconds
    finally:
        for actor in actors:
            ray.kill(actor)
