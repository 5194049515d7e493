"""The extraction stage: run the backbones once at full resolution and store MLSP features (GSFs).

Features belong to images: a GSF row is keyed by the SHA-256 of the image bytes and the
extractor (backbones, weight digests, input policy, precision), never by labels, splits, names
or URIs. The job computes only the images the extractor's feature table lacks, as one new
segment (featurestore/features.py), then writes this dataset's view of the table: the ``gsf``
entry named in the result, which ``ray_jobs.distill`` takes as ``gsf_entry``. A re-split, a
relabel or a moved dataset costs no forward pass; a dataset that gains k images costs k.
A first extraction (nothing to reuse) does not hash the images the hash cache does not know
before planning: the workers hash them as they read them to decode, so each image is read once
(``plan_segment``), and the dataset's hashes come from the segment afterwards.

The work unit is one segment shard, handed in small groups to plain Ray backbone actors (one GPU
each when the cluster has GPUs) by the driver (``run_shards``). ``extract`` returns an ``ExtractResult``; the job
``ray_jobs.extract`` prints it as its JSON line.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from featurestore.dataset_table import HASH_DTYPE, MISSING_HASH, DatasetTable, hashes_from_hex, hashes_of, hashes_to_hex
from featurestore.datasets import MISSING_SHA256, IndexedDataset
from featurestore.errors import UserError
from featurestore.features import (GSF_ARRAY, HASH_ARRAY, FeatureIndex, register_segment, segment_spec,
                                   segment_uris, table_segments)
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows
from featurestore.specs import EntrySpec, ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import view_spec, write_view
from ray_jobs.config import ConfigError, option
from ray_jobs.stages.dataset_input import DatasetConfig, index_table, load_table
from ray_jobs.runtime import Progress, cluster_gpus, init_ray, is_local, log, verbose
from trainers.backbones import backbone_specs, expand_names
from trainers.extraction import ALLOCATOR_ENV, ShardTask, ShardWorker, input_policy

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


@dataclass(frozen=True)
class SegmentPlan:
    """The rows of the segment an extraction writes, in order: the known hashes the extractor's
    table lacks (sorted, distinct), then the ``unhashed`` dataset rows (a first extraction: their
    workers hash them as they read them, see featurestore/features.py). ``uris`` and ``expected``
    (hex SHA-256, ``""`` where the worker hashes) are per segment row."""

    spec: EntrySpec
    hashes: np.ndarray
    unhashed: tuple[int, ...]
    uris: tuple[str, ...]
    expected: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.uris)


def plan_segment(extractor: ExtractorSpec, dataset: IndexedDataset, index: FeatureIndex) -> SegmentPlan | None:
    """The segment that gives every image of ``dataset`` features under ``extractor``, None when
    ``index`` has them all. Unhashed rows are only planned as such when the index is empty: with
    features to reuse, the caller hashes them first (``IndexedDataset.hashed``) to see which are new."""
    if dataset.unhashed and len(index):
        raise ValueError("hash the dataset's images before planning against a non-empty feature table")
    known = hashes_from_hex([MISSING_SHA256 if h is None else h for h in dataset.sha256])
    todo = index.missing(known)
    unhashed = tuple(dataset.unhashed)
    if not len(todo) and not unhashed:
        return None
    uris = dataset.rows.uris
    return SegmentPlan(spec=segment_spec(extractor, todo, dataset.fingerprints(unhashed)), hashes=todo,
                       unhashed=unhashed, uris=(*segment_uris(todo, known, uris), *(uris[i] for i in unhashed)),
                       expected=(*hashes_to_hex(todo), *("",) * len(unhashed)))


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Compute the features the store lacks for ``cfg.dataset`` and write the dataset's view."""
    expand_names(cfg.backbones)  # an unknown backbone fails before any slow step
    log(JOB, f"indexing dataset {cfg.dataset.path} ({cfg.dataset.format})")
    dataset = index_table(cfg.dataset)
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
    summary = f"GSF {'+'.join(b.name for b in extractor.backbones)} ({extractor.width}-d), {dataset.name}"

    index = FeatureIndex.build(store, table_segments(store, extractor))
    if dataset.unhashed and len(index):  # features to reuse: hashes decide which images are new
        log(JOB, f"hashing {len(dataset.unhashed)} images the hash cache does not know, to find their features")
        dataset = dataset.hashed()
    plan = plan_segment(extractor, dataset, index)
    segment, forward_passes, shard_seconds, failures = None, 0, 0.0, {}
    computed = np.zeros(0, HASH_DTYPE)  # the images this run computes
    digests: dict[int, str] = {}  # hashes the workers read, of the unhashed rows
    progress = Progress(JOB, 0, unit="images")
    if plan is not None:
        segment = plan.spec.key
        if (done := store.find(plan.spec)) is None:
            if plan.unhashed:
                log(JOB, f"first extraction under this extractor: the workers hash the {len(plan.unhashed)} images "
                         "the hash cache does not know as they read them")
            log(JOB, f"{plan.rows} of {len(dataset.sha256)} images lack features under this extractor: segment {segment}")
            computed_shards, forward_passes, shard_seconds, progress = compute_segment(cfg, store, plan, extractor,
                                                                                        summary, use_gpu)
            done = store.open(segment)
        else:
            computed_shards = []
            log(JOB, f"segment {segment} of the {plan.rows} images without features is complete: reusing it")
        register_segment(store, extractor, done)
        rows = hashes_of(done.read_range(0, done.rows, [HASH_ARRAY])[HASH_ARRAY])  # what each row holds
        digests = dict(zip(plan.unhashed, hashes_to_hex(rows[len(plan.hashes):])))
        computed = np.concatenate([rows[slice(*done.layout.shard_range(s))] for s in computed_shards] or [computed])
        failed = done.failures()  # by row → by image (a gone image fails by itself in the view)
        failures = {h: why for h, why in zip(hashes_to_hex(rows[list(failed)]), failed.values()) if h != MISSING_SHA256}
        index = FeatureIndex.build(store, table_segments(store, extractor))
    else:
        log(JOB, f"all {len(dataset.sha256)} images have features under this extractor: reusing them, 0 forward passes")
    table = DatasetTable.from_manifest(dataset.complete(digests))
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


