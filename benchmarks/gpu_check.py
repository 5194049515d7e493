"""Does this machine decode, extract and train at GPU speed? img/s, TFLOP/s and MFU per stage, in one run.

    bash benchmarks/gpu_check.sh                       # on a CUDA machine: under 5 minutes, prints the JSON
    python benchmarks/gpu_check.py [--teacher bit_m_r152x4] [--teacher-size 640] [--student-batch 16]
    python benchmarks/gpu_check.py --cpu               # tiny models, one gloo process: the code path, not a rate

Three sections, each timed after a warm-up and with the GPU synchronised around the clock:

(1) decode: full-resolution JPEG decode of demo photographs (``ray_jobs.make_demo_data``) by the
    project's ``ImageDecoder``: DALI ``mixed`` (nvJPEG, images land on the GPU). It counts no
    FLOPs: decoding is not tensor-core work, so it reports img/s and megapixels/s only.
(2) teacher: bf16 forward of one teacher backbone's MLSP features at full resolution through
    ``build_extractor`` — the module extraction runs (channels-last, bf16 weights, pooled in
    float32). Random weights: the rate does not depend on their values, and there is no hub.
(3) student: data-parallel training steps of ``build_student`` (NCCL across every visible GPU,
    one process each via ``torch.multiprocessing.spawn``; bf16 autocast, channels-last, Adam, the
    KD loss of eq. 7) — the step ``trainers.train_loop`` takes. Its images are the demo JPEGs'
    stored student views (decoded once into a local store by ``trainers.student_views``, timed
    as ``stored_views_img_s``), read back whole-shard by ``student_batches``.

FLOPs are hardware FLOPs (two per multiply-add, as ``FlopCounterMode`` counts them; the paper's
tables count one), counted on one image of the measured size on the meta device. A training step
counts 3 × the forward (backward ≈ 2 × forward). TFLOP/s = FLOPs per image × img/s; MFU divides it
by ``PEAK_BF16_TFLOPS`` per GPU in use. Without CUDA it stops at once unless given ``--cpu``.
With it every section runs its CPU branch (DALI on the CPU, or Pillow without DALI; float32;
gloo), says so with ``"device": "cpu"`` and reports no MFU. Without DALI a CUDA run decodes with
Pillow and says so too. Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.datasets import load_dataset  # noqa: E402
from trainers.backbones import build_extractor, load_backbone  # noqa: E402
from trainers.images import ImageDecoder, _dali_installed, resize  # noqa: E402
from trainers.labels import prediction  # noqa: E402
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss  # noqa: E402
from trainers.student import StudentSpec, build_student  # noqa: E402

#: Dense bf16 tensor-core peak of one H100 / H200 SXM GPU, TFLOP/s (NVIDIA's datasheet: 1979
#: with 2:4 sparsity, half that dense). The H200 has the H100's compute, only more and faster
#: memory. On another GPU, pass its peak with --peak-tflops.
PEAK_BF16_TFLOPS = 989.0

#: Sizes for a CUDA machine: the paper's trio member with the most FLOPs at AVA's typical full
#: resolution (≈640 px, cluster/README.md), and the Table VIII student at its 300×300 view, 16
#: images per GPU per step (the paper's batch). The trainer splits global_batch_size over its
#: ranks: to measure a given run, pass --student-batch global_batch_size / GPUs.
GPU_DEFAULTS = {"images": 64, "decode_batch": 32, "teacher": "bit_m_r152x4", "teacher_size": 640,
                "teacher_batch": 8, "teacher_batches": 4, "student": "swsl_resnext101_32x8d", "student_size": 300,
                "student_batch": 16, "steps": 20, "warmup": 5}
#: Sizes for --cpu: seconds on two cores, enough to run every line the GPU run runs.
CPU_DEFAULTS = {"images": 8, "decode_batch": 4, "teacher": "tf_efficientnet_lite0", "teacher_size": 128,
                "teacher_batch": 2, "teacher_batches": 2, "student": "resnet18", "student_size": 64,
                "student_batch": 4, "steps": 2, "warmup": 1}


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def store_student_views(root: Path, encoded: list[bytes], size: int, cuda: bool) -> str:
    """Decode the student view (``resize:<size>``) of the demo JPEGs once into a local store, as
    a training run does before its workers start (trainers/student_views.py; DALI ``mixed`` on
    CUDA). Returns the store's URL."""
    from featurestore.dataset_table import hashes_from_hex
    from trainers.student_views import ensure_views, pixel_view

    (root / "images").mkdir(parents=True, exist_ok=True)
    by_hash = {}
    for i, data in enumerate(encoded):
        path = root / "images" / f"{i}.jpg"
        path.write_bytes(data)
        by_hash.setdefault(hashlib.sha256(data).hexdigest(), str(path))
    hexes = sorted(by_hash)
    store_url = str(root / "store")
    ensure_views(store_url, pixel_view(f"resize:{size}", use_gpu=cuda), hashes_from_hex(hexes),
                 [by_hash[h] for h in hexes])
    return store_url


