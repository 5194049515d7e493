"""Extraction throughput: the full job vs a forward-only loop over the same images, in one run.

    python benchmarks/extract.py [--n 64] [--rounds 5] [--backbones lite_trio] [--weights packaged]
    python benchmarks/extract.py --device cuda --backbones paper_trio --weights <map or files>

(a) forward-only: the configured backbones on pre-decoded tensors held in memory, batched the way
    the job batches them (identical sizes together) — the ceiling for the job. It runs in a fresh
    process, one pass over images it has not seen, because that is the state the job's actor
    works in: a new process that has loaded the weights. A process that has already forwarded
    these shapes can run faster (``forward_only_warm_images_per_s``: the best of the last
    child's next ``WARM_PASSES`` passes; ``job_vs_forward_only_warm`` compares the last job with
    it): oneDNN keeps the convolution kernels it compiled for each input shape (1024 primitives),
    and the heap has grown to its high-water mark. On 2 cores the third pass over the 64 demo
    images (62 distinct sizes) once ran ~15% faster than the first two; with the primitive cache
    disabled (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``) it did not. A job never sees an image twice,
    and on a real dataset the shapes outnumber that cache, so the warm rate is not a ceiling the
    job can reach. This process is the job's driver, and like a job's driver it holds no model;
(b) the job: ``ray_jobs.extract`` on the same images into a fresh local store and with a fresh
    hash cache, i.e. a first extraction (read once → hash → decode → forward → pool → write). Two
    rates: end to end on the job's clock (actor start-up, i.e. process spawn and weight loading,
    included — a fixed cost that a real dataset amortises), and steady state from the actors'
    summed time inside shards (the target's measure);
(c) decode only: DALI-CPU vs Pillow, images/s over the same JPEGs.

Both run under the malloc settings the job's actors start with (``ALLOCATOR_ENV``; the script
re-executes itself with them), so the ratio compares the pipelines, not two allocators.

(a) and (b) alternate: a forward-only child, then ``--rounds`` times the job (into a fresh store,
with a fresh hash cache) followed by another forward-only child, and each job is compared with the
mean of the two children either side of it, so a drift of the machine's speed during a round
cancels to first order. One local Ray instance, started before the first child, serves them all:
a forward-only pass measured before Ray is up ran up to 25% faster than one with Ray's idle
processes present, and the job never runs without them. The rates are each side's best, as
timeit does. The ratios (``job_vs_forward_only`` and the others) are the median of the per-round
ratios: this machine drifts between slow and fast phases over minutes (the same forward took
8.8–12.8 s of user CPU time from run to run), and a ratio of two bests compares extremes taken in
different phases. The ratio of the bests is kept as ``*_best``; ``per_round`` keeps every round's
rates and ratio, so the spread shows.

Images come from the demo generator (real photographs, 400–900 px, mixed sizes). It reports the
achieved TFLOP/s of the job's steady rate from a FLOP count of the backbones at each image's own
size (``gflops_per_image``, the mean over the images seen), and the paper trio's 2940
GFLOPs/image for reference. With ``--device cuda`` also ``images_per_s_per_gpu`` (one actor, one
GPU) and ``mfu``: achieved over the GPU's dense bf16 peak (``--peak-tflops``, known for H100,
H200 and A100). Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.datasets import CACHE_DIR_ENV, load_dataset  # noqa: E402
from ray_jobs.config import load_config  # noqa: E402
from ray_jobs.extract import ExtractConfig  # noqa: E402
from ray_jobs.extract import main as extract_main  # noqa: E402
from ray_jobs.runtime import init_ray  # noqa: E402
from trainers.backbones import build_extractor  # noqa: E402
from trainers.cost import gflops  # noqa: E402
from trainers.extraction import ALLOCATOR_ENV, BATCH_PIXELS, size_batches  # noqa: E402
from trainers.images import ImageDecoder  # noqa: E402

PAPER_TRIO_GFLOPS = 2940  # per image, Table XIII
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM data sheets
WARM_PASSES = 2  # after the first: on 2 cores the third pass is the first one that runs warm


def decode_rate(decoder: ImageDecoder, encoded: list[bytes], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(encoded), 16):
            decoder.decode(encoded[i:i + 16])
        best = min(best, time.perf_counter() - start)
    return len(encoded) / best


def forward_only(extractor, images: list[torch.Tensor], batches: list[list[int]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        extractor(torch.stack([images[i] for i in batch]).permute(0, 3, 1, 2))
    if extractor.cuda_mode:
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - start)


def fresh_process_forward_only(args: argparse.Namespace, data: Path, warm_passes: int = 0) -> tuple[float, float]:
    """(a) in a new process (``--forward-only-pass``), as the job's actor: images/s of its first
    pass, and the best of ``warm_passes`` more over the same images (0.0 for none)."""
    command = [sys.executable, __file__, "--forward-only-pass", str(data), "--backbones", args.backbones,
               "--weights", args.weights, "--device", args.device, "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--warm-passes", str(warm_passes)]
    out = json.loads(subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
                     .splitlines()[-1])
    return out["images_per_s"], out["warm_images_per_s"]


def forward_only_pass(args: argparse.Namespace, weights) -> None:
    """The child side of ``fresh_process_forward_only``: build, decode, time the first pass, then
    the warm passes."""
    images = decode_for_job(read_images(Path(args.forward_only_pass)), args)
    extractor = build_extractor(args.backbones.split(","), weights, device=args.device).eval()
    batches = job_batches(images, args.batch_size)
    first = forward_only(extractor, images, batches)
    warm = max((forward_only(extractor, images, batches) for _ in range(args.warm_passes)), default=0.0)
    print(json.dumps({"images_per_s": first, "warm_images_per_s": warm}))


def read_images(data: Path) -> list[bytes]:
    return [Path(uri).read_bytes() for uri in load_dataset(str(data), "ava").uris]


def decode_for_job(encoded: list[bytes], args: argparse.Namespace) -> list[torch.Tensor]:
    """The images as the job's actor decodes them (DALI ``mixed`` on the GPU, ``cpu`` otherwise)."""
    decoder = ImageDecoder(device="mixed" if args.device == "cuda" else "cpu", num_threads=args.threads)
    return [d.image for d in decoder.decode(encoded)]