def compute_segment(cfg: ExtractConfig, store: FeatureStore, plan: SegmentPlan, extractor: ExtractorSpec,
                    summary: str, use_gpu: bool) -> tuple[list[int], int, float, Progress]:
    """Create (or resume) the planned segment, compute its uncommitted shards and finalize it.
    Returns the shards computed now, the forward passes, the actors' in-shard seconds and the
    progress clock. Shards that fail even after retries raise ``ShardsFailed``; the committed
    ones stay, so a rerun computes exactly the rest."""
    shard_rows = cfg.shard_rows or pick_shard_rows(plan.rows, extractor.width, cfg.workers)
    layout = EntryLayout(rows=plan.rows, shard_rows=shard_rows, chunk_rows=CHUNK_ROWS,
                         arrays=(ArraySpec(GSF_ARRAY, extractor.width, "float16"), ArraySpec(HASH_ARRAY, 32, "uint8")))
    writer = store.create(plan.spec, layout, attrs={"summary": f"{summary}: {plan.rows} images",
                                                    "columns": {n: list(c) for n, c in extractor.column_ranges().items()}})
    missing = writer.missing_shards()
    rows = sum(len(range(*layout.shard_range(shard))) for shard in missing)
    log(JOB, f"segment {plan.spec.key}: {len(missing)} of {layout.num_shards} shards to compute ({rows} images)")
    init_ray(cfg.ray_address, cfg.num_cpus)
    progress = Progress(JOB, rows, unit="images")
    forward_passes, shard_seconds = run_shards(cfg, store.url, plan, layout, missing, use_gpu, progress) \
        if missing else (0, 0.0)
    if failed := writer.missing_shards():
        raise ShardsFailed(
            f"segment {plan.spec.key}: {len(failed)} of {layout.num_shards} shard(s) could not be computed after "
            f"{SHARD_RETRIES} retries (shards {failed[:10]}{', …' if len(failed) > 10 else ''}); the "
            "others are committed. Rerun the same command to retry exactly those; add --verbose to see the "
            "workers' errors (they are also in Ray's worker logs)")
    writer.finalize({"summary": summary})
    return missing, forward_passes, shard_seconds, progress


def run_shards(cfg: ExtractConfig, store_url: str, plan: SegmentPlan, layout: EntryLayout, shards: list[int],
               use_gpu: bool, progress: Progress) -> tuple[int, float]:
    """Compute ``shards`` of the planned segment on ``cfg.workers`` backbone actors. Returns the number of
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

    tasks = []
    for shard in shards:
        start, stop = layout.shard_range(shard)
        tasks.append(ShardTask(shard, start, plan.uris[start:stop], plan.expected[start:stop]))
    workers = min(cfg.workers, len(shards))
    per_call = max(1, min(4, len(shards) // workers))
    calls = deque((tuple(tasks[i:i + per_call]), 0) for i in range(0, len(tasks), per_call))  # (group, failures)
    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0,
        max_restarts=SHARD_RETRIES, max_task_retries=SHARD_RETRIES,
        runtime_env={"env_vars": dict(ALLOCATOR_ENV)})  # merged with a submitted job's runtime env
    options = {"store": store_url, "spec": plan.spec.to_json(), "layout": layout.to_json(),
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
