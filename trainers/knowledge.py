"""Fit a distiller on stored GSFs and write the teacher knowledge entry.

Knowledge is keyed like features are: by what determines it. Its identity is the extractor
whose features it was fitted on, the labels and split of every row it saw (image hash, split,
target), and the distiller spec (backbone subset, seed, hyper-parameters). So a moved dataset
finds its knowledge again, and a re-split or relabel refits only the distiller.

Its rows are the distinct image hashes with ok features, sorted (``sha256`` array), so any
copy or re-split of the dataset joins to it by content:

* ``feature``: f_t [K, F] float32, the teacher aesthetic features;
* ``distribution`` [K, 10] (or ``binary`` / ``score`` [K]): the teacher predictions;
* ``sha256`` [K, 32] uint8: the image of each row;
* ``docs/distiller.json`` (spec, columns used, the view fitted from, split),
  ``docs/metrics.json`` (test metrics, training history, optional matching analysis and
  per-category table); ``blobs/distiller.safetensors``: the fitted weights.

Only labelled train rows with ok features are fitted on (``trainers.labels.labelled_rows``, then
the features filter); labelled test rows with features are used for the metrics only. Every image
with ok features gets knowledge, labelled or not.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from featurestore.dataset_table import DatasetTable, hash_bytes, hashes_of
from featurestore.errors import UserError
from featurestore.features import HASH_ARRAY, extractor_key, storage_blocks
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows
from featurestore.partition import World, plan_shuffled
from featurestore.reader import EntryReader, read_ahead
from featurestore.specs import EntrySpec
from featurestore.splits import SplitSpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView
from trainers.distiller import DistillerSpec, fit, infer, matching_scores
from trainers.labels import NUM_BINS, evaluate_label, labelled_rows, scores_of, table_targets
from trainers.metrics import evaluate_scores, per_category

CHUNK_ROWS = 256
#: Rows of GSF held at once while streaming: a window of WINDOW_BLOCKS blocks of BLOCK_ROWS rows
#: (4096 rows ≈ 190 MB at the paper's 23424 columns), plus the next window being read.
BLOCK_ROWS, WINDOW_BLOCKS = 512, 8
READ_ROWS = BLOCK_ROWS * WINDOW_BLOCKS


class KnowledgeError(UserError, ValueError):
    """A distiller request that cannot be served (unknown backbone subset, too few train rows).

    Label problems (no labels, no labelled train rows) are ``trainers.labels.LabelError``."""


def labels_digest(table: DatasetTable, rows: np.ndarray, targets: np.ndarray) -> str:
    """SHA-256 over (image hash, split, target) of ``rows``, independent of their order.

    ``rows`` are all rows with features (the entry holds knowledge for each); an unlabelled
    row's target is NaN, so labelling it later gives a new key."""
    hashes, splits = table.sha256[rows], np.asarray(table.splits[rows], str)
    order = np.lexsort((splits, hashes))
    h = hashlib.sha256(hash_bytes(hashes[order]).tobytes())
    h.update("\0".join(splits[order]).encode())
    h.update(np.ascontiguousarray(targets[rows][order], "<f4").tobytes())
    return h.hexdigest()


def knowledge_spec(view: GsfView, spec: DistillerSpec, labels: str, rows: int) -> EntrySpec:
    return EntrySpec(kind="knowledge", identity={"features": extractor_key(view.extractor), "labels": labels,
                                                 "rows": rows}, producer=spec.to_json())


def select_columns(columns: dict, backbones: tuple[str, ...], key: str) -> tuple[tuple[str, ...], np.ndarray]:
    """The chosen backbones in the entry's own order, and their GSF column indices."""
    if unknown := [b for b in backbones if b not in columns]:
        raise KnowledgeError(f"entry {key} has no backbone(s) {unknown}; it has {list(columns)}")
    ordered = tuple(name for name in columns if name in backbones)
    return ordered, np.concatenate([np.arange(*columns[name]) for name in ordered])


def normalise_spec(view: GsfView, spec: DistillerSpec) -> DistillerSpec:
    """Backbones in entry order (so [a, b] and [b, a] are one request); empty means all."""
    ordered, _ = select_columns(view.columns, spec.backbones or tuple(view.columns), view.key)
    return DistillerSpec(**{**spec.to_json(), "backbones": ordered, "hidden": tuple(spec.hidden)})


def knowledge_hashes(knowledge: EntryReader) -> np.ndarray:
    """The sorted image hashes of a knowledge entry's rows (for :func:`knowledge_rows`)."""
    return hashes_of(knowledge.read_range(0, knowledge.rows, [HASH_ARRAY])[HASH_ARRAY])


def knowledge_rows(hashes: np.ndarray, images: np.ndarray) -> np.ndarray:
    """The knowledge row of each image hash in ``images``, or -1 where it has none."""
    pos = np.minimum(np.searchsorted(hashes, images), max(len(hashes) - 1, 0))
    return np.where(len(hashes) and hashes[pos] == images, pos, -1) if len(hashes) else np.full(len(images), -1)


