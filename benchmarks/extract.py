"""Extraction throughput: the full job vs a forward-only loop over the same images, in one run.

    python benchmarks/extract.py [--n 64] [--backbones lite_trio] [--weights packaged]
    python benchmarks/extract.py --device cuda --backbones paper_trio --weights <map or files>

(a) forward-only: the configured backbones on pre-decoded tensors held in memory, batched the way
    the job batches them (identical sizes together) — the ceiling for the job;
(b) the job: ``ray_jobs.extract`` on the same images into a fresh local store (read → hash check
    → decode → forward → pool → write). Two rates: end to end on the job's clock (actor start-up,
    i.e. process spawn and weight loading, included — a fixed cost that a real dataset amortises),
    and steady state from the actors' summed time inside shards (the target's measure);
(c) decode only: DALI-CPU vs Pillow, images/s over the same JPEGs.

Images come from the demo generator (real photographs, 400–900 px, mixed sizes). With
``--device cuda`` it also reports achieved TFLOP/s from a FLOP count of the backbones at each
image's size, and the paper trio's 2940 GFLOPs/image for reference. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.datasets import load_dataset  # noqa: E402
from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.extract import ExtractConfig  # noqa: E402
from ray_jobs.extract import main as extract_main  # noqa: E402
from trainers.backbones import build_extractor  # noqa: E402
from trainers.cost import gflops  # noqa: E402
from trainers.extraction import size_batches  # noqa: E402
from trainers.images import ImageDecoder  # noqa: E402

PAPER_TRIO_GFLOPS = 2940  # per image, Table XIII


def decode_rate(decoder: ImageDecoder, encoded: list[bytes], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(encoded), 16):
            decoder.decode(encoded[i:i + 16])
        best = min(best, time.perf_counter() - start)
    return len(encoded) / best


def forward_only(extractor, images: list[torch.Tensor], batch_size: int) -> float:
    sizes = {i: (img.shape[0], img.shape[1]) for i, img in enumerate(images)}
    batches = size_batches(sizes, batch_size, 4 * 1024 * 1024)
    extractor(images[0].permute(2, 0, 1)[None])  # warm-up: allocator, kernels
    if extractor.cuda_mode:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches:
        extractor(torch.stack([images[i] for i in batch]).permute(0, 3, 1, 2))
    if extractor.cuda_mode:
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def gflops_per_image(extractor, images: list[torch.Tensor]) -> float:
    """Mean GFLOPs over (up to) 8 of the images' sizes, one multiply-add = one FLOP as in the paper."""
    return statistics.fmean(gflops(extractor, *img.shape[:2]) for img in images[:8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images")
    parser.add_argument("--backbones", default="lite_trio")
    parser.add_argument("--weights", default="packaged", help="as the job's `weights` key (JSON for a mapping)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (forward-only and job actor)")
    args = parser.parse_args()
    weights = json.loads(args.weights) if args.weights.startswith("{") else args.weights
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "ray_jobs.make_demo_data", "--out", str(data), "--n", str(args.n)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        manifest = load_dataset(str(data), "ava")
        encoded = [Path(uri).read_bytes() for uri in manifest.uris]

        cpu_decoder = ImageDecoder(device="cpu", num_threads=args.threads)
        pil_decoder = ImageDecoder(device="pil")
        decode = {"dali_cpu_images_per_s": decode_rate(cpu_decoder, encoded),
                  "pil_images_per_s": decode_rate(pil_decoder, encoded)}
        decoder = ImageDecoder(device="mixed" if args.device == "cuda" else "cpu", num_threads=args.threads)
        images = [d.image for d in decoder.decode(encoded)]

        extractor = build_extractor(args.backbones.split(","), weights, device=args.device).eval()
        forward_rate = forward_only(extractor, images, args.batch_size)
        gflops = gflops_per_image(extractor, [img.cpu() for img in images]) if args.device == "cuda" else None
        del extractor

        overrides = [f"dataset.path={data}", f"store={Path(tmp) / 'store'}", f"backbones=[{args.backbones}]",
                     f"weights={json.dumps(weights)}", f"batch_size={args.batch_size}", "workers=1",
                     f"cpus_per_worker={args.threads}", f"device={args.device}"]
        job = extract_main(load_config(ExtractConfig, None, overrides))
        assert job["ok"] == args.n, job

    job_rate = job["computed_rows"] / job["shard_seconds"]
    end_to_end = job["computed_rows"] / job["seconds"]
    result = {"n": args.n, "backbones": args.backbones, "device": args.device, "width": job["width"],
              "forward_only_images_per_s": round(forward_rate, 2), "job_images_per_s": round(job_rate, 2),
              "job_vs_forward_only": round(job_rate / forward_rate, 3),
              "job_end_to_end_images_per_s": round(end_to_end, 2),
              "job_end_to_end_vs_forward_only": round(end_to_end / forward_rate, 3),
              **{k: round(v, 1) for k, v in decode.items()},
              "dali_vs_pil_decode": round(decode["dali_cpu_images_per_s"] / decode["pil_images_per_s"], 2)}
    if gflops is not None:
        result.update({"gflops_per_image": round(gflops, 1),
                       "achieved_tflops": round(job_rate * 2 * gflops / 1000, 2),  # hardware: 2 per multiply-add
                       "paper_trio_gflops_per_image": PAPER_TRIO_GFLOPS})
    print(f"forward-only {forward_rate:.2f} img/s | job {job_rate:.2f} img/s steady (ratio "
          f"{result['job_vs_forward_only']:.2f}), {end_to_end:.2f} img/s end to end | decode DALI-CPU {decode['dali_cpu_images_per_s']:.0f} vs "
          f"PIL {decode['pil_images_per_s']:.0f} img/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
