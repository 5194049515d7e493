"""Subprocess writer for multi-process tests: ``python tests/write_worker.py URL ROWS SHARD[,SHARD...] [DELAY]``.

Writes the given shards of the deterministic test entry (tests/entry_data.py), sleeping DELAY
seconds after each commit so a test can kill it mid-entry, then prints ``done``.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entry_data import make_layout, make_rows, make_spec, write_shards  # noqa: E402

from featurestore.store import FeatureStore  # noqa: E402


def main() -> None:
    url, rows, shards = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",") if s]
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    writer = FeatureStore(url).create(make_spec(), make_layout(rows))
    data = make_rows(rows)
    for shard in shards:
        write_shards(writer, data, [shard])
        print(f"committed {shard}", flush=True)
        time.sleep(delay)
    print("done", flush=True)


if __name__ == "__main__":
    main()
