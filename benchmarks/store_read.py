"""Epoch streaming throughput: the feature store vs np.memmap vs HDF5, in one run.

    python benchmarks/store_read.py [--rows 4096] [--width 23424] [--s3-rows 1024]

Writes ``rows`` × ``width`` float16 realistic pooled activations (benchmarks/activations.py) to
(a) a local feature store entry, (b) a raw ``.npy`` read through ``np.memmap``, (c) an HDF5
dataset (h5py, chunked like the store's inner chunks, uncompressed), then streams one epoch from
each, visiting the same shards in the same seeded order as the store's partition plan
(``plan_shuffled``, one shard a window) and delivering each shard's rows in the plan's
permuted order. Every reader materialises the rows in memory (a copy and the gather) so all pay
for the bytes they deliver.
All files are read warm (they were just written), the setting that is hardest for a
compressed store. With ``--s3-rows`` > 0 the store is also measured over a moto S3 server on
loopback. Prints a table on stderr and one JSON object as the last stdout line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from activations import pooled_activations  # noqa: E402

from featurestore.layout import ArraySpec, EntryLayout  # noqa: E402
from featurestore.partition import World, plan_shuffled  # noqa: E402
from featurestore.specs import EntrySpec  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402


CODECS = {"none": {"name": "none"}, "zstd1": {"name": "zstd", "level": 1},
          "lz4-bitshuffle": {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}}


def write_store(url: str, data: np.ndarray, shard_rows: int, chunk_rows: int,
                codec: dict) -> tuple[str, int]:
    store = FeatureStore(url)
    spec = EntrySpec(kind="bench", identity={"rows": len(data), "width": data.shape[1], "codec": codec})
    layout = EntryLayout(rows=len(data), shard_rows=shard_rows, chunk_rows=chunk_rows, codec=codec,
                         arrays=(ArraySpec("gsf", data.shape[1], "float16"),))
    writer = store.create(spec, layout)
    for shard in writer.missing_shards():
        start, stop = layout.shard_range(shard)
        writer.write_shard(shard, {"gsf": data[start:stop]})
    return spec.key, writer.finalize()["stored_bytes"]


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def store_epoch(reader, prefetch: int) -> None:
    """One epoch through the store's partitioned, prefetching iterator."""
    rows = sum(len(b) for b in reader.iter_epoch(World(), seed=0, epoch=0, arrays=["gsf"], prefetch=prefetch))
    assert rows == reader.rows


def window_epoch(read_range, windows: list[np.ndarray]) -> None:
    """A baseline reader visiting the same windows as the store's plan: the window's row range
    copied, then its rows gathered in the plan's order."""
    for rows in windows:
        lo, hi = int(rows.min()), int(rows.max()) + 1
        np.asarray(read_range(lo, hi))[rows - lo]


