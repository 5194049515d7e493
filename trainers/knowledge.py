"""Fit a distiller on a GSF entry and write the teacher knowledge entry beside it.

The knowledge entry is derived: its key hashes the parent GSF key and the distiller spec (which
includes the seed and the backbone subset), so the same request finds the finished entry and
never refits. It holds, row-aligned with the parent (same shard size):

* ``feature``: f_t [N, F] float32, the teacher aesthetic features;
* ``distribution`` [N, 10] (or ``binary`` / ``score`` [N]): the teacher predictions;
* ``docs/distiller.json`` (spec, columns used, parent), ``docs/metrics.json`` (test metrics,
  training history, optional matching analysis and per-category table);
* ``blobs/distiller.safetensors``: the fitted weights.

Only train-split rows with an ok GSF are fitted on; test rows are used for the metrics only.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from featurestore.layout import STATUS_FAILED, STATUS_OK, ArraySpec, EntryLayout
from featurestore.reader import EntryReader
from featurestore.specs import EntrySpec
from featurestore.store import FeatureStore
from trainers.distiller import (DistillerSpec, dataset_targets, evaluate_label, fit, in_memory_batches, infer,
                                matching_scores)
from trainers.metrics import evaluate_scores, mean_score, per_category


class KnowledgeError(ValueError):
    """A distiller request that cannot be served (unknown backbone subset, no labels, no train rows)."""


def knowledge_spec(parent: EntryReader, spec: DistillerSpec) -> EntrySpec:
    return EntrySpec(kind="knowledge", identity={"rows": parent.rows}, parent=parent.key, producer=spec.to_json())


def select_columns(parent: EntryReader, backbones: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """The chosen backbones in the entry's own order, and their GSF column indices."""
    ranges = parent.attrs.get("columns", {})
    if unknown := [b for b in backbones if b not in ranges]:
        raise KnowledgeError(f"entry {parent.key} has no backbone(s) {unknown}; it has {list(ranges)}")
    ordered = tuple(name for name in ranges if name in backbones)
    return ordered, np.concatenate([np.arange(*ranges[name]) for name in ordered])


def normalise_spec(parent: EntryReader, spec: DistillerSpec) -> DistillerSpec:
    """Backbones in entry order (so [a, b] and [b, a] are one request); empty means all."""
    backbones = spec.backbones or tuple(parent.attrs.get("columns", {}))
    ordered, _ = select_columns(parent, backbones)
    return DistillerSpec(**{**spec.to_json(), "backbones": ordered, "hidden": tuple(spec.hidden)})


def read_columns(parent: EntryReader, columns: np.ndarray) -> np.ndarray:
    """The selected GSF columns of every row, read shard by shard (float16, bounded temporaries)."""
    out = np.empty((parent.rows, len(columns)), np.float16)
    for shard in range(parent.layout.num_shards):
        start, stop = parent.layout.shard_range(shard)
        out[start:stop] = parent.read_range(start, stop, ["gsf"])["gsf"][:, columns]
    return out


