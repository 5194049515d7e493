"""The Ray Data datasource streams an entry from a real local Ray instance, one block per shard."""

from __future__ import annotations

import numpy as np
from test_store import ROWS, write_entry


def test_datasource_reads_every_row_once_from_s3(ray_local, s3_store_url):
    from featurestore.raydata import EntryDatasource, read_entry

    _, key, expected = write_entry(s3_store_url)
    tasks = EntryDatasource(s3_store_url, key, ["gsf"]).get_read_tasks(parallelism=64)
    assert len(tasks) == 4 and [t.metadata.num_rows for t in tasks] == [32, 32, 32, 4]  # one per shard
    ds = read_entry(s3_store_url, key, arrays=["gsf"]).materialize()
    batch = ds.to_numpy_refs()  # Ray may split blocks further; every row must still arrive once
    rows, gsf = [], []
    for ref in batch:
        b = ray_local.get(ref)
        rows.append(b["row"])
        gsf.append(b["gsf"])
    rows, gsf = np.concatenate(rows), np.concatenate(gsf)
    assert sorted(rows.tolist()) == list(range(ROWS))
    assert np.array_equal(gsf, expected["gsf"][rows])
