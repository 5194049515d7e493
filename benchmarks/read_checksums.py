"""What full checksum checks on read cost: one entry read with and without ``verify_checksums``.

    python benchmarks/read_checksums.py [--rows 4096] [--width 23424] [--repeats 7] [--s3-rows 1024]

Writes ``rows`` × ``width`` float16 realistic pooled activations (benchmarks/activations.py) as
one entry of a local store (512-row shards of 32-row raw chunks, as ``store_read.py``), then reads
the whole entry through two readers of it: ``EntryReader(..., verify_checksums=False)`` (the
default: object sizes are checked against the commit records) and ``verify_checksums=True``
(every whole-shard read is also SHA-256 hashed and compared with its commit record). Two ways of
reading, in interleaved rounds so that machine drift hits both readers alike:

* ``stream``: the prefetching epoch iterator (``iter_epoch``, 2 reads ahead), as jobs read;
* ``serial``: ``read_range`` shard by shard on one thread, the cost without any overlap.

Both readers are first shown to return the written bytes, and the checked reader to catch a
flipped byte that the plain one returns silently (on a copy of the store), so the figures are
of a check that works. The bare hashing rate of ``block_checksum`` is reported as the bound on
what checking can cost. With ``--s3-rows`` > 0 the stream is also measured over moto's S3
server on loopback. Last stdout line: JSON with ``read_mb_s_plain``, ``read_mb_s_checked``,
``checksum_cost_ratio`` (checked / plain throughput, local stream, best of the repeats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from activations import pooled_activations  # noqa: E402
from store_read import assert_roundtrip, write_store  # noqa: E402

from featurestore.layout import shard_object_path  # noqa: E402
from featurestore.partition import World  # noqa: E402
from featurestore.reader import CorruptEntry, EntryReader  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from featurestore.writer import block_checksum  # noqa: E402

RAW = {"name": "none"}  # the store's chosen codec (see codec_choice.py)


def stream_epoch(reader: EntryReader, prefetch: int) -> None:
    rows = sum(len(b) for b in reader.iter_epoch(World(), arrays=["gsf"], prefetch=prefetch))
    assert rows == reader.rows


def serial_epoch(reader: EntryReader) -> None:
    for shard in range(reader.layout.num_shards):
        reader.read_range(*reader.layout.shard_range(shard), ["gsf"])


def timed_rounds(epochs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of every round per reader, rounds interleaved."""
    times: dict[str, list[float]] = {name: [] for name in epochs}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            started = time.perf_counter()
            epoch()
            times[name].append(time.perf_counter() - started)
    return times


def readers_of(store_url: str, key: str) -> dict[str, EntryReader]:
    backend = FeatureStore(store_url).backend
    return {"plain": EntryReader(backend, key), "checked": EntryReader(backend, key, verify_checksums=True)}


def assert_check_catches_a_flipped_byte(store_dir: Path, key: str, data: np.ndarray, scratch: Path) -> None:
    """On a copy of the store: one flipped bit in a shard reads back silently wrong without the
    check (the object keeps its size) and raises :class:`CorruptEntry` with it."""
    copy = scratch / "flipped"
    shutil.copytree(store_dir, copy)
    readers = readers_of(str(copy), key)
    layout = readers["plain"].layout
    target = copy / shard_object_path(key, layout.arrays[0], 1)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    start, stop = layout.shard_range(1)
    plain = readers["plain"].read_range(start, stop, ["gsf"])["gsf"]
    assert not np.array_equal(plain.view(np.uint16), data[start:stop].view(np.uint16)), "the flip missed the data"
    try:
        readers["checked"].read_range(start, stop, ["gsf"])
    except CorruptEntry:
        shutil.rmtree(copy)
    else:
        raise AssertionError("verify_checksums=True read a flipped shard without raising CorruptEntry")


def hash_seconds(data: np.ndarray, shard_rows: int, repeats: int) -> float:
    """Best seconds for ``block_checksum`` over every shard of ``data``, one thread."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for start in range(0, len(data), shard_rows):
            block_checksum(data[start:start + shard_rows])
        best = min(best, time.perf_counter() - started)
    return best


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on loopback, with the AWS_* variables pointing obstore/zarr at it."""
    import logging

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
        yield "s3://bench/store"
    finally:
        server.stop()


