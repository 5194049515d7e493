"""LayerCAM, the mIoU-vs-threshold curves and the explain job (the paper's Fig. 8-10).

The numbers are checked against hand computations: LayerCAM's formula on random tensors, the
peak of a model whose score is a known region's activation, IoU against a sort-based
percentile, a map equal to the mask (or its inverse), and the job's curves recomputed from the
maps and masks it wrote. The job runs on an 8-image demo dataset with an untrained student.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ray_jobs import explain as explain_job
from ray_jobs.config import run_job
from ray_jobs.make_demo_data import main as make_demo_data
from ray_jobs.stages.explain import (PERCENTILES, ExplainConfig, curve_area, iou_curve, miou_curve, student_map)
from trainers.backbones import load_backbone
from trainers.labels import scores_of
from trainers.layercam import (LayerError, Target, explain, fuse, layer_maps, layercam, normalise, student_target,
                               teacher_target)
from trainers.student import StudentSpec, build_student, save_student

ROOT = Path(__file__).resolve().parents[1]
TINY = StudentSpec("resnet18", view="resize:64", feature_width=16)


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """8 demo images (4 test) with their subject masks."""
    out = tmp_path_factory.mktemp("demo") / "ava"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert make_demo_data(["--out", str(out), "--n", "8", "--seed", "1", "--test-fraction", "0.5",
                               "--long-side", "80", "128"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_student(tmp_path_factory.mktemp("ckpt") / "kd", build_student(TINY), TINY)


def masks_of(demo: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) == 255 for p in sorted((demo / "masks").glob("*.png"))}


class Region(nn.Module):
    """A positive 1×1 convolution whose score is the sum of its output inside ``box`` (rows, cols)."""

    def __init__(self, box: tuple[slice, slice]):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.features.weight.abs_()
            self.features.bias.zero_()
        self.box = box

    def target(self) -> Target:
        return Target(lambda x: self.features(x)[:, :, self.box[0], self.box[1]].sum((1, 2, 3)), self,
                      ("features",), "region sum")


# -- LayerCAM -------------------------------------------------------------------------------------


def test_layercam_is_relu_of_positive_gradient_weighted_activations():
    g = torch.Generator().manual_seed(0)
    a, grad = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 5, 4, 3, generator=g)
    a_np, g_np = a.numpy(), grad.numpy()
    expected = np.maximum((np.maximum(g_np, 0) * a_np).sum(1), 0)
    assert np.allclose(layercam(a, grad).numpy(), expected, atol=1e-6)
    maps = normalise(torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]]))
    assert torch.equal(maps, torch.tensor([[[0.0, 0.5], [0.25, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]))  # constant → 0


def test_the_map_of_a_region_score_lies_in_that_region_and_hooks_are_removed():
    model = Region((slice(8, 16), slice(20, 28))).requires_grad_(False)  # frozen: the input carries the grad
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255
    raw = layer_maps(model.target(), images)["features"]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 20:28] = True
    assert (raw[:, inside] > 0).all() and (raw[:, ~inside] == 0).all()
    expected = model.features(images).sum(1) * inside  # gradient 1 inside, 0 outside: Σ_k A_k there
    assert torch.allclose(raw, expected, rtol=1e-5)
    cam = explain(model.target(), images, (64, 64))  # upsampled ×2
    assert cam.shape == (2, 64, 64) and cam.min() == 0 and torch.allclose(cam.amax((1, 2)), torch.ones(2))
    for m in cam:
        row, col = divmod(int(m.argmax()), 64)
        assert 16 <= row < 32 and 40 <= col < 56
        assert m[:12].max() == 0 and m[:, :36].max() == 0  # far from the region: nothing
    assert not model.features._forward_hooks


def test_several_layers_are_fused_by_the_maximum_of_their_normalised_maps():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    target = Target(lambda x: model(x).sum((1, 2, 3)), model, ("2",), "sum")
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 255
    raw = layer_maps(target, images, ["0", "2"])
    assert raw["0"].shape == (1, 16, 16) and raw["2"].shape == (1, 8, 8)
    up = [normalise(torch.nn.functional.interpolate(raw[n][:, None], size=(24, 24), mode="bilinear")[:, 0])
          for n in ("0", "2")]
    assert torch.allclose(explain(target, images, (24, 24), ["0", "2"]), torch.maximum(*up))
    assert torch.equal(fuse([raw["2"]], (24, 24)), up[1])


def test_an_unknown_layer_is_named_and_leaves_no_hook():
    model = Region((slice(0, 2), slice(0, 2)))
    with pytest.raises(LayerError, match="no layer 'layer9'.*features"):
        layer_maps(model.target(), torch.rand(1, 3, 4, 4), ["features", "layer9"])
    assert not model.features._forward_hooks


def test_targets_are_the_students_mean_score_and_the_teachers_top_logit():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 255
    student = build_student(TINY)
    target = student_target(student)
    assert target.layers == ("layer4",) and target.kind == "mean score"
    with torch.no_grad():
        dist = student(images)[1].softmax(1).numpy()
        assert np.allclose(target.score(images).numpy(), scores_of("distribution", dist), atol=1e-5)
    teacher = load_backbone("resnet18", "random:0")
    target = teacher_target(teacher)
    assert target.layers == ("layer4",) and target.kind == "top-1 logit"
    with torch.no_grad():
        assert torch.allclose(target.score(images), teacher.model(teacher.normalise(images)).max(1).values)
        teacher.model.reset_classifier(0)  # headless: the pooled last feature map, summed
        headless = teacher_target(teacher)
        pooled = teacher.model.forward_features(teacher.normalise(images)).mean((2, 3)).sum(1)
        assert headless.kind == "pooled feature sum" and torch.allclose(headless.score(images), pooled, rtol=1e-4)
    assert teacher_target(load_backbone("tf_efficientnet_lite0", "random:0")).layers == ("blocks.6",)


@pytest.mark.parametrize("view", ["resize:50", "pad_crop:120:100", "pad_crop:80:64"])
def test_a_students_map_is_brought_back_to_the_image_frame(view):
    """Score = all of a brightness channel: the map is the view's brightness, so in the image's
    frame it must peak on the bright square wherever the view put it (pad_crop:80:64 shrinks the
    100-row image to 80 rows and crops it)."""
    model = nn.Sequential(nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1 / 3)
        model[0].bias.zero_()
    target = Target(lambda x: model(x).sum((1, 2, 3)), model, ("0",), "brightness")
    pixels = torch.zeros(100, 60, 3, dtype=torch.uint8)
    pixels[30:50, 10:30] = 255
    cam = student_map(target, pixels, view, (100, 60), (), torch.device("cpu"))
    assert cam.shape == (100, 60) and cam.max() == 1
    row, col = divmod(int(cam.argmax()), 60)
    assert 30 <= row < 50 and 10 <= col < 30
    assert cam[30:50, 10:30].mean() > 0.8 and cam[60:, :].max() < 0.05 and cam[:, 40:].max() < 0.05


# -- mIoU -----------------------------------------------------------------------------------------


def sorted_percentile(values: np.ndarray, p: float) -> float:
    """numpy's default (linear) percentile from the sorted values, written out."""
    v = np.sort(values.ravel())
    k = (len(v) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return float(v[lo] + (k - lo) * (v[hi] - v[lo]))


def test_iou_matches_an_independent_computation():
    rng = np.random.default_rng(4)
    cam, mask = rng.random((37, 23)), rng.random((37, 23)) < 0.3
    for p, got in zip(PERCENTILES, iou_curve(cam, mask)):
        fg = cam > sorted_percentile(cam, p)
        both = np.count_nonzero(np.logical_and(fg, mask))
        assert got == pytest.approx(both / (np.count_nonzero(fg) + np.count_nonzero(mask) - both))
    assert curve_area([0.4] * len(PERCENTILES)) == pytest.approx(0.4)
    assert curve_area(np.array(PERCENTILES) / 100) == pytest.approx(0.5)  # the line y = x over 0.05..0.95


def test_the_mask_itself_scores_one_below_its_background_share_and_its_inverse_zero(demo):
    masks = list(masks_of(demo).values())
    for mask in masks:
        background = 100 * (1 - mask.mean())
        curve = iou_curve(mask.astype(np.float32), mask)
        assert all(iou == 1.0 for p, iou in zip(PERCENTILES, curve) if p < background)
        assert np.allclose(iou_curve(1 - mask.astype(np.float32), mask), 0)
    curve = miou_curve([m.astype(np.float32) for m in masks], masks)
    below_all = [p < 100 * (1 - max(m.mean() for m in masks)) for p in PERCENTILES]
    assert np.all(curve[below_all] == 1.0) and any(below_all)
    assert miou_curve([1 - m.astype(np.float32) for m in masks], masks).max() == pytest.approx(0)


# -- the job --------------------------------------------------------------------------------------


def config_args(demo: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [f"dataset.path={demo}", f"out={out}", f"students=[{{checkpoint: '{checkpoint}', label: kd}}]",
            "teachers=[{backbone: resnet18, weights: 'random:0', label: r18}]", *extra]


def test_the_job_writes_curves_that_the_written_maps_and_masks_reproduce(demo, checkpoint, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = str(ROOT / "configs" / "explain_demo.yaml")  # the shipped config, its models replaced
    proc = subprocess.run([sys.executable, "-m", "ray_jobs.explain", "--config", config,
                           *config_args(demo, checkpoint, tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "[explain] kd: LayerCAM of the mean score at layer4 (resize:64)" in proc.stderr
    test_ids = (demo / "generic_test.jpgl").read_text().split()
    assert result["images"] == test_ids and len(test_ids) == 4  # the first n=16 of the test split: all 4
    assert list(result["curves"]) == ["kd", "r18"]
    assert result["models"]["r18"]["target"] == "top-1 logit" and result["models"]["kd"]["view"] == "resize:64"
    assert json.loads(Path(result["files"]["curves"]).read_text())["curves"] == result["curves"]
    masks = masks_of(demo)
    for label, curve in result["curves"].items():
        with np.load(result["files"]["maps"][label], allow_pickle=False) as npz:
            cams = [npz[i] for i in test_ids]
        assert all(c.dtype == np.float32 and c.shape == masks[i].shape and c.min() >= 0 and c.max() == 1
                   for c, i in zip(cams, test_ids))
        expected = [np.mean([iou_curve(c, masks[i], [p])[0] for c, i in zip(cams, test_ids)]) for p in PERCENTILES]
        assert [c["percentile"] for c in curve] == list(PERCENTILES)
        assert np.allclose([c["miou"] for c in curve], expected, rtol=0, atol=1e-12)
        assert result["auc"][label] == pytest.approx(curve_area(expected))
        assert all(0 <= c["miou"] <= 1 for c in curve)
    assert len(result["files"]["grids"]) == 1  # 4 images, 4 per grid
    for png in (result["files"]["plot"], *result["files"]["grids"]):
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 200


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    rc = run_job("explain", ExplainConfig, explain_job.main, argv=args)
    return rc, capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*images are missing")
def test_bad_inputs_give_one_message_naming_them(demo, checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    first, second = (demo / "generic_test.jpgl").read_text().split()[:2]
    (broken / "masks" / f"{first}.png").unlink()
    rc, err = run_in_process(config_args(broken, checkpoint, tmp_path / "o1"), capsys)
    assert rc == 2 and err.strip().startswith("error: mask of image") and f"masks/{first}.png not found" in err
    (broken / "images" / f"{second}.jpg").unlink()
    rc, err = run_in_process(config_args(broken, checkpoint, tmp_path / "o2", f"image_ids=['{second}']"), capsys)
    assert rc == 2 and f"error: image {second}:" in err and f"{second}.jpg not found" in err
    rc, err = run_in_process(config_args(demo, tmp_path / "nowhere", tmp_path / "o3"), capsys)
    assert rc == 2 and "error: checkpoint" in err and "nowhere" in err and "student.json" in err
    rc, err = run_in_process(config_args(demo, checkpoint, tmp_path / "o4", "image_ids=['999']"), capsys)
    assert rc == 2 and "error: image '999' is not in dataset" in err
    rc, err = run_in_process(config_args(demo, checkpoint, tmp_path / "o5", "teachers=[{backbone: resnet18, "
                                         "weights: 'random:0', layers: [layer9]}]"), capsys)
    assert rc == 2 and "error: ResNet has no layer 'layer9'" in err
    rc, err = run_in_process([f"dataset.path={demo}", "teachers=[{backbone: resnet18, weights: 'random:0', "
                              "label: a}, {backbone: resnet34, weights: 'random:0', label: a}]"], capsys)
    assert rc == 2 and "labels repeat" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing written by a refused run