def interleaved(epochs: dict, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per reader, rounds interleaved so machine drift hits all alike."""
    best = {name: float("inf") for name in epochs}
    for _ in range(repeats):
        for name, fn in epochs.items():
            best[name] = min(best[name], seconds(fn))
    return best


def assert_roundtrip(reader, data: np.ndarray) -> None:
    blocks = list(reader.iter_epoch(arrays=["gsf"]))
    rows = np.concatenate([b.rows for b in blocks])
    assert sorted(rows.tolist()) == list(range(len(data))), "the epoch missed or repeated rows"
    assert np.array_equal(np.concatenate([b.arrays["gsf"] for b in blocks]), data[rows]), "store returned other bytes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=23424, help="GSF width (23424 = the paper's trio)")
    parser.add_argument("--shard-rows", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codecs", default="none,lz4-bitshuffle,zstd1",
                        help=f"store codecs to measure, of {list(CODECS)}; the first is reported as the store's")
    parser.add_argument("--s3-rows", type=int, default=1024, help="rows for the S3 (moto) run; 0 skips it")
    args = parser.parse_args()

    data = pooled_activations(args.rows, args.width)
    codecs = args.codecs.split(",")
    plan = plan_shuffled(np.arange(args.rows) // args.shard_rows, World(), seed=0, epoch=0, window_blocks=1)
    windows = [plan.positions[w] for w in plan.windows()]
    stored, epochs = {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        print(f"writing {args.rows} rows x {args.width} float16 ({data.nbytes / 1e6:.0f} MB)", file=sys.stderr)
        for name in codecs:
            key, stored[name] = write_store(str(tmp / name), data, args.shard_rows, args.chunk_rows, CODECS[name])
            reader = stack.enter_context(FeatureStore(str(tmp / name)).open(key))
            assert_roundtrip(reader, data)
            epochs[f"store {name}"] = functools.partial(store_epoch, reader, args.prefetch)
        np.save(tmp / "raw.npy", data)
        memmap = np.load(tmp / "raw.npy", mmap_mode="r", allow_pickle=False)
        epochs["np.memmap"] = functools.partial(window_epoch, lambda a, b: np.array(memmap[a:b]), windows)
        import h5py

        with h5py.File(tmp / "gsf.h5", "w") as f:
            f.create_dataset("gsf", data=data, chunks=(args.chunk_rows, args.width))
        h5 = stack.enter_context(h5py.File(tmp / "gsf.h5", "r"))["gsf"]
        epochs["hdf5 (h5py)"] = functools.partial(window_epoch, lambda a, b: h5[a:b], windows)
        best = interleaved(epochs, args.repeats)
    results = [{"reader": name, "rows_per_s": args.rows / t, "mb_per_s": data.nbytes / t / 1e6, "seconds": t}
               for name, t in best.items()]
    for r, name in zip(results, codecs):
        r["codec"], r["compression_ratio"] = CODECS[name], data.nbytes / stored[name]
    if args.s3_rows:
        results.append(s3_run(data[:args.s3_rows], args))

    rate = {r["reader"]: r["rows_per_s"] for r in results}
    for r in results:
        r["vs_memmap"] = r["rows_per_s"] / rate["np.memmap"]
        r["vs_hdf5"] = r["rows_per_s"] / rate["hdf5 (h5py)"]
    print(f"\n{'reader':<28} {'rows/s':>9} {'MB/s':>7} {'vs memmap':>10} {'vs hdf5':>8} {'ratio':>6}", file=sys.stderr)
    for r in results:
        ratio = f"{r['compression_ratio']:.3f}" if "compression_ratio" in r else ""
        print(f"{r['reader']:<28} {r['rows_per_s']:>9.0f} {r['mb_per_s']:>7.0f} {r['vs_memmap']:>10.2f} "
              f"{r['vs_hdf5']:>8.2f} {ratio:>6}", file=sys.stderr)
    default = results[0]
    print(json.dumps({"rows": args.rows, "width": args.width, "shard_rows": args.shard_rows,
                      "chunk_rows": args.chunk_rows, "store_codec": CODECS[codecs[0]],
                      "compression_ratio": round(default["compression_ratio"], 4),
                      "bytes_per_row": round(stored[codecs[0]] / args.rows, 1),
                      "store_vs_memmap": round(default["vs_memmap"], 3), "store_vs_hdf5": round(default["vs_hdf5"], 3),
                      "results": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                                  for r in results]}))


def s3_run(data: np.ndarray, args) -> dict:
    """The same epoch from a moto S3 server on loopback (HTTP, real S3 protocol)."""
    import logging
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"})
        boto3.client("s3").create_bucket(Bucket="bench")
        key, _ = write_store("s3://bench/store", data, args.shard_rows, args.chunk_rows, CODECS[args.codecs.split(",")[0]])
        reader = FeatureStore("s3://bench/store").open(key)
        assert_roundtrip(reader, data)
        t = interleaved({"s3": functools.partial(store_epoch, reader, args.prefetch)}, args.repeats)["s3"]
        return {"reader": f"store, moto S3 ({len(data)} rows)", "rows_per_s": len(data) / t,
                "mb_per_s": data.nbytes / t / 1e6, "seconds": t}
    finally:
        server.stop()


if __name__ == "__main__":
    main()