def summarise(times: dict[str, list[float]], nbytes: int, rows: int) -> dict[str, dict]:
    return {name: {"mb_s_best": nbytes / min(t) / 1e6, "mb_s_median": nbytes / statistics.median(t) / 1e6,
                   "rows_s_best": rows / min(t), "rows_s_median": rows / statistics.median(t)}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=23424, help="GSF width (23424 = the paper's trio)")
    parser.add_argument("--shard-rows", type=int, default=512)
    parser.add_argument("--chunk-rows", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--s3-rows", type=int, default=1024, help="rows for the S3 (moto) run; 0 skips it")
    args = parser.parse_args()

    data = pooled_activations(args.rows, args.width)
    print(f"{args.rows} rows x {args.width} float16 ({data.nbytes / 1e6:.0f} MB), {args.repeats} interleaved rounds",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = Path(tmp) / "store"
        key, _ = write_store(str(store_dir), data, args.shard_rows, args.chunk_rows, RAW)
        readers = readers_of(str(store_dir), key)
        for reader in readers.values():
            assert_roundtrip(reader, data)
        assert_check_catches_a_flipped_byte(store_dir, key, data, Path(tmp))
        epochs = {}
        for name, reader in readers.items():
            epochs[f"stream {name}"] = lambda reader=reader: stream_epoch(reader, args.prefetch)
            epochs[f"serial {name}"] = lambda reader=reader: serial_epoch(reader)
        local = summarise(timed_rounds(epochs, args.repeats), data.nbytes, args.rows)
        for reader in readers.values():
            reader.close()
    hash_mb_s = data.nbytes / hash_seconds(data, args.shard_rows, args.repeats) / 1e6

    s3 = {}
    if args.s3_rows:
        s3_data = data[:args.s3_rows]
        with moto_s3() as url:
            key, _ = write_store(url, s3_data, args.shard_rows, args.chunk_rows, RAW)
            s3_readers = readers_of(url, key)
            for reader in s3_readers.values():
                assert_roundtrip(reader, s3_data)
            s3 = summarise(timed_rounds({f"s3 stream {name}": lambda reader=reader: stream_epoch(reader, args.prefetch)
                                         for name, reader in s3_readers.items()}, args.repeats),
                           s3_data.nbytes, args.s3_rows)

    results = {**local, **s3}
    print(f"\n{'read':<22} {'MB/s best':>10} {'MB/s median':>12} {'rows/s best':>12}", file=sys.stderr)
    for name, r in results.items():
        print(f"{name:<22} {r['mb_s_best']:>10.0f} {r['mb_s_median']:>12.0f} {r['rows_s_best']:>12.0f}", file=sys.stderr)
    print(f"{'block_checksum alone':<22} {hash_mb_s:>10.0f}", file=sys.stderr)

    def cost(prefix: str, stat: str = "mb_s_best") -> float | None:
        if f"{prefix} plain" not in results:
            return None
        return round(results[f"{prefix} checked"][stat] / results[f"{prefix} plain"][stat], 3)

    plain, checked = results["stream plain"], results["stream checked"]
    print(json.dumps({
        "rows": args.rows, "width": args.width, "shard_rows": args.shard_rows, "chunk_rows": args.chunk_rows,
        "repeats": args.repeats, "prefetch": args.prefetch,
        "read_mb_s_plain": round(plain["mb_s_best"], 1), "read_mb_s_checked": round(checked["mb_s_best"], 1),
        "read_rows_s_plain": round(plain["rows_s_best"], 1), "read_rows_s_checked": round(checked["rows_s_best"], 1),
        "checksum_cost_ratio": cost("stream"), "checksum_cost_ratio_median": cost("stream", "mb_s_median"),
        "serial_checksum_cost_ratio": cost("serial"), "s3_rows": args.s3_rows, "s3_checksum_cost_ratio": cost("s3 stream"),
        "block_checksum_mb_s": round(hash_mb_s, 1),
        "results": {name: {k: round(v, 1) for k, v in r.items()} for name, r in results.items()}}))


if __name__ == "__main__":
    main()
