"""LayerCAM (Jiang et al., "LayerCAM: Exploring hierarchical class activation maps", TIP 2021): where
in an image a model's output comes from — the paper's Fig. 4 and its main-subject study (Fig. 8-10).

For a target layer with activation A [C, h, w] and the gradient G = ∂s/∂A of a scalar target s,

    M = ReLU(Σ_k ReLU(G_k) ⊙ A_k)

Unlike Grad-CAM, each location keeps its own (positive) gradient instead of a channel average, so
the map stays sharp on shallow layers too. M is upsampled (bilinear) to the requested size and
min-max normalised to [0, 1]. Several layers are fused as LayerCAM fuses them: each layer's map
upsampled and normalised on its own, then the element-wise maximum.

The target s is what the model is *for*:

* a student (``trainers.student.Student``): its prediction as one number — the mean score
  Σ_k k·p_k of the predicted 10-bin distribution, the probability of "high" for a binary
  student, the score for a regression one (the number SRCC compares, ``labels.scores_of``);
* a teacher backbone (object classification): the top-1 class logit; a headless backbone
  (``num_classes == 0``, its output is the pooled last feature map) gives the sum of that pooled
  feature, i.e. how strongly the last stage responds at all.

Target layers are named as in the backbone's ``named_modules`` (``layer4``, ``blocks.6``, …), for
students and teachers alike; the default is the backbone's last stage (its last ``feature_info``
level), as in the paper. Hooks live only for one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.errors import UserError
from trainers.backbones import Backbone
from trainers.labels import NUM_BINS, prediction
from trainers.student import Student, StudentError


class LayerError(UserError, ValueError):
    """A target layer that the model does not have, or whose output is not a feature map."""


def layercam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """ReLU(Σ_k ReLU(G_k) ⊙ A_k): [B, C, h, w] activation and gradient → [B, h, w] map."""
    return torch.relu((torch.relu(gradient) * activation).sum(dim=1))


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map of [B, ...] min-max scaled to [0, 1]; a constant map (no evidence anywhere) → zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0).view_as(maps)


def fuse(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-layer [B, h_i, w_i] maps → one [B, H, W] map in [0, 1]: each upsampled to ``size``
    (bilinear) and normalised, then the element-wise maximum."""
    up = [normalise(F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0])
          for m in maps]
    return torch.stack(up).amax(0)


@dataclass(frozen=True, eq=False)
class Target:
    """What to explain in a model: ``score`` maps float RGB [B, 3, H, W] on 0..255 to the [B]
    target scores; target layers are looked up by name in ``root``; ``layers`` is the default."""

    score: Callable[[torch.Tensor], torch.Tensor]
    root: nn.Module
    layers: tuple[str, ...]
    kind: str


def last_stage(model: nn.Module) -> str:
    """The module name of a timm backbone's last feature level (its last stage)."""
    return model.feature_info[-1]["module"]


def student_target(student: Student) -> Target:
    """The student's prediction as one number per image (module docstring). Not for a multi-modal
    student: its prediction also depends on the image's tags, which a map over pixels cannot show."""
    if student.spec.semantic is not None:
        raise StudentError(f"LayerCAM explains images-only students; this one is {student.spec.semantic} (its "
                           "prediction also reads the image's tags): explain its images-only counterpart")
    label = student.spec.label

    def score(images: torch.Tensor) -> torch.Tensor:
        predicted = prediction(label, student(images)[1])
        if label != "distribution":
            return predicted
        return predicted @ torch.arange(1, NUM_BINS + 1, dtype=predicted.dtype, device=predicted.device)

    kind = {"distribution": "mean score", "binary": "probability of high", "score": "score"}[label]
    return Target(score, student.backbone, (last_stage(student.backbone),), kind)


def teacher_target(backbone: Backbone) -> Target:
    """The top-1 class logit of a classifier; the sum of the pooled last feature map when headless."""
    model = backbone.model
    headless = getattr(model, "num_classes", None) == 0

    def score(images: torch.Tensor) -> torch.Tensor:
        out = model(backbone.normalise(images))
        return out.flatten(1).sum(1) if headless else out.amax(1)

    return Target(score, model, (last_stage(model),), "pooled feature sum" if headless else "top-1 logit")


@contextmanager
def _capture(root: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of ``layers`` (by name in ``root``) during the forward passes inside the block."""
    modules = dict(root.named_modules())
    if missing := [name for name in layers if name not in modules]:
        stages = [n for n in modules if n and "." not in n]
        nested = next((n for n in modules if "." in n), "")
        hint = f"; nested ones are named with dots, e.g. {nested}" if nested else ""
        raise LayerError(f"{type(root).__name__} has no layer {missing[0]!r}; its top-level modules are "
                         f"{', '.join(stages)}{hint}")
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, out):
        """Keep the output and pass a copy on: a later in-place op (``x += shortcut``, an inplace
        ReLU) then changes the copy, never the activation whose values and gradient we read."""
        outputs[name] = out
        return out.clone() if isinstance(out, torch.Tensor) else None

    handles = [modules[name].register_forward_hook(lambda _m, _i, out, name=name: keep(name, out)) for name in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_maps(target: Target, images: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Raw LayerCAM [B, h, w] of each layer (default: the target's) for float RGB [B, 3, H, W] on 0..255.

    The input requires grad, so a frozen backbone (parameters without grad) is explained too; in
    eval mode each image's score depends on that image alone, so one backward serves the batch.
    """
    layers = tuple(layers) or target.layers
    x = images.detach().float().requires_grad_(True)
    with torch.enable_grad(), _capture(target.root, layers) as outputs:
        scores = target.score(x)
    if bad := [n for n in layers if not (isinstance(outputs.get(n), torch.Tensor) and outputs[n].ndim == 4)]:
        raise LayerError(f"layer {bad[0]!r} did not output a [B, C, h, w] feature map; choose a convolutional "
                         "stage (e.g. the default, the last stage)")
    gradients = torch.autograd.grad(scores.sum(), [outputs[n] for n in layers], allow_unused=True)
    return {n: layercam(outputs[n].detach(), torch.zeros_like(outputs[n]) if g is None else g)
            for n, g in zip(layers, gradients)}


def explain(target: Target, images: torch.Tensor, size: tuple[int, int], layers: Sequence[str] = ()) -> torch.Tensor:
    """The LayerCAM [B, H, W] in [0, 1] of ``images`` at ``size``, fused over ``layers``."""
    return fuse(list(layer_maps(target, images, layers).values()), size)
