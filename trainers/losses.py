"""Losses of the distiller and the student (Hou et al., eq. 3, 7, 10–13).

Every loss here is a per-sample value averaged over the batch with an optional per-sample
``weight`` [B] (float, or a bool mask). The partition plan pads a rank's share with rows flagged
``pad=True`` (README, "Reads"); passing ``weight=~pad`` drops them: a zero-weight row adds
nothing to the value or the gradient. A batch whose weights are all zero gives a loss of 0 that
is still connected to the graph, so every DDP rank can call ``backward()``. Rows must be finite
(the padding rows are real rows read twice, so they are).

Student losses (``student_loss``) are a weighted sum of named terms; ``LossSpec.kind`` picks the
recipe (see ``KINDS``):

=================  ============================================================================
kind               total
=================  ============================================================================
baseline           o·EMD(D_gt, D_s)                       (eq. 2–3, the student without KD)
kd                 o·EMD(D_t, D_s) + f·MSE(f_t, f_s)      (eq. 7)
kd_feature_only    o·EMD(D_gt, D_s) + f·MSE(f_t, f_s)     (Table VI: "directly supervised by
                                                           GTs when the output supervision is off")
kd_output_only     o·EMD(D_t, D_s)                        (Table VI, output supervision only)
mixed_loss         o·((1−α)·EMD(D_t, D_s) + α·EMD(D_gt, D_s)) + f·MSE(f_t, f_s)   (eq. 10, α=½)
mixed_label        o·EMD(α·D_gt + (1−α)·D_t, D_s) + f·MSE(f_t, f_s)               (eq. 11, α=½)
multitask          o·EMD(D_gt, D_s) + BCE(v_s, v̂_s)        (eq. 9, Table XII: the student also
                                                           predicts the two-hot tag vector v_s)
bce                o·BCE(ŷ_t, ŷ_s) + f·MSE(f_t, f_s)      (eq. 12, binary labels)
bce_baseline       o·BCE(y_gt, ŷ_s)                       (Table XV "w/o KD", binary labels)
mse                o·MSE(ŷ_t, ŷ_s) + f·MSE(f_t, f_s)      (eq. 13, score labels)
mse_baseline       o·MSE(y_gt, ŷ_s)                       (Table XV "w/o KD", score labels)
=================  ============================================================================

with o = ``output_weight``, f = ``feature_weight`` (both 1 in the paper) and α = ``alpha``, the
ground truth's share (½ in eq. 10 and 11). The tag term of ``multitask`` has eq. 9's weight 1:
it is not the aesthetic output that ``output_weight`` scales. Its BCE is the mean over the
vector's entries of each image (:func:`tag_bce`), then the batch mean like every term.

Each kind fits one label kind (EMD a distribution, BCE a binary label, MSE a score): that table
is ``trainers.labels.LOSSES``, and ``trainers.labels.check_loss`` checks a pair before a run.
``KINDS`` is read from it, so a kind cannot exist without a label it fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.labels import LOSSES

KINDS = tuple(kind for kinds in LOSSES.values() for kind in kinds)


def _batch_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean over the batch; all-zero weights give 0 (still differentiable)."""
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected one value per sample "
                         f"{tuple(per_sample.shape)}")
    w = weight.to(per_sample.dtype)
    total = w.sum()
    return (w * per_sample).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str, ndim: int) -> None:
    if a.shape != b.shape or a.dim() != ndim:
        raise ValueError(f"{what}: expected two tensors of the same {ndim}-d shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def emd_per_sample(p: torch.Tensor, q: torch.Tensor, r: float = 2) -> torch.Tensor:
    """EMD of eq. 3 for each row: (1/n · Σ_k |CDF_p(k) − CDF_q(k)|^r)^(1/r), shape [B].

    The 1/n sits inside the root, as in eq. 3 (and NIMA [27]), so the value does not grow with
    the number of bins. Identical rows give 0 with a zero (not NaN) gradient: the root's
    derivative is infinite at 0, so it is only taken where the mean is positive.
    """
    _same_shape(p, q, "EMD", 2)
    cdf_diff = torch.cumsum(p - q, dim=-1)
    m = cdf_diff.abs().pow(r).mean(dim=-1)
    positive = m > 0
    return torch.where(positive, torch.where(positive, m, torch.ones_like(m)).pow(1.0 / r), torch.zeros_like(m))


def emd_loss(p: torch.Tensor, q: torch.Tensor, r: float = 2, weight: torch.Tensor | None = None) -> torch.Tensor:
    """EMD loss (eq. 3) between distributions [B, n] over ordered bins, averaged over the batch.

    Computed per sample, then (weighted-)averaged over samples, as eq. 2 sums the per-image loss.
    The distiller is trained with ``emd_loss(D_gt, D_t)``; r = 2 throughout the paper.
    """
    return _batch_mean(emd_per_sample(p, q, r), weight)


def feature_mse(f_t: torch.Tensor, f_s: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between teacher and student aesthetic features [B, F] (term 2 of eq. 7).

    Mean over feature dimensions per sample, then over the batch; unweighted this equals
    ``torch.nn.functional.mse_loss(f_s, f_t)``.
    """
    _same_shape(f_t, f_s, "feature MSE", 2)
    return _batch_mean((f_s - f_t).pow(2).mean(dim=-1), weight)


def bce_loss(target: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of eq. 12 against a target probability in [0, 1], shape [B].

    The target is the teacher's ŷ_t (a soft label) or a 0/1 ground-truth label. The student's
    ŷ_s is passed as a logit: ``binary_cross_entropy_with_logits`` stays finite where
    log(sigmoid(x)) would underflow.
    """
    _same_shape(target, logits, "BCE", 1)
    return _batch_mean(F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none"), weight)


def tag_bce(target: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of eq. 9 between two-hot tag vectors v_s [B, T] and the tag head's logits v̂_s [B, T]:
    per image the mean over the T entries (each entry is its own yes/no question: does the image
    have this tag), then the batch mean. Logits, for the same reason as :func:`bce_loss`."""
    _same_shape(target, logits, "tag BCE", 2)
    per_entry = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return _batch_mean(per_entry.mean(dim=-1), weight)


def score_mse(target: torch.Tensor, pred: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error between scores [B] (term 1 of eq. 13: teacher score vs student score)."""
    _same_shape(target, pred, "score MSE", 1)
    return _batch_mean((pred - target.to(pred.dtype)).pow(2), weight)


@dataclass(frozen=True)
class LossSpec:
    """Which student loss, and its term weights (see the module docstring's table).

    ``alpha`` is the ground truth's share in ``mixed_loss`` (eq. 10) and ``mixed_label``
    (eq. 11); the paper uses ½ in both. It is ignored by the other kinds.
    """

    kind: str = "kd"
    feature_weight: float = 1.0
    output_weight: float = 1.0
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown loss kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("feature_weight", "output_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"LossSpec.{name} must be a finite number ≥ 0, got {value!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"LossSpec.alpha (ground truth's share) must be in [0, 1], got {self.alpha!r}")


@dataclass(frozen=True, eq=False)
class StudentOutputs:
    """What the student predicts for a batch.

    ``prediction``: D_s as probabilities [B, 10] for distribution kinds, a logit [B] for ``bce*``,
    a score [B] for ``mse*``. ``feature``: the student aesthetic feature f_s [B, F] (needed by the
    kinds with a feature term). ``tag_logits``: the tag head's logits v̂_s [B, T] (``multitask``).
    """

    prediction: torch.Tensor
    feature: torch.Tensor | None = None
    tag_logits: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Targets:
    """Supervision for a batch: ground truth and/or stored teacher knowledge (eq. 6).

    ``gt``: D_gt [B, 10], a 0/1 label [B] or a score [B]. ``teacher_prediction``: D_t [B, 10], the
    teacher's probability ŷ_t [B] or its score [B]. ``teacher_feature``: f_t [B, F]. ``tags``: the
    ground-truth two-hot tag vectors v_s [B, T] (``multitask``; ``trainers.labels.two_hot``).
    """

    gt: torch.Tensor | None = None
    teacher_prediction: torch.Tensor | None = None
    teacher_feature: torch.Tensor | None = None
    tags: torch.Tensor | None = None


def _need(value: torch.Tensor | None, name: str, kind: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"loss kind {kind!r} needs {name}, which was not given")
    return value


def _terms(spec: LossSpec) -> dict[str, float]:
    """Coefficient of each named term in ``spec.kind``'s total."""
    o, f, a = spec.output_weight, spec.feature_weight, spec.alpha
    return {
        "baseline": {"emd_gt": o},
        "kd": {"emd_teacher": o, "feature_mse": f},
        "kd_feature_only": {"emd_gt": o, "feature_mse": f},
        "kd_output_only": {"emd_teacher": o},
        "mixed_loss": {"emd_teacher": o * (1 - a), "emd_gt": o * a, "feature_mse": f},
        "mixed_label": {"emd_mixed_label": o, "feature_mse": f},
        "bce": {"bce_teacher": o, "feature_mse": f},
        "bce_baseline": {"bce_gt": o},
        "mse": {"mse_teacher": o, "feature_mse": f},
        "mse_baseline": {"mse_gt": o},
        "multitask": {"emd_gt": o, "tag_bce": 1.0},
    }[spec.kind]


def _term(name: str, spec: LossSpec, out: StudentOutputs, tgt: Targets, weight: torch.Tensor | None) -> torch.Tensor:
    """The unweighted value of one named term of ``_terms``."""
    kind = spec.kind
    if name == "feature_mse":
        return feature_mse(_need(tgt.teacher_feature, "targets.teacher_feature", kind),
                           _need(out.feature, "outputs.feature", kind), weight)
    if name == "tag_bce":
        return tag_bce(_need(tgt.tags, "targets.tags", kind), _need(out.tag_logits, "outputs.tag_logits", kind), weight)
    loss_name, source = name.split("_", 1)  # "<emd|bce|mse>_<gt|teacher|mixed_label>"
    if source == "mixed_label":
        target = (spec.alpha * _need(tgt.gt, "targets.gt", kind)
                  + (1 - spec.alpha) * _need(tgt.teacher_prediction, "targets.teacher_prediction", kind))
    elif source == "gt":
        target = _need(tgt.gt, "targets.gt", kind)
    else:
        target = _need(tgt.teacher_prediction, "targets.teacher_prediction", kind)
    loss = {"emd": emd_loss, "bce": bce_loss, "mse": score_mse}[loss_name]
    return loss(target, out.prediction, weight=weight)


def student_loss(spec: LossSpec, outputs: StudentOutputs, targets: Targets,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total student loss for ``spec.kind`` and its unweighted terms (detached, for logging).

    ``total == Σ coefficient · term`` with the coefficients of the module docstring's table.
    ``weight`` [B] weights (or masks) samples in every term alike.
    """
    values = {name: _term(name, spec, outputs, targets, weight) for name in _terms(spec)}
    total = sum(coef * values[name] for name, coef in _terms(spec).items())
    return total, {name: v.detach() for name, v in values.items()}
