"""The distiller's peak memory does not grow with N: fit on synthetic GSF entries of the paper's width.

    python benchmarks/distill_memory.py [--small 20000] [--large 80000] [--width 23424]

For each N, a fresh store gets a feature segment of N distinct images × ``width`` float16
columns (written shard by shard, never held whole) and a labelled dataset view; then a separate
process runs ``trainers.knowledge.distill`` on it (fit streamed from the store, test metrics,
knowledge written shard by shard) and reports its peak RSS (``ru_maxrss``). The distiller is
narrow (``--hidden``) and fits one epoch: memory, not accuracy, is measured, and the data path
is the real one. Goal: ``rss_ratio`` (large / small) ≤ 1.25 and ≤ 4 GiB at the large N.
Last stdout line: JSON with ``peak_rss_mb_small``, ``peak_rss_mb_large``, ``rss_ratio``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.dataset_table import DatasetTable, hash_bytes, hashes_from_hex  # noqa: E402
from featurestore.features import (GSF_ARRAY, HASH_ARRAY, FeatureIndex, register_segment, segment_spec,  # noqa: E402
                                   table_segments)
from featurestore.layout import ArraySpec, EntryLayout, default_shard_rows  # noqa: E402
from featurestore.specs import BackboneSpec, ExtractorSpec  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from featurestore.views import write_view  # noqa: E402


def extractor(width: int) -> ExtractorSpec:
    return ExtractorSpec(backbones=(BackboneSpec("synthetic", "random:0", ("stem",), width),))


def write_entry(store_url: str, n: int, width: int) -> str:
    """A segment of ``n`` images and its view; every 10th row is test. Returns the view key."""
    store = FeatureStore(store_url)
    hashes = np.sort(hashes_from_hex([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]))
    spec = segment_spec(extractor(width), hashes)
    layout = EntryLayout(rows=n, shard_rows=default_shard_rows(2 * width), chunk_rows=32,
                         arrays=(ArraySpec(GSF_ARRAY, width, "float16"), ArraySpec(HASH_ARRAY, 32, "uint8")))
    writer = store.create(spec, layout)
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 1, width).astype(np.float32)
    scores = np.empty(n, np.float32)
    for shard in writer.missing_shards():
        start, stop = layout.shard_range(shard)
        gsf = rng.random((stop - start, width), np.float32)
        scores[start:stop] = gsf[:, :64] @ signal[:64]
        writer.write_shard(shard, {GSF_ARRAY: gsf.astype(np.float16), HASH_ARRAY: hash_bytes(hashes[start:stop])})
    writer.finalize()
    register_segment(store, extractor(width), store.open(spec.key))
    bins = np.clip(np.rint(5 + 2 * (scores - scores.mean()) / scores.std()), 1, 10).astype(int)
    votes = np.zeros((n, 10), np.int64)
    votes[np.arange(n), bins - 1] = 10
    table = DatasetTable(name="synthetic", image_ids=np.array([str(i) for i in range(n)], object),
                         uris=np.array([f"/synthetic/{i}.jpg" for i in range(n)], object), sha256=hashes,
                         splits=np.array(["test" if i % 10 == 0 else "train" for i in range(n)], object), votes=votes)
    index = FeatureIndex.build(store, table_segments(store, extractor(width)))
    return write_view(store, extractor(width), table, index, {}).key


def fit_child(store_url: str, key: str, hidden: list[int], epochs: int) -> None:
    """In its own process: distill, then print the result and this process's peak RSS."""
    import torch

    from trainers.distiller import DistillerSpec
    from trainers.knowledge import distill

    torch.set_num_threads(2)
    started = time.perf_counter()
    result = distill(FeatureStore(store_url), key, DistillerSpec(backbones=(), hidden=tuple(hidden), epochs=epochs,
                                                                 batch_size=512, lr=1e-3), torch.device("cpu"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": round(time.perf_counter() - started, 1),
                      "train_rows": result["train_rows"], "srcc": result["test"]["srcc"]}))


def measure(n: int, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store_url = str(Path(tmp) / "store")
        started = time.perf_counter()
        key = write_entry(store_url, n, args.width)
        written = time.perf_counter() - started
        out = subprocess.run([sys.executable, __file__, "--child", store_url, key, "--hidden", *map(str, args.hidden),
                              "--epochs", str(args.epochs)], capture_output=True, text=True, check=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"N={n}: wrote {n} × {args.width} float16 in {written:.0f} s; distill peak RSS {child['peak_rss_mb']:.0f} MB "
          f"in {child['seconds']:.0f} s (srcc {child['srcc']:.3f})", file=sys.stderr)
    return child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--large", type=int, default=80000)
    parser.add_argument("--width", type=int, default=23424)
    parser.add_argument("--hidden", type=int, nargs=2, default=[64, 16])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tmp", default=None, help="where the synthetic stores go (needs ~2 bytes × N × width)")
    parser.add_argument("--child", nargs=2, metavar=("STORE", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fit_child(*args.child, args.hidden, args.epochs)
        return
    small, large = measure(args.small, args), measure(args.large, args)
    print(json.dumps({"width": args.width, "n_small": args.small, "n_large": args.large,
                      "peak_rss_mb_small": small["peak_rss_mb"], "peak_rss_mb_large": large["peak_rss_mb"],
                      "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                      "seconds_small": small["seconds"], "seconds_large": large["seconds"]}))


if __name__ == "__main__":
    main()