def student_batches(store_url: str, size: int, cuda: bool, batch_size: int, steps: int) -> list[torch.Tensor]:
    """``steps`` batches of student input, uint8 [batch_size, 3, size, size] with channels-last
    strides as the student loader hands them over: the stored views read back whole-shard
    (``StoredImages``' read path), cycled to fill the batches."""
    from featurestore.pixels import PIXELS_ARRAY
    from featurestore.store import FeatureStore
    from trainers.student_views import pixel_view, stored_views

    store = FeatureStore(store_url, create=False)
    views = stored_views(store_url, pixel_view(f"resize:{size}", use_gpu=cuda))
    pixels = []
    for key in views.index.segments:
        reader = store.open(key)
        for shard in range(reader.layout.num_shards):
            pixels.append(reader.read_range(*reader.layout.shard_range(shard), [PIXELS_ARRAY])[PIXELS_ARRAY])
    images = torch.from_numpy(np.concatenate(pixels)).view(-1, size, size, 3).permute(0, 3, 1, 2)
    order = torch.arange(batch_size * steps) % len(images)
    return [images[order[i * batch_size:(i + 1) * batch_size]] for i in range(steps)]


def forward_flops(module: torch.nn.Module, height: int, width: int) -> int:
    """Hardware FLOPs of one forward pass on one RGB image (``module`` may live on the meta device)."""
    device = next(module.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, height, width, device=device))
    return counter.get_total_flops()


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def rates(flops_per_image: int, images_per_s: float, gpus: int, cuda: bool, peak_tflops: float) -> dict:
    tflops = flops_per_image * images_per_s / 1e12
    return {"img_s": float(f"{images_per_s:.4g}"), "flops_per_image": flops_per_image, "tflops": float(f"{tflops:.4g}"),
            "mfu": round(tflops / (peak_tflops * gpus), 4) if cuda else None}


# ---------------------------------------------------------------------------------------------
# (1) decode
# ---------------------------------------------------------------------------------------------