@dataclass(frozen=True, eq=False)
class FitPlan:
    """What a distill request resolves to before any fitting: its entry and the rows it uses.

    ``rows`` are the table rows with features (each image gets knowledge); ``train`` and
    ``test`` the labelled rows of those splits among them (ascending); ``targets`` every row's
    target (NaN where unlabelled)."""

    spec: DistillerSpec
    split: SplitSpec
    table: DatasetTable
    targets: np.ndarray
    rows: np.ndarray
    train: np.ndarray
    test: np.ndarray
    entry: EntrySpec


def plan_fit(view: GsfView, spec: DistillerSpec, table: DatasetTable | None = None,
             split: SplitSpec | None = None) -> FitPlan:
    """Resolve a request (see :func:`distill`) without reading a feature: cheap, so a job can
    name the entry it would fit or reuse, and label errors surface before any fitting."""
    spec = normalise_spec(view, spec)
    split = split or SplitSpec.parse("official")
    table = (view.dataset() if table is None else table).resplit(split)
    targets = table_targets(spec.label, table)
    rows = np.flatnonzero(view.index.lookup(table.sha256)[0])
    train = np.intersect1d(labelled_rows(table, "train"), rows)
    test = np.intersect1d(labelled_rows(table, "test", required=False), rows)
    entry = knowledge_spec(view, spec, labels_digest(table, rows, targets), len(rows))
    return FitPlan(spec, split, table, targets, rows, train, test, entry)


def knowledge_entry_spec(view: GsfView, spec: DistillerSpec, table: DatasetTable | None = None,
                         split: SplitSpec | None = None) -> EntrySpec:
    """The knowledge entry :func:`distill` would fit or reuse for these arguments."""
    return plan_fit(view, spec, table, split).entry


def distill(store: FeatureStore, view_key: str, spec: DistillerSpec, device: torch.device,
            table: DatasetTable | None = None, split: SplitSpec | None = None, matching: bool = False,
            log: Callable[[str], None] = lambda m: None) -> dict:
    """Fit (unless the knowledge entry exists) and write; returns the job's result fields.

    ``table`` is the labelled dataset (default: the one recorded in the view; or a relabelled
    or moved copy), ``split`` the split to fit and test on; rows join the view's features by
    image hash.
    """
    try:
        view = GsfView(store, view_key)
    except ValueError as exc:
        raise KnowledgeError(str(exc)) from None
    plan = plan_fit(view, spec, table, split)
    spec, table, targets, rows, train, test, entry = (plan.spec, plan.table, plan.targets, plan.rows, plan.train,
                                                      plan.test, plan.entry)
    result = {"entry": entry.key, "gsf_entry": view_key, "rows_without_features": int(len(table) - len(rows))}
    if (done := store.find(entry)) is not None:
        metrics = done.read_document("metrics")
        log(f"knowledge entry {entry.key} is complete: reusing it, no refit")
        return {**result, "reused": True, "test": metrics["test"], "train_rows": metrics["train_rows"],
                "test_rows": metrics["test_rows"], "seconds": 0.0}
    if len(train) < 2:
        raise KnowledgeError(f"dataset {table.name!r} has {len(train)} labelled train rows with features under entry "
                             f"{view_key}; the distiller needs ≥ 2 (check dataset.split and the extraction)")

    started = time.perf_counter()
    _, columns = select_columns(view.columns, spec.backbones, view_key)
    train_hashes, test_hashes = table.sha256[train], table.sha256[test]
    log(f"fitting on {len(train)} train rows streamed from the store ({len(columns)} GSF columns of "
        f"{', '.join(spec.backbones)}), label={spec.label}, {spec.epochs} epochs on {device}")
    model, history = fit(spec, len(columns), streamed_batches(view, train_hashes, targets[train], columns, spec),
                         device, log)
    test_pred = predict(model, spec.label, view, test_hashes, columns, device)
    metrics = {"train_rows": int(len(train)), "test_rows": int(len(test)), "history": history,
               "test": evaluate_label(spec.label, test_pred, targets[test]) if len(test) else None}
    if spec.label == "distribution" and len(test) and table.tags is not None:
        metrics["per_category"] = per_category(test_pred, targets[test], table.tags[test], list(table.tag_names))
    if matching and len(test):
        metrics["matching"] = matching_analysis(model, spec.label, view, train_hashes, test_hashes, columns,
                                                targets[train], targets[test], device)
    write_knowledge(store, view, entry, spec, model, np.unique(table.sha256[rows]), columns, metrics, device,
                    split=str(plan.split))
    log(f"knowledge entry {entry.key} written; test {metrics['test']}")
    return {**result, "reused": False, "test": metrics["test"], "train_rows": metrics["train_rows"],
            "test_rows": metrics["test_rows"], "matching": metrics.get("matching"),
            "seconds": round(time.perf_counter() - started, 3)}


