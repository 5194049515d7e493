"""Teacher extraction: run the backbones once at full resolution and store MLSP features (GSFs).

    python -m ray_jobs.extract --config configs/demo.yaml [key=value ...]
    ray job submit --working-dir . -- python -m ray_jobs.extract --config FILE [key=value ...]

The entry key is a hash of the dataset (image bytes, labels, splits) and the extractor (backbones,
weight digests, input policy, precision). If that entry is complete, the job does no forward
pass at all. Otherwise it computes only the shards that are not committed yet. The work unit is
one store shard, handed to a pool of backbone actors by Ray Data (one GPU each when the cluster
has GPUs). The last stdout line is a JSON object: entry, rows, ok, failed, computed_rows,
reused_rows, forward_passes, reused, seconds (shard_seconds: the actors' time inside shards).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from featurestore.backends import StoreError
from featurestore.datasets import FORMATS, DatasetError, load_dataset
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows
from featurestore.sources import SourceError
from featurestore.specs import ExtractorSpec, gsf_entry_spec
from featurestore.store import FeatureStore
from ray_jobs.config import ConfigError, option, run_job
from ray_jobs.runtime import Progress, cluster_gpus, init_ray, is_local, log
from trainers.backbones import BackboneError, build_extractor, expand_names
from trainers.extraction import SpecMismatch, ShardActor, input_policy
from trainers.weights import WeightsError

JOB = "extract"
CHUNK_ROWS = 32


@dataclass(frozen=True)
class DatasetConfig:
    path: str = option(help="dataset root (local dir or s3://bucket/prefix), or the CSV file for format=csv")
    format: str = option("ava", help=f"one of {', '.join(FORMATS)}")
    name: str | None = option(None, help="dataset name (part of its identity); default from the format")
    test_fraction: float | None = option(None, help="hash-based test split for data without one")

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"dataset.format {self.format!r} is not one of {FORMATS}")


@dataclass(frozen=True)
class ExtractConfig:
    dataset: DatasetConfig
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


def pick_shard_rows(rows: int, width: int, workers: int) -> int:
    """~16 MiB shards, but small enough that every worker gets at least four."""
    by_size = default_shard_rows(width * 2, chunk_rows=CHUNK_ROWS)
    by_parallelism = math.ceil(max(rows, 1) / (4 * workers) / CHUNK_ROWS) * CHUNK_ROWS
    return max(CHUNK_ROWS, min(by_size, by_parallelism))


def load_manifest(cfg: ExtractConfig):
    return load_dataset(cfg.dataset.path, cfg.dataset.format, name=cfg.dataset.name,
                        test_fraction=cfg.dataset.test_fraction)


def extractor_spec(cfg: ExtractConfig, backbones, compute_dtype: str) -> ExtractorSpec:
    """What the entry key records about the extraction: backbone specs, input policy, precision."""
    return ExtractorSpec(backbones=backbones, input_policy=input_policy(cfg.max_pixels), compute_dtype=compute_dtype)


def resolve_entry(cfg: ExtractConfig, store: FeatureStore) -> str:
    """The key of the complete GSF entry this extraction config produced (CPU or GPU run)."""
    manifest = load_manifest(cfg)
    specs = build_extractor(list(cfg.backbones), cfg.weights, device="cpu").specs
    for dtype in ("float32", "bfloat16"):
        if (done := store.find(gsf_entry_spec(manifest, extractor_spec(cfg, specs, dtype)))) is not None:
            return done.key
    raise ConfigError(f"no complete GSF entry for this extraction config in {store.url}; run ray_jobs.extract first")


def main(cfg: ExtractConfig) -> dict:
    expand_names(cfg.backbones)  # an unknown backbone fails before any slow step
    log(JOB, f"indexing dataset {cfg.dataset.path} ({cfg.dataset.format})")
    manifest = load_manifest(cfg)
    store = FeatureStore(cfg.store)
    log(JOB, f"loading backbones {', '.join(cfg.backbones)} (weights: {cfg.weights})")
    reference = build_extractor(list(cfg.backbones), cfg.weights, device="cpu")
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
    extractor = extractor_spec(cfg, reference.specs, "bfloat16" if use_gpu else "float32")
    del reference
    spec = gsf_entry_spec(manifest, extractor)
    columns = {name: list(cols) for name, cols in extractor.column_ranges().items()}
    result = {"entry": spec.key, "store": store.url, "rows": len(manifest), "width": extractor.width,
              "columns": columns}

    if (entry := store.find(spec)) is not None:
        done = entry.manifest
        log(JOB, f"entry {spec.key} is complete: reusing it, 0 forward passes")
        return {**result, "ok": done["ok"], "failed": done["failed"], "computed_rows": 0,
                "reused_rows": len(manifest), "forward_passes": 0, "reused": True, "seconds": 0.0}

    shard_rows = cfg.shard_rows or pick_shard_rows(len(manifest), extractor.width, cfg.workers)
    layout = EntryLayout(rows=len(manifest), shard_rows=shard_rows, chunk_rows=CHUNK_ROWS,
                         arrays=(ArraySpec("gsf", extractor.width, "float16"),))
    summary = f"GSF {'+'.join(b.name for b in extractor.backbones)} ({extractor.width}-d), {manifest.name}"
    writer = store.create(spec, layout, attrs={"summary": summary, "columns": columns})
    writer.write_document("dataset", manifest.to_json())
    missing = writer.missing_shards()
    computed_rows = sum(b - a for a, b in map(layout.shard_range, missing))
    log(JOB, f"entry {spec.key}: {len(missing)} of {layout.num_shards} shards to compute "
             f"({computed_rows} rows, {len(manifest) - computed_rows} reused)")

    init_ray(cfg.ray_address, cfg.num_cpus)
    progress = Progress(JOB, computed_rows, unit="images")
    forward_passes, shard_seconds = 0, 0.0
    if missing:
        forward_passes, shard_seconds = run_shards(cfg, store.url, spec, layout, manifest, missing, use_gpu, progress)
    final = writer.finalize({"summary": summary})
    log(JOB, f"entry {spec.key} complete: {final['ok']} ok, {final['failed']} failed in {progress.seconds:.1f} s")
    return {**result, "ok": final["ok"], "failed": final["failed"], "computed_rows": computed_rows,
            "reused_rows": len(manifest) - computed_rows, "forward_passes": forward_passes, "reused": False,
            "seconds": round(progress.seconds, 3), "shard_seconds": round(shard_seconds, 3), "images_per_s": round(computed_rows / max(progress.seconds, 1e-9), 2)}


def run_shards(cfg: ExtractConfig, store_url: str, spec, layout: EntryLayout, manifest, shards: list[int],
               use_gpu: bool, progress: Progress) -> tuple[int, float]:
    """Compute ``shards`` on an actor pool. Returns the number of forward passes made and the
    actors' summed seconds inside shards (the job's time minus start-up and scheduling)."""
    import ray.data

    tasks = []
    for shard in shards:
        start, stop = layout.shard_range(shard)
        tasks.append({"task": json.dumps({"shard": shard, "start": start, "uris": manifest.uris[start:stop],
                                          "sha256": manifest.sha256[start:stop]})})
    workers = min(cfg.workers, len(shards))
    results = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
        ShardActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if use_gpu else 0, num_cpus=cfg.cpus_per_worker,
        fn_constructor_kwargs={"store": store_url, "spec": spec.to_json(), "layout": layout.to_json(),
                               "backbones": list(cfg.backbones), "weights": cfg.weights,
                               "max_pixels": cfg.max_pixels, "batch_size": cfg.batch_size,
                               "device": "cuda" if use_gpu else "cpu",
                               "threads": max(1, int(cfg.cpus_per_worker))})
    forward_passes, shard_seconds = 0, 0.0
    for row in results.iter_rows():
        shard = json.loads(row["result"])
        forward_passes += shard["forward_passes"]
        shard_seconds += shard["seconds"]
        progress.add(shard["rows"])
    return forward_passes, shard_seconds


if __name__ == "__main__":
    sys.exit(run_job(JOB, ExtractConfig, main, user_errors=(
        BackboneError, WeightsError, DatasetError, StoreError, SourceError, SpecMismatch)))