def demo_jpegs(directory: Path, n: int) -> list[bytes]:
    subprocess.run([sys.executable, "-m", "ray_jobs.make_demo_data", "--out", str(directory), "--n", str(n)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [Path(uri).read_bytes() for uri in load_dataset(str(directory), "ava").uris]


def decode_section(encoded: list[bytes], cuda: bool, batch_size: int, threads: int) -> tuple[dict, list[torch.Tensor]]:
    """Full-resolution decode rate; also returns the decoded images (HWC uint8) for the teacher.
    Without DALI, Pillow decodes (on the CPU, and the section says so) so the other sections still run."""
    device = ("mixed" if cuda else "cpu") if _dali_installed() else "pil"
    if cuda and device == "pil":
        log("decode: nvidia.dali is not installed, so no GPU decode; Pillow decodes on the CPU instead")
    decoder = ImageDecoder(device, batch_size=batch_size, num_threads=threads)
    decoder.decode(encoded[:batch_size])  # warm-up: pipeline, nvJPEG handles, allocator
    synchronize(cuda)
    start = time.perf_counter()
    decoded = [d for k in range(0, len(encoded), batch_size) for d in decoder.decode(encoded[k:k + batch_size])]
    synchronize(cuda)
    seconds = time.perf_counter() - start
    if bad := [d.reason for d in decoded if not d.ok]:
        raise RuntimeError(f"{len(bad)} demo images did not decode: {bad[:3]}")
    megapixels = sum(d.image.shape[0] * d.image.shape[1] for d in decoded) / 1e6
    section = {"device": "cuda" if device == "mixed" else "cpu", "decoder": decoded[0].decoder, "images": len(decoded),
               "img_s": round(len(decoded) / seconds, 2), "megapixels_s": round(megapixels / seconds, 2)}
    return section, [d.image for d in decoded]


# ---------------------------------------------------------------------------------------------
# (2) teacher forward
# ---------------------------------------------------------------------------------------------

def teacher_section(name: str, images: list[torch.Tensor], size: int, batch_size: int, batches: int,
                    cuda: bool, peak_tflops: float) -> dict:
    """MLSP forward rate at ``size``×``size`` on a batch made of the decoded photographs."""
    device = torch.device("cuda" if cuda else "cpu")
    extractor = build_extractor(name, "random:0", device=device).eval()
    batch = torch.stack([resize(images[i % len(images)].to(device), (size, size))
                         for i in range(batch_size)]).permute(0, 3, 1, 2)
    extractor(batch)  # warm-up: cuDNN algorithm choice, allocator
    synchronize(cuda)
    start = time.perf_counter()
    for _ in range(batches):
        features = extractor(batch)
    synchronize(cuda)
    seconds = time.perf_counter() - start
    with torch.device("meta"):
        flops = forward_flops(load_backbone(name, "random:0"), size, size)
    return {"device": device.type, "backbone": extractor.specs[0].name, "size": size, "dtype": extractor.compute_dtype,
            "batch": batch_size, "width": int(features.shape[1]),
            **rates(flops, batch_size * batches / seconds, 1, cuda, peak_tflops)}


# ---------------------------------------------------------------------------------------------
# (3) student DDP training
# ---------------------------------------------------------------------------------------------

def train_rank(rank: int, world_size: int, port: int, options: dict, result_path: str) -> None:
    """One DDP rank: ``warmup`` untimed steps, then ``steps`` timed ones; rank 0 writes the timing."""
    cuda = options["cuda"]
    torch.set_num_threads(options["threads"])  # a spawned process starts with torch's default again
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        spec = StudentSpec(**options["spec"])
        model = build_student(spec).to(device).train()
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-5)
        batch_size, loss_spec = options["batch"], LossSpec()
        generator = torch.Generator().manual_seed(rank)
        teacher_logits = torch.randn(batch_size, spec.output_width, generator=generator)
        targets = Targets(teacher_prediction=torch.softmax(teacher_logits, 1).to(device),
                          teacher_feature=torch.rand(batch_size, spec.feature_width, generator=generator).to(device))
        batches = student_batches(options["store"], options["size"], cuda, batch_size,
                                  options["warmup"] + options["steps"])
        if cuda:
            batches = [b.pin_memory() for b in batches]
        start = 0.0
        for step, images in enumerate(batches):
            if step == options["warmup"]:
                synchronize(cuda)
                dist.barrier()
                start = time.perf_counter()
            images = images.to(device, non_blocking=True)
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                f_s, logits = ddp(images)
            total, _ = student_loss(loss_spec, StudentOutputs(prediction(spec.label, logits.float()), f_s.float()),
                                    targets)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        synchronize(cuda)
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            Path(result_path).write_text(json.dumps({"seconds": seconds, "loss": total.item()}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def student_section(name: str, size: int, batch_size: int, steps: int, warmup: int, cuda: bool,
                    peak_tflops: float, threads: int, workdir: Path, encoded: list[bytes]) -> dict:
    world_size = torch.cuda.device_count() if cuda else 1
    spec = StudentSpec(backbone=name, weights="random:0", view=f"resize:{size}")
    started = time.perf_counter()
    store_url = store_student_views(workdir / "views", encoded, size, cuda)
    views_seconds = time.perf_counter() - started
    options = {"cuda": cuda, "spec": spec.to_json(), "size": size, "batch": batch_size, "steps": steps,
               "warmup": warmup, "threads": threads, "store": store_url}
    result_path = workdir / "student.json"
    log(f"student: spawning {world_size} rank(s)")
    mp.spawn(train_rank, args=(world_size, free_port(), options, str(result_path)), nprocs=world_size, join=True)
    timing = json.loads(result_path.read_text())
    with torch.device("meta"):
        forward = forward_flops(build_student(spec), size, size)
    return {"device": "cuda" if cuda else "cpu", "backbone": spec.backbone, "size": size,
            "dtype": "bfloat16" if cuda else "float32", "backend": "nccl" if cuda else "gloo",
            "world_size": world_size, "batch_per_rank": batch_size, "steps": steps,
            "forward_flops_per_image": forward, "final_loss": round(timing["loss"], 4),
            "stored_views_img_s": round(len(encoded) / views_seconds, 2),
            **rates(3 * forward, world_size * batch_size * steps / timing["seconds"], world_size, cuda, peak_tflops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="CPU branch with tiny models (a smoke test)")
    parser.add_argument("--images", type=int, help="demo JPEGs to decode")
    parser.add_argument("--decode-batch", type=int)
    parser.add_argument("--teacher", help="teacher backbone (timm name or alias)")
    parser.add_argument("--teacher-size", type=int, help="teacher input side, px")
    parser.add_argument("--teacher-batch", type=int)
    parser.add_argument("--teacher-batches", type=int, help="timed teacher batches")
    parser.add_argument("--student", help="student backbone (timm name or alias)")
    parser.add_argument("--student-size", type=int, help="student view side, px (resize:<side>)")
    parser.add_argument("--student-batch", type=int, help="images per rank per step")
    parser.add_argument("--steps", type=int, help="timed training steps")
    parser.add_argument("--warmup", type=int, help="untimed training steps first")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="decoder and torch threads")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS, help="dense bf16 peak per GPU")
    args = parser.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():  # fail in seconds, not after the GPU sizes crawl on a CPU
        parser.error("no CUDA device is visible; pass --cpu for the CPU branch")
    sizes = {key: getattr(args, key) if getattr(args, key) is not None else default
             for key, default in (CPU_DEFAULTS if args.cpu else GPU_DEFAULTS).items()}
    torch.set_num_threads(args.threads)
    result = {"device": "cuda" if cuda else "cpu", "gpus": torch.cuda.device_count() if cuda else 0,
              "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
              "peak_bf16_tflops_per_gpu": args.peak_tflops if cuda else None}

    with tempfile.TemporaryDirectory() as tmp:
        encoded = demo_jpegs(Path(tmp) / "data", sizes["images"])
        result["decode"], images = decode_section(encoded, cuda, sizes["decode_batch"], args.threads)
        log(f"decode ({result['decode']['decoder']}): {result['decode']['img_s']:.1f} img/s, "
            f"{result['decode']['megapixels_s']:.1f} MP/s")
        result["teacher"] = teacher_section(sizes["teacher"], images, sizes["teacher_size"], sizes["teacher_batch"],
                                            sizes["teacher_batches"], cuda, args.peak_tflops)
        del images
        teacher = result["teacher"]
        log(f"teacher {teacher['backbone']} @ {sizes['teacher_size']}: {teacher['img_s']:.1f} img/s, "
            f"{teacher['tflops']:.2f} TFLOP/s, MFU {teacher['mfu']}")
        if cuda:
            torch.cuda.empty_cache()  # the spawned ranks need the GPU memory the teacher held
        result["student"] = student_section(sizes["student"], sizes["student_size"], sizes["student_batch"],
                                            sizes["steps"], sizes["warmup"], cuda, args.peak_tflops, args.threads,
                                            Path(tmp), encoded)
        log(f"student {result['student']['backbone']} @ {sizes['student_size']} on {result['student']['world_size']} "
            f"rank(s): {result['student']['img_s']:.1f} img/s, {result['student']['tflops']:.2f} TFLOP/s, "
            f"MFU {result['student']['mfu']}")
    result["seconds"] = round(time.perf_counter() - STARTED, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
