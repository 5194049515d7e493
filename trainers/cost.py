"""Params and FLOPs of teachers and students, for the report tables (paper Tables V, VII, VIII).

Models are built on PyTorch's meta device: shapes without weights or arithmetic. Counting the
paper's trio at full resolution this way takes a second on a CPU driver and loads no weights.
FLOPs follow the paper's convention, one multiply-add = one FLOP; ``FlopCounterMode`` counts two
per multiply-add, so its totals are halved. This gives ResNeXt101-32x8d 30.4 G at 300×300 and
134.0 G at 640×640 (paper Table VII: 30.6, 134.7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainers.backbones import build_extractor
from trainers.student import StudentSpec, build_student, count_params, view_size


def gflops(model: nn.Module, height: int, width: int, tag_width: int = 0) -> float:
    """GFLOPs (multiply-adds) of one forward pass of one RGB image, on the model's device, in eval mode.
    ``tag_width`` > 0: a multi-modal student, also given a two-hot tag vector of that width (its
    tag branch is part of its cost)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        tags = (torch.zeros(1, tag_width, device=device),) if tag_width else ()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, height, width, device=device), *tags)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def student_cost(spec: StudentSpec) -> tuple[int, float]:
    """(params, GFLOPs at the student's view) of the student ``spec`` describes."""
    with torch.device("meta"):
        model = build_student(StudentSpec(**{**spec.to_json(), "weights": "random:0"}))
    return count_params(model), gflops(model, *view_size(spec.view), tag_width=spec.tag_width if spec.semantic else 0)


def teacher_cost(backbones: str | Sequence[str], height: int, width: int) -> tuple[int, float]:
    """(params, GFLOPs) of the backbones' MLSP extraction from one ``height``×``width`` image."""
    with torch.device("meta"):
        extractor = build_extractor(backbones, "random:0", device="meta")
    return count_params(extractor), sum(gflops(b, height, width) for b in extractor.backbones)