def job_batches(images: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """The forward batches, grouped the way the job groups them (identical sizes together)."""
    sizes = {i: (img.shape[0], img.shape[1]) for i, img in enumerate(images)}
    return size_batches(sizes, batch_size, BATCH_PIXELS)


def gflops_per_image(backbones: list[str], images: list[torch.Tensor]) -> float:
    """Mean GFLOPs of the backbones over the images the job sees, each at its own size (one
    multiply-add = one FLOP, as in the paper), counted on the meta device: no weights, no GPU."""
    with torch.device("meta"):
        extractor = build_extractor(backbones, "random:0", device="meta")
    per_size = {}
    for img in images:
        size = (int(img.shape[0]), int(img.shape[1]))
        if size not in per_size:
            per_size[size] = sum(gflops(b, *size) for b in extractor.backbones)
    return statistics.fmean(per_size[(int(img.shape[0]), int(img.shape[1]))] for img in images)


def bf16_peak_tflops(device: str) -> float | None:
    """The dense bf16 peak of this GPU, for MFU; None when unknown (or on the CPU)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for model, peak in BF16_PEAK_TFLOPS.items() if model in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="images")
    parser.add_argument("--rounds", type=int, default=5, help="jobs, each between two forward-only passes; ratios are the median")
    parser.add_argument("--backbones", default="lite_trio")
    parser.add_argument("--weights", default="packaged", help="as the job's `weights` key (JSON for a mapping)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (forward-only and job actor)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak for MFU (default: known for H100, H200, A100)")
    parser.add_argument("--forward-only-pass", metavar="DATA", help=argparse.SUPPRESS)  # the child of (a)
    parser.add_argument("--warm-passes", type=int, default=0, help=argparse.SUPPRESS)  # the child's, after its first
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):  # glibc reads them at start-up only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    weights = json.loads(args.weights) if args.weights.startswith("{") else args.weights
    torch.set_num_threads(args.threads)
    if args.forward_only_pass:
        return forward_only_pass(args, weights)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "ray_jobs.make_demo_data", "--out", str(data), "--n", str(args.n)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        encoded = read_images(data)

        cpu_decoder = ImageDecoder(device="cpu", num_threads=args.threads)
        pil_decoder = ImageDecoder(device="pil")
        decode = {"dali_cpu_images_per_s": decode_rate(cpu_decoder, encoded),
                  "pil_images_per_s": decode_rate(pil_decoder, encoded)}
        # sizes only (the GPU's decoder gives the same): this process holds no model, as a job's driver
        gflops = gflops_per_image(args.backbones.split(","), [d.image for d in cpu_decoder.decode(encoded)])

        init_ray()  # the local instance the job uses, up for every round: both sides see the same machine
        forwards = [fresh_process_forward_only(args, data)[0]]  # (a) before the first job and after each
        rates = []  # per round: forward-only (its two neighbours' mean), job steady, job end to end (images/s)
        for r in range(args.rounds):
            overrides = [f"dataset.path={data}", f"store={Path(tmp) / f'store-{r}'}", f"backbones=[{args.backbones}]",
                         f"weights={json.dumps(weights)}", f"batch_size={args.batch_size}", "workers=1",
                         f"cpus_per_worker={args.threads}", f"device={args.device}"]
            os.environ[CACHE_DIR_ENV] = str(Path(tmp) / f"hash-cache-{r}")  # every round a first extraction
            job = extract_main(load_config(ExtractConfig, None, overrides))
            # a call retried after its shards committed reports no time for them: not a measurement
            assert job["ok"] == job["computed_rows"] == args.n and job["shard_seconds"] > 0, job
            after, warm_rate = fresh_process_forward_only(args, data, WARM_PASSES if r == args.rounds - 1 else 0)
            forwards.append(after)
            forward = statistics.fmean(forwards[-2:])
            steady, e2e = job["computed_rows"] / job["shard_seconds"], job["computed_rows"] / job["seconds"]
            rates.append((forward, steady, e2e))
            print(f"round {r + 1}/{args.rounds}: forward-only {forwards[-2]:.2f} and {after:.2f} img/s | job "
                  f"{steady:.2f} img/s steady (ratio {steady / forward:.2f}), {e2e:.2f} img/s end to end",
                  file=sys.stderr)

    _, job_rate, end_to_end = map(max, zip(*rates))
    forward_rate = max(forwards)
    per_round = [{"forward_only_before_images_per_s": round(before, 2),
                  "forward_only_after_images_per_s": round(after, 2),
                  "job_images_per_s": round(s, 2), "job_end_to_end_images_per_s": round(e, 2),
                  "job_vs_forward_only": round(s / f, 3)}
                 for before, after, (f, s, e) in zip(forwards, forwards[1:], rates)]
    result = {"n": args.n, "backbones": args.backbones, "device": args.device, "width": job["width"],
              "rounds": args.rounds,
              "forward_only_images_per_s": round(forward_rate, 2), "job_images_per_s": round(job_rate, 2),
              "job_vs_forward_only": round(statistics.median(s / f for f, s, _ in rates), 3),
              "job_vs_forward_only_best": round(job_rate / forward_rate, 3),
              "job_end_to_end_images_per_s": round(end_to_end, 2),
              "job_end_to_end_vs_forward_only": round(statistics.median(e / f for f, _, e in rates), 3),
              "job_end_to_end_vs_forward_only_best": round(end_to_end / forward_rate, 3),
              "forward_only_warm_images_per_s": round(warm_rate, 2),
              "job_vs_forward_only_warm": round(rates[-1][1] / warm_rate, 3),
              **{k: round(v, 1) for k, v in decode.items()},
              "dali_vs_pil_decode": round(decode["dali_cpu_images_per_s"] / decode["pil_images_per_s"], 2),
              "per_round": per_round}
    achieved = job_rate * 2 * gflops / 1000  # TFLOP/s as hardware counts them: 2 per multiply-add
    peak = args.peak_tflops or bf16_peak_tflops(args.device)
    result.update({"gflops_per_image": round(gflops, 1), "achieved_tflops": round(achieved, 3),
                   "paper_trio_gflops_per_image": PAPER_TRIO_GFLOPS})
    if args.device == "cuda":  # one actor on one GPU: the job's steady rate is the rate per GPU
        result.update({"images_per_s_per_gpu": round(job_rate, 2), "peak_tflops": peak,
                       "mfu": None if peak is None else round(achieved / peak, 3)})
    print(f"best of {args.rounds}: forward-only {forward_rate:.2f} img/s | job {job_rate:.2f} img/s steady (median "
          f"ratio {result['job_vs_forward_only']:.2f}), {end_to_end:.2f} img/s end to end | decode DALI-CPU {decode['dali_cpu_images_per_s']:.0f} vs "
          f"PIL {decode['pil_images_per_s']:.0f} img/s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