def distill(store: FeatureStore, parent_key: str, spec: DistillerSpec, device: torch.device,
            matching: bool = False, log: Callable[[str], None] = lambda m: None) -> dict:
    """Fit (unless the knowledge entry exists) and write; returns the job's result fields."""
    parent = store.open(parent_key)
    if parent.spec.kind != "gsf":
        raise KnowledgeError(f"entry {parent_key} is a {parent.spec.kind!r} entry, not a GSF entry")
    spec = normalise_spec(parent, spec)
    entry = knowledge_spec(parent, spec)
    if (done := store.find(entry)) is not None:
        metrics = done.read_document("metrics")
        log(f"knowledge entry {entry.key} is complete: reusing it, no refit")
        return {"entry": entry.key, "parent": parent_key, "reused": True, "test": metrics["test"],
                "train_rows": metrics["train_rows"], "test_rows": metrics["test_rows"], "seconds": 0.0}

    started = time.perf_counter()
    dataset = parent.read_document("dataset")
    try:
        targets = dataset_targets(spec.label, dataset)
    except ValueError as exc:
        raise KnowledgeError(f"dataset of entry {parent_key}: {exc}") from None
    splits = np.asarray(dataset["splits"])
    ok = parent.status() == STATUS_OK
    train = np.flatnonzero((splits == "train") & ok)
    test = np.flatnonzero((splits == "test") & ok)
    if len(train) < 2:
        raise KnowledgeError(f"entry {parent_key} has {len(train)} usable train rows; the distiller needs ≥ 2")
    assert not np.any(splits[train] == "test"), "test rows must never enter fitting"

    _, columns = select_columns(parent, spec.backbones)
    log(f"reading {len(columns)} GSF columns of {parent.rows} rows ({', '.join(spec.backbones)})")
    gsf = read_columns(parent, columns)
    log(f"fitting on {len(train)} train rows, label={spec.label}, {spec.epochs} epochs on {device}")
    model, history = fit(spec, len(columns), in_memory_batches(gsf[train], targets[train], spec.batch_size, spec.seed),
                         device, log)
    f_t, pred = infer(model, spec.label, gsf, device)

    metrics = {"train_rows": int(len(train)), "test_rows": int(len(test)), "history": history,
               "test": evaluate_label(spec.label, pred[test], targets[test]) if len(test) else None}
    if spec.label == "distribution" and len(test) and dataset.get("tags"):
        metrics["per_category"] = per_category(pred[test], targets[test], np.asarray(dataset["tags"])[test],
                                               dataset.get("tag_names", []))
    if matching and len(test):
        gt = mean_score(targets) if spec.label == "distribution" else targets
        metrics["matching"] = {
            "gsf": evaluate_scores(matching_scores(gsf[train], gt[train], gsf[test]), gt[test]),
            "teacher_feature": evaluate_scores(matching_scores(f_t[train], gt[train], f_t[test]), gt[test])}
    write_knowledge(store, parent, entry, spec, model, f_t, pred, columns, metrics)
    log(f"knowledge entry {entry.key} written; test {metrics['test']}")
    return {"entry": entry.key, "parent": parent_key, "reused": False, "test": metrics["test"],
            "train_rows": metrics["train_rows"], "test_rows": metrics["test_rows"],
            "matching": metrics.get("matching"), "seconds": round(time.perf_counter() - started, 3)}


def write_knowledge(store: FeatureStore, parent: EntryReader, entry: EntrySpec, spec: DistillerSpec, model,
                    f_t: np.ndarray, pred: np.ndarray, columns: np.ndarray, metrics: dict) -> None:
    output = ArraySpec(spec.label, 10 if spec.label == "distribution" else 0, "float32")
    layout = EntryLayout(rows=parent.rows, shard_rows=parent.layout.shard_rows, chunk_rows=parent.layout.chunk_rows,
                         codec=parent.layout.codec, arrays=(ArraySpec("feature", f_t.shape[1], "float32"), output))
    writer = store.create(entry, layout, attrs={
        "summary": f"knowledge {spec.label} f_t[{f_t.shape[1]}] from {'+'.join(spec.backbones)} (seed {spec.seed})"})
    writer.write_document("distiller", {"spec": spec.to_json(), "in_features": int(len(columns)),
                                        "parent": parent.key, "columns": parent.attrs["columns"]})
    writer.write_document("metrics", metrics)
    writer.write_blob("distiller.safetensors", save_safetensors({k: v.detach().cpu().contiguous()
                                                                 for k, v in model.state_dict().items()}))
    status, reasons = parent.status(), parent.failures()
    for shard in writer.missing_shards():
        start, stop = layout.shard_range(shard)
        failed = {r: f"no teacher features: {reasons.get(r, 'GSF row failed')}"
                  for r in range(start, stop) if status[r] == STATUS_FAILED}
        feature, out = f_t[start:stop].copy(), pred[start:stop].copy()
        feature[[r - start for r in failed]] = 0
        out[[r - start for r in failed]] = 0
        writer.write_shard(shard, {"feature": feature, spec.label: out}, failures=failed)
    writer.finalize({"test": metrics["test"]})
