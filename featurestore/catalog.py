"""Store-wide operations behind the CLI: list, describe, verify and garbage-collect entries."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import obstore

from .features import SEGMENT_KIND, unregister_segment
from .pixels import PIXELS_KIND
from .layout import (STATUS_ARRAY, STATUS_FAILED, STATUS_OK, commit_path, entry_path, manifest_path,
                     shard_object_path)
from .reader import EntryReader
from .specs import EntrySpec, SpecError
from .store import FeatureStore
from .writer import ShardCommit, block_checksum, committed_shards


@dataclass(frozen=True)
class EntryInfo:
    key: str
    kind: str
    summary: str
    rows: int
    stored_bytes: int
    complete: bool
    parent: str | None
    last_modified: float
    uses: tuple[str, ...] = ()  # further entries it reads (a view's segments), kept with it by gc

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _summary(record: dict[str, Any]) -> str:
    attrs = record.get("attrs", {})
    if "summary" in attrs:
        return str(attrs["summary"])
    arrays = record["layout"]["arrays"]
    return ", ".join(f"{a['name']}[{a['width'] or ''}]" for a in arrays)


def entry_info(store: FeatureStore, key: str) -> EntryInfo:
    record = store.backend.read_json(entry_path(key))
    objects = list(store.backend.list(f"{key}/"))
    last = max((o["last_modified"].timestamp() for o in objects), default=0.0)
    return EntryInfo(key=key, kind=record["spec"]["kind"], summary=_summary(record),
                     rows=record["layout"]["rows"], stored_bytes=sum(o["size"] for o in objects),
                     complete=any(o["path"] == manifest_path(key) for o in objects),
                     parent=record["spec"].get("parent"), last_modified=last,
                     uses=tuple(record.get("attrs", {}).get("uses", ())))


def list_entries(store: FeatureStore) -> list[EntryInfo]:
    return [entry_info(store, key) for key in store.keys()]


def describe(store: FeatureStore, key: str) -> dict[str, Any]:
    """Everything known about an entry: spec, layout, attributes, manifest, progress."""
    reader = store.open(key, require_complete=False)
    committed = committed_shards(store.backend, key)
    return {"key": key, "state": store.state(key), "spec": reader.spec.to_json(),
            "layout": reader.layout.to_json(), "attrs": reader.attrs, "manifest": reader.manifest,
            "shards_committed": len(committed), "shards_total": reader.layout.num_shards,
            "shards_missing": [s for s in range(reader.layout.num_shards) if s not in committed]}


@dataclass
class VerifyReport:
    key: str
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: FeatureStore, key: str) -> VerifyReport:
    """Check an entry end to end: spec hash, final manifest, every shard's commit record, stored
    object, size and content checksum, and the per-row status counts. Reads every byte."""
    report = VerifyReport(key)
    record = store.backend.read_json(entry_path(key))
    if record is None:
        report.problems.append(f"no entry {key!r} in {store.url}")
        return report
    try:
        EntrySpec.from_json(record["spec"])
    except SpecError as exc:
        report.problems.append(f"entry.json: {exc}")
    reader = EntryReader(store.backend, key, require_complete=False)
    manifest = reader.manifest
    if manifest is None:
        report.problems.append("incomplete: no final manifest.json")
    elif manifest["num_shards"] != reader.layout.num_shards or manifest["rows"] != reader.layout.rows:
        report.problems.append("manifest.json disagrees with the layout on rows or shard count")
    ok = failed = 0
    for shard in range(reader.layout.num_shards):
        problems = _verify_shard(store, reader, shard, manifest)
        report.problems.extend(problems)
        report.shards_checked += 1
        if not problems:
            commit = ShardCommit.from_json(store.backend.read_json(commit_path(key, shard)))
            ok, failed = ok + commit.ok, failed + commit.failed
    if manifest is not None and not report.problems and (manifest["ok"], manifest["failed"]) != (ok, failed):
        report.problems.append(f"manifest counts ok={manifest['ok']} failed={manifest['failed']} but shards "
                               f"say ok={ok} failed={failed}")
    return report


def _verify_shard(store: FeatureStore, reader: EntryReader, shard: int, manifest: dict | None) -> list[str]:
    key, layout = reader.key, reader.layout
    data = store.backend.read_json(commit_path(key, shard))
    if data is None:
        return [f"shard {shard}: no commit record ({commit_path(key, shard)})"]
    commit = ShardCommit.from_json(data)
    if (commit.start, commit.stop) != layout.shard_range(shard):
        return [f"shard {shard}: commit record covers rows {commit.start}..{commit.stop}, layout says "
                f"{layout.shard_range(shard)}"]
    if manifest is not None and manifest["checksums"][shard] != dict(commit.checksums):
        return [f"shard {shard}: commit record checksums differ from manifest.json"]
    problems = []
    for array in layout.all_arrays:
        path = shard_object_path(key, array, shard)
        try:
            size = int(obstore.head(store.backend.objects, path)["size"])
        except (FileNotFoundError, obstore.exceptions.NotFoundError):
            problems.append(f"shard {shard}: object {path} is missing")
            continue
        if size != commit.stored_bytes[array.name]:
            problems.append(f"shard {shard}: object {path} has {size} bytes, commit record says "
                            f"{commit.stored_bytes[array.name]} (truncated or overwritten)")
            continue
        try:
            block = reader.array(array.name)[commit.start:commit.stop]
        except Exception as exc:  # noqa: BLE001 - any decode failure is a corrupt shard
            problems.append(f"shard {shard}: object {path} cannot be decoded: {type(exc).__name__}: {exc}")
            continue
        if block_checksum(block) != commit.checksums[array.name]:
            problems.append(f"shard {shard}: object {path} content checksum mismatch")
        elif array.name == STATUS_ARRAY and (int(np.sum(block == STATUS_OK)), int(np.sum(block == STATUS_FAILED))) \
                != (commit.ok, commit.failed):
            problems.append(f"shard {shard}: status counts differ from its commit record")
    return problems


@dataclass(frozen=True)
class GcAction:
    key: str
    reason: str
    stored_bytes: int


def plan_gc(store: FeatureStore, older_than_s: float, keep: set[str] | None = None,
            now: float | None = None) -> list[GcAction]:
    """Entries to remove: incomplete ones idle for longer than ``older_than_s``; and, when ``keep``
    is given, complete ones that are neither in ``keep`` nor reached from a kept entry through
    parents and ``uses`` (a view's feature segments, a knowledge entry's view segments)."""
    now = time.time() if now is None else now
    infos = {i.key: i for i in list_entries(store)}
    actions = [GcAction(i.key, f"incomplete, idle for {(now - i.last_modified) / 3600:.1f} h", i.stored_bytes)
               for i in infos.values() if not i.complete and now - i.last_modified > older_than_s]
    if keep is not None:
        referenced: set[str] = set()
        todo = list(keep)
        while todo:
            key = todo.pop()
            if key in referenced:
                continue
            referenced.add(key)
            if key in infos:
                todo += [k for k in (infos[key].parent, *infos[key].uses) if k is not None]
        actions += [GcAction(i.key, "complete, not referenced by a kept entry", i.stored_bytes)
                    for i in infos.values() if i.complete and i.key not in referenced]
    return actions


def run_gc(store: FeatureStore, actions: list[GcAction]) -> int:
    """Delete the planned entries; the final manifest goes first so no reader sees a half-deleted
    entry as complete. Returns the number of objects removed."""
    removed = 0
    for action in actions:
        reader = store.open(action.key, require_complete=False)
        if reader.spec.kind in (SEGMENT_KIND, PIXELS_KIND):  # out of its table first: no run reuses it
            unregister_segment(store, reader)
        if store.backend.exists(manifest_path(action.key)):
            obstore.delete(store.backend.objects, manifest_path(action.key))
            removed += 1
        removed += store.backend.delete_prefix(f"{action.key}/")
    return removed