def streamed_batches(view: GsfView, hashes: np.ndarray, targets: np.ndarray, columns: np.ndarray,
                     spec: DistillerSpec):
    """``batches_for_epoch`` over rows read from the store window by window: the epoch is
    :func:`featurestore.partition.plan_shuffled` over blocks of ``BLOCK_ROWS`` rows in storage
    order, ``WINDOW_BLOCKS`` blocks a window, the next window read while this one trains."""
    blocks = storage_blocks(view.index, hashes, BLOCK_ROWS)

    def batches(epoch: int):
        plan = plan_shuffled(blocks, World(), spec.seed, epoch, WINDOW_BLOCKS)
        windows = [plan.positions[w] for w in plan.windows()]
        with ThreadPoolExecutor(1, thread_name_prefix="distill-read") as pool:
            read = read_ahead(windows, lambda window: view.features(hashes[window], columns), 1, pool)
            for window, gsf in zip(windows, read):
                for start in range(0, len(window), spec.batch_size):
                    yield (torch.from_numpy(gsf[start:start + spec.batch_size].astype(np.float32)),
                           torch.from_numpy(targets[window[start:start + spec.batch_size]]))
    return batches


def predict(model, label: str, view: GsfView, hashes: np.ndarray, columns: np.ndarray, device) -> np.ndarray:
    """The distiller's predictions for images by hash, read and inferred block by block."""
    parts = [infer(model, label, view.features(hashes[start:start + READ_ROWS], columns), device)[1]
             for start in range(0, len(hashes), READ_ROWS)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def matching_analysis(model, label: str, view: GsfView, train: np.ndarray, test: np.ndarray, columns: np.ndarray,
                      train_targets: np.ndarray, test_targets: np.ndarray, device) -> dict:
    """Table IV: nearest-neighbour scores by GSF and by f_t, both computed block by block."""
    train_scores, test_scores = scores_of(label, train_targets), scores_of(label, test_targets)
    results = {}
    for name, as_feature in (("gsf", False), ("teacher_feature", True)):
        def rows(hashes: np.ndarray, as_feature=as_feature) -> np.ndarray:
            gsf = view.features(hashes, columns)
            return infer(model, label, gsf, device)[0] if as_feature else gsf

        scores = np.concatenate([matching_scores(lambda a, b: rows(train[a:b]), len(train), train_scores,
                                                 rows(test[start:start + READ_ROWS]), chunk=READ_ROWS)
                                 for start in range(0, len(test), READ_ROWS)])
        results[name] = evaluate_scores(scores, test_scores)
    return results


def write_knowledge(store: FeatureStore, view: GsfView, entry: EntrySpec, spec: DistillerSpec, model,
                    hashes: np.ndarray, columns: np.ndarray, metrics: dict, device: torch.device,
                    split: str) -> None:
    """Infer and write shard by shard: memory is bounded by one shard, not by the dataset."""
    width = spec.hidden[1]
    output = ArraySpec(spec.label, NUM_BINS if spec.label == "distribution" else 0, "float32")
    shard_rows = default_shard_rows(4 * (width + NUM_BINS) + 32, target_bytes=8 << 20, chunk_rows=CHUNK_ROWS)
    layout = EntryLayout(rows=len(hashes), shard_rows=shard_rows, chunk_rows=CHUNK_ROWS, codec=view.entry.layout.codec,
                         arrays=(ArraySpec("feature", width, "float32"), output, ArraySpec(HASH_ARRAY, 32, "uint8")))
    writer = store.create(entry, layout, attrs={
        "summary": f"knowledge {spec.label} f_t[{width}] from {'+'.join(spec.backbones)} (seed {spec.seed})",
        "view": view.key, "uses": list(view.segments), "split": split})
    writer.write_document("distiller", {"spec": spec.to_json(), "in_features": int(len(columns)),
                                        "view": view.key, "columns": {k: list(v) for k, v in view.columns.items()},
                                        "split": split})
    writer.write_document("metrics", metrics)
    writer.write_blob("distiller.safetensors", save_safetensors({k: v.detach().cpu().contiguous()
                                                                 for k, v in model.state_dict().items()}))
    for shard in writer.missing_shards():
        start, stop = layout.shard_range(shard)
        parts = [infer(model, spec.label, view.features(hashes[a:min(a + READ_ROWS, stop)], columns), device)
                 for a in range(start, stop, READ_ROWS)]  # GSF read block by block: a shard is many rows
        f_t, pred = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        writer.write_shard(shard, {"feature": f_t, spec.label: pred, HASH_ARRAY: hash_bytes(hashes[start:stop])})
    writer.finalize({"test": metrics["test"]})
