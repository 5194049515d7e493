"""benchmarks/gpu_check.py on its CPU branch: every section runs and its numbers add up.

The CUDA rates themselves need a GPU; here the same code runs with tiny models in one gloo
process, and the FLOP counts it reports (counted on the meta device) are checked against an
independent count on real CPU models of the same size.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
WRAPPER = ROOT / "benchmarks" / "gpu_check.sh"
# Sizes other than the --cpu defaults, so the check also shows that the flags reach the sections.
SIZES = {"images": 4, "decode_batch": 2, "teacher": "tf_efficientnet_lite0", "teacher_size": 96,
         "student": "resnet18", "student_size": 48, "student_batch": 2, "steps": 2, "warmup": 1}


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_flops(model: torch.nn.Module, side: int) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, side, side))
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def cpu_run() -> dict:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items()]
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--threads=1", *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_section_runs_on_the_cpu_branch(cpu_run):
    assert cpu_run["device"] == "cpu" and cpu_run["gpus"] == 0 and cpu_run["peak_bf16_tflops_per_gpu"] is None
    decode, teacher, student = cpu_run["decode"], cpu_run["teacher"], cpu_run["student"]
    assert decode["device"] == "cpu" and decode["decoder"] in ("dali-cpu", "pil")
    assert decode["images"] == SIZES["images"] and decode["megapixels_s"] > 0
    assert teacher["device"] == "cpu" and teacher["dtype"] == "float32" and teacher["size"] == SIZES["teacher_size"]
    assert student["device"] == "cpu" and student["dtype"] == "float32" and student["backend"] == "gloo"
    assert student["world_size"] == 1 and student["size"] == SIZES["student_size"]
    assert student["batch_per_rank"] == SIZES["student_batch"] and student["steps"] == SIZES["steps"]
    for section in (decode, teacher, student):
        assert section["img_s"] > 0
    for section in (teacher, student):
        assert section["mfu"] is None  # no GPU peak to compare a CPU against
        assert section["tflops"] == pytest.approx(section["flops_per_image"] * section["img_s"] / 1e12, rel=2e-3)


def test_teacher_flops_match_an_independent_count(cpu_run):
    from trainers.backbones import load_backbone

    teacher = cpu_run["teacher"]
    backbone = load_backbone(SIZES["teacher"], "random:0")
    assert teacher["flops_per_image"] == counted_flops(backbone, SIZES["teacher_size"])
    assert teacher["width"] == backbone.spec.width


def test_student_flops_are_three_forwards_of_an_independent_count(cpu_run):
    from trainers.student import StudentSpec, build_student

    student = cpu_run["student"]
    model = build_student(StudentSpec(backbone=SIZES["student"], weights="random:0",
                                      view=f"resize:{SIZES['student_size']}"))
    forward = counted_flops(model, SIZES["student_size"])
    assert student["forward_flops_per_image"] == forward
    assert student["flops_per_image"] == 3 * forward


def test_forward_flops_grow_with_the_pixels():
    """Twice the side, four times the pixels: a convolutional network's FLOPs follow (the few
    matmuls after global pooling do not, hence a little under 4)."""
    from trainers.student import StudentSpec, build_student

    gpu_check = load_gpu_check()
    with torch.device("meta"):
        model = build_student(StudentSpec(backbone="resnet18", weights="random:0"))
    ratio = gpu_check.forward_flops(model, 128, 128) / gpu_check.forward_flops(model, 64, 64)
    assert 3.9 < ratio < 4.0


def test_student_batches_are_the_stored_views_of_the_jpegs(tmp_path):
    from image_data import good_images

    from trainers.images import ImageDecoder

    gpu_check = load_gpu_check()
    encoded = list(good_images(5, seed=1).values())
    store_url = gpu_check.store_student_views(tmp_path, encoded, 16, cuda=False)
    batches = gpu_check.student_batches(store_url, 16, False, batch_size=3, steps=3)
    assert len(batches) == 3
    assert all(b.dtype == torch.uint8 and b.shape == (3, 3, 16, 16) for b in batches)
    # the 5 distinct views, in stored (hash) order, cycled over the 9 batch slots
    views = {bytes(d.image.numpy().tobytes()) for d in ImageDecoder("cpu", resize=(16, 16)).decode(encoded)}
    got = [bytes(image.permute(1, 2, 0).contiguous().numpy().tobytes()) for b in batches for image in b]
    assert set(got) == views and got[5:9] == got[:4]


def test_wrapper_stops_the_check_at_its_time_limit():
    env = {**os.environ, "GPU_CHECK_TIMEOUT_S": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(WRAPPER), "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 124
    assert out.stdout == "" and "no result within 1s" in out.stderr


def test_wrapper_prints_only_the_last_stdout_line(tmp_path):
    """Progress on stdout before the result (a library's print) must not reach the caller."""
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "loading"\necho "progress" >&2\necho "{\\"argv\\": \\"$*\\"}"\n')
    fake_python.chmod(0o755)
    out = subprocess.run(["bash", str(WRAPPER), "--cpu"], cwd=ROOT, env={**os.environ, "PYTHON": str(fake_python)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"argv": "benchmarks/gpu_check.py --cpu"} and out.stdout.count("\n") == 1
    assert "progress" in out.stderr
