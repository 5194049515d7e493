"""The Ray Data datasource streams an entry from a real local Ray instance, one block per shard."""

from __future__ import annotations

import numpy as np
from test_store import ROWS, write_entry


def test_datasource_reads_every_row_once_from_s3(ray_local, s3_store_url):
    from featurestore.raydata import read_entry

    _, key, expected = write_entry(s3_store_url)
    ds = read_entry(s3_store_url, key, arrays=["gsf"]).materialize()
    assert ds.num_blocks() == 4  # one read task per shard
    batch = ds.to_numpy_refs()  # blocks arrive as numpy batches
    rows, gsf = [], []
    for ref in batch:
        b = ray_local.get(ref)
        rows.append(b["row"])
        gsf.append(b["gsf"])
    rows, gsf = np.concatenate(rows), np.concatenate(gsf)
    assert sorted(rows.tolist()) == list(range(ROWS))
    assert np.array_equal(gsf, expected["gsf"][rows])
