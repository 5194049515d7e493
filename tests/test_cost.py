"""Params and FLOPs counted on the meta device equal those of the real models with real weights."""

from __future__ import annotations

import pytest
import torch

from trainers.backbones import build_extractor
from trainers.cost import gflops, student_cost, teacher_cost
from trainers.student import StudentSpec, build_student, count_params, view_size


def test_student_cost_matches_the_real_student():
    spec = StudentSpec(backbone="tf_efficientnet_lite0", weights="packaged", feature_width=512,
                       label="distribution", view="resize:96x128")
    model = build_student(spec)
    params, g = student_cost(spec)
    assert params == count_params(model)
    assert g == pytest.approx(gflops(model, *view_size(spec.view)), rel=1e-9)
    assert g > 0


def test_teacher_cost_is_the_sum_over_backbones_and_grows_with_the_image():
    extractor = build_extractor(["tf_efficientnet_lite0", "tf_efficientnet_lite1"], "packaged", device="cpu")
    params, g = teacher_cost(["tf_efficientnet_lite0", "tf_efficientnet_lite1"], 96, 160)
    assert params == count_params(extractor)
    assert g == pytest.approx(sum(gflops(b, 96, 160) for b in extractor.backbones), rel=1e-9)
    _, g_large = teacher_cost(["tf_efficientnet_lite0", "tf_efficientnet_lite1"], 192, 320)
    assert g_large / g == pytest.approx(4, rel=0.05)  # convolutions scale with the pixel count
    assert not any(p.is_meta for p in extractor.parameters()) and torch.is_grad_enabled()


def test_a_multimodal_students_cost_includes_its_tag_branch():
    from trainers.student import SEMANTIC_WIDTH

    plain = StudentSpec(backbone="resnet18", view="resize:64", feature_width=16)
    multimodal = StudentSpec(backbone="resnet18", view="resize:64", feature_width=16, semantic="multimodal",
                             tag_width=66)
    (p_params, p_gflops), (m_params, m_gflops) = student_cost(plain), student_cost(multimodal)
    branch = 66 * SEMANTIC_WIDTH + SEMANTIC_WIDTH + SEMANTIC_WIDTH * SEMANTIC_WIDTH + SEMANTIC_WIDTH
    assert m_params - p_params == branch + SEMANTIC_WIDTH * 10  # the branch, and the head's wider input
    assert (m_gflops - p_gflops) * 1e9 == pytest.approx(66 * SEMANTIC_WIDTH + SEMANTIC_WIDTH ** 2 + SEMANTIC_WIDTH * 10)
