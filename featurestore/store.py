"""The store facade: open a URL, find, create and open entries."""

from __future__ import annotations

from typing import Any, Mapping

from .backends import Backend
from .layout import EntryLayout, entry_path, manifest_path
from .reader import EntryReader
from .specs import EntrySpec
from .writer import EntryWriter


class FeatureStore:
    """A directory or ``s3://bucket/prefix`` holding content-addressed entries.

    Typical use by a job::

        store = FeatureStore("s3://bucket/features")
        if (reader := store.find(spec)) is not None:      # same spec ⇒ reuse, no recompute
            return reader
        writer = store.create(spec, layout)                # creates or resumes
        for shard in writer.missing_shards(): ...          # one writer per shard
        writer.finalize()
    """

    def __init__(self, url: str, create: bool = True):
        """``create=False`` refuses a local directory that does not exist (for read-only tools)."""
        self.backend = Backend(url, create=create)
        self.url = str(self.backend.url)

    def state(self, key: str) -> str:
        """``absent``, ``incomplete`` or ``complete``."""
        if self.backend.exists(manifest_path(key)):
            return "complete"
        return "incomplete" if self.backend.exists(entry_path(key)) else "absent"

    def find(self, spec: EntrySpec) -> EntryReader | None:
        """The complete entry for ``spec``, or ``None`` if it has not been finished yet."""
        return self.open(spec.key) if self.state(spec.key) == "complete" else None

    def create(self, spec: EntrySpec, layout: EntryLayout, attrs: Mapping[str, Any] | None = None) -> EntryWriter:
        """A writer for ``spec``: creates the entry, or resumes it if it exists with the same layout."""
        return EntryWriter(self.backend, spec, layout, attrs)

    def open(self, key: str, require_complete: bool = True) -> EntryReader:
        return EntryReader(self.backend, key, require_complete=require_complete)

    def keys(self) -> list[str]:
        """Keys of every entry (complete or not) in the store."""
        return sorted(k for k in self.backend.list_dirs() if self.backend.exists(entry_path(k)))
