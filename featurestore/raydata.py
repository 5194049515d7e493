"""A Ray Data datasource over one entry: one read task per shard.

Ray Train workers stream an entry with ``ds = read_entry(url, key)`` passed as a trainer dataset;
each block is one shard (``row`` column plus the requested arrays), so the store's locality
carries over to Ray Data's scheduling. Imported only where Ray is wanted.

A damaged committed shard fails its read task with :class:`featurestore.reader.CorruptEntry`
(never a block of zeros); Ray re-raises it on the driver, naming the array and shard.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from ray.data import Dataset, Datasource, ReadTask, read_datasource
from ray.data.block import BlockAccessor, BlockMetadata

from .reader import EntryReader
from .store import FeatureStore


class EntryDatasource(Datasource):
    """Rows of a complete entry. Workers open the store themselves, so only URL and key travel."""

    def __init__(self, url: str, key: str, arrays: Sequence[str] | None = None, verify_checksums: bool | None = None):
        reader = FeatureStore(url, create=False).open(key)
        self.url, self.key, self.verify_checksums = url, key, verify_checksums
        self.arrays = list(reader.array_names if arrays is None else arrays)
        self.layout = reader.layout
        widths = {a.name: a for a in reader.layout.all_arrays}
        self._row_bytes = 8 + sum(max(widths[n].width, 1) * np.dtype(widths[n].dtype).itemsize
                                  for n in self.arrays)

    def estimate_inmemory_data_size(self) -> int:
        return self.layout.rows * self._row_bytes

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [self._task(shard) for shard in range(self.layout.num_shards)]

    def _task(self, shard: int) -> ReadTask:
        url, key, arrays, verify_checksums = self.url, self.key, self.arrays, self.verify_checksums
        start, stop = self.layout.shard_range(shard)

        def read() -> Iterable:
            backend = FeatureStore(url, create=False).backend
            with EntryReader(backend, key, verify_checksums=verify_checksums) as reader:
                batch = {"row": np.arange(start, stop, dtype=np.int64), **reader.read_range(start, stop, arrays)}
            yield BlockAccessor.batch_to_block(batch)

        metadata = BlockMetadata(num_rows=stop - start, size_bytes=(stop - start) * self._row_bytes,
                                 exec_stats=None, input_files=None)
        return ReadTask(read, metadata)


def read_entry(url: str, key: str, arrays: Sequence[str] | None = None, verify_checksums: bool | None = None) -> Dataset:
    """A Ray Dataset of an entry's rows, one block per shard (``verify_checksums``: see EntryReader)."""
    return read_datasource(EntryDatasource(url, key, arrays, verify_checksums))
