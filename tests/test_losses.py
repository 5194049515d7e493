"""Losses against independent NumPy references (loops over bins and samples), masks, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.labels import LOSSES
from trainers.labels import two_hot
from trainers.losses import (KINDS, LossSpec, StudentOutputs, Targets, bce_loss, emd_loss, feature_mse, score_mse,
                             student_loss, tag_bce)

BINS = 10
LABEL_OF = {kind: label for label, kinds in LOSSES.items() for kind in kinds}


def random_dists(rng: np.random.Generator, b: int, n: int = BINS) -> np.ndarray:
    x = rng.gamma(0.5, size=(b, n)) + 1e-9
    return x / x.sum(axis=1, keepdims=True)


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


# ---- independent references ---------------------------------------------------------------


def ref_emd_one(p, q, r=2.0) -> float:
    """Eq. 3 with explicit running CDFs over the bins."""
    cdf_p = cdf_q = 0.0
    acc = 0.0
    for k in range(len(p)):
        cdf_p += p[k]
        cdf_q += q[k]
        acc += abs(cdf_p - cdf_q) ** r
    return (acc / len(p)) ** (1.0 / r)


def ref_weighted_mean(values, weights=None) -> float:
    weights = [1.0] * len(values) if weights is None else list(weights)
    num = sum(w * v for w, v in zip(weights, values))
    den = sum(weights)
    return num / den if den > 0 else 0.0


def ref_emd(p, q, r=2.0, w=None) -> float:
    return ref_weighted_mean([ref_emd_one(a, b, r) for a, b in zip(p, q)], w)


def ref_feature_mse(ft, fs, w=None) -> float:
    return ref_weighted_mean([sum((a - b) ** 2 for a, b in zip(x, y)) / len(x) for x, y in zip(ft, fs)], w)


def ref_bce(target, logits, w=None) -> float:
    # -[y·log σ(x) + (1−y)·log(1−σ(x))] with log σ(x) = −log(1 + e^{−x}), written stably per sign
    def log_sigmoid(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))
    vals = [-(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x)) for y, x in zip(target, logits)]
    return ref_weighted_mean(vals, w)


def ref_tag_bce(target, logits, w=None) -> float:
    """Eq. 9's BCE term: per image the mean BCE over its tag-vector entries, then the batch mean."""
    return ref_weighted_mean([ref_bce(y_row, x_row) for y_row, x_row in zip(target, logits)], w)


def ref_score_mse(target, pred, w=None) -> float:
    return ref_weighted_mean([(a - b) ** 2 for a, b in zip(target, pred)], w)


# ---- EMD -------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 12), n=st.integers(2, 12), r=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_emd_matches_loop_reference(b, n, r, seed):
    rng = np.random.default_rng(seed)
    p, q = random_dists(rng, b, n), random_dists(rng, b, n)
    assert emd_loss(t(p), t(q), r=r).item() == pytest.approx(ref_emd(p, q, r), rel=1e-10, abs=1e-12)


def test_emd_eq3_normalisation_by_hand():
    # all mass on bin 1 vs all on bin 10: |ΔCDF| = 1 at k = 1..9, 0 at k = 10 → sqrt(9/10)
    p, q = torch.zeros(1, BINS), torch.zeros(1, BINS)
    p[0, 0], q[0, -1] = 1.0, 1.0
    assert emd_loss(p, q).item() == pytest.approx(math.sqrt(0.9))
    # per-sample root then batch mean, not a root over the whole batch: rows with EMD 0 and sqrt(0.9)
    pp, qq = torch.cat([p, p]), torch.cat([p, q])
    assert emd_loss(pp, qq).item() == pytest.approx(math.sqrt(0.9) / 2)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 8), pad=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_emd_weights_and_zero_weight_rows(b, pad, seed):
    rng = np.random.default_rng(seed)
    p, q = random_dists(rng, b + pad), random_dists(rng, b + pad)
    w = rng.uniform(0.1, 3.0, size=b + pad)
    assert emd_loss(t(p), t(q), weight=t(w)).item() == pytest.approx(ref_emd(p, q, 2, w), rel=1e-10)
    # padded rows with weight 0 (float or bool mask) leave the loss of the real rows unchanged
    mask = np.r_[np.ones(b), np.zeros(pad)]
    expected = ref_emd(p[:b], q[:b])
    assert emd_loss(t(p), t(q), weight=t(mask)).item() == pytest.approx(expected, rel=1e-10)
    assert emd_loss(t(p), t(q), weight=torch.as_tensor(mask > 0)).item() == pytest.approx(expected, rel=1e-10)


def test_zero_weight_rows_get_no_gradient_and_all_pad_batch_is_zero():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(4, BINS)), requires_grad=True)
    gt = t(random_dists(rng, 4))
    w = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    emd_loss(gt, logits.softmax(-1), weight=w).backward()
    assert torch.all(logits.grad[2:] == 0) and torch.all(logits.grad[:2].abs().sum(-1) > 0)

    logits.grad = None
    loss = emd_loss(gt, logits.softmax(-1), weight=torch.zeros(4, dtype=torch.float64))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_emd_gradient_is_finite_where_distributions_match():
    # d sqrt(m)/dm is infinite at m = 0; a naive root gives NaN gradients for a perfect prediction
    logits = torch.randn(3, BINS, dtype=torch.float64, requires_grad=True)
    p = logits.softmax(-1)
    loss = emd_loss(p.detach().clone(), p)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_emd_is_symmetric_and_rejects_bad_shapes():
    rng = np.random.default_rng(1)
    p, q = t(random_dists(rng, 5)), t(random_dists(rng, 5))
    assert emd_loss(p, q).item() == pytest.approx(emd_loss(q, p).item())
    with pytest.raises(ValueError, match="same 2-d shape"):
        emd_loss(p, q[:, :9])
    with pytest.raises(ValueError, match="one value per sample"):
        emd_loss(p, q, weight=torch.ones(4, dtype=torch.float64))


# ---- other terms -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 10), f=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_feature_mse_matches_reference(b, f, seed):
    rng = np.random.default_rng(seed)
    ft, fs, w = rng.normal(size=(b, f)), rng.normal(size=(b, f)), rng.uniform(0.0, 2.0, size=b)
    assert feature_mse(t(ft), t(fs)).item() == pytest.approx(ref_feature_mse(ft, fs), rel=1e-10)
    assert feature_mse(t(ft), t(fs), weight=t(w)).item() == pytest.approx(ref_feature_mse(ft, fs, w), rel=1e-10)
    assert feature_mse(t(ft), t(fs)).item() == pytest.approx(((ft - fs) ** 2).mean(), rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_bce_and_score_mse_match_references(b, seed):
    rng = np.random.default_rng(seed)
    target, logits, w = rng.uniform(size=b), rng.normal(scale=4, size=b), rng.uniform(0.0, 2.0, size=b)
    assert bce_loss(t(target), t(logits)).item() == pytest.approx(ref_bce(target, logits), rel=1e-9)
    assert bce_loss(t(target), t(logits), weight=t(w)).item() == pytest.approx(ref_bce(target, logits, w), rel=1e-9)
    s_t, s_p = rng.uniform(1, 10, size=b), rng.uniform(1, 10, size=b)
    assert score_mse(t(s_t), t(s_p)).item() == pytest.approx(ref_score_mse(s_t, s_p), rel=1e-10)
    assert score_mse(t(s_t), t(s_p), weight=t(w)).item() == pytest.approx(ref_score_mse(s_t, s_p, w), rel=1e-10)


def test_bce_on_logits_is_stable_for_confident_wrong_predictions():
    logits = torch.tensor([200.0, -200.0], requires_grad=True)  # float32: sigmoid saturates to exactly 1/0
    loss = bce_loss(torch.tensor([0.0, 1.0]), logits)
    loss.backward()
    assert loss.item() == pytest.approx(200.0) and torch.isfinite(logits.grad).all()


# ---- student loss recipes --------------------------------------------------------------------


TAG_IDS = 5  # width of the two-hot tag vectors of ``batch``


def batch(rng: np.random.Generator, kind: str, b: int = 6, f: int = 8):
    """Student outputs (leaf tensors needing grad) and targets for ``kind``'s label type, with tag
    logits and two-hot tags (only ``multitask`` reads them)."""
    fs = torch.tensor(rng.normal(size=(b, f)), requires_grad=True)
    ft = t(rng.normal(size=(b, f)))
    tag_logits = torch.tensor(rng.normal(size=(b, TAG_IDS)), requires_grad=True)
    tags = t(two_hot(rng.integers(0, TAG_IDS + 1, size=(b, 2)), TAG_IDS))
    if LABEL_OF[kind] == "binary":
        pred = torch.tensor(rng.normal(size=b), requires_grad=True)
        gt, teacher = t(rng.integers(0, 2, size=b)), t(rng.uniform(size=b))
        student_view = pred
    elif LABEL_OF[kind] == "score":
        pred = torch.tensor(rng.uniform(1, 10, size=b), requires_grad=True)
        gt, teacher = t(rng.uniform(1, 10, size=b)), t(rng.uniform(1, 10, size=b))
        student_view = pred
    else:
        pred = torch.tensor(rng.normal(size=(b, BINS)), requires_grad=True)  # logits; D_s = softmax
        gt, teacher = t(random_dists(rng, b)), t(random_dists(rng, b))
        student_view = pred.softmax(-1)
    return pred, StudentOutputs(prediction=student_view, feature=fs, tag_logits=tag_logits), \
        Targets(gt, teacher, ft, tags)


def reference_total(kind, spec, out: StudentOutputs, tgt: Targets, w=None) -> tuple[float, dict[str, float]]:
    """Each recipe written out from the paper's equations, on NumPy copies."""
    fw, ow, a = spec.feature_weight, spec.output_weight, spec.alpha
    ds = out.prediction.detach().numpy()
    gt, teacher = tgt.gt.numpy(), tgt.teacher_prediction.numpy()
    feat = ref_feature_mse(tgt.teacher_feature.numpy(), out.feature.detach().numpy(), w)
    emd_t, emd_gt = (lambda: ref_emd(teacher, ds, 2, w)), (lambda: ref_emd(gt, ds, 2, w))
    if kind == "baseline":
        terms = {"emd_gt": emd_gt()}
        return ow * terms["emd_gt"], terms
    if kind == "kd":  # eq. 7
        terms = {"emd_teacher": emd_t(), "feature_mse": feat}
        return ow * terms["emd_teacher"] + fw * feat, terms
    if kind == "kd_feature_only":
        terms = {"emd_gt": emd_gt(), "feature_mse": feat}
        return ow * terms["emd_gt"] + fw * feat, terms
    if kind == "kd_output_only":
        terms = {"emd_teacher": emd_t()}
        return ow * terms["emd_teacher"], terms
    if kind == "mixed_loss":  # eq. 10
        terms = {"emd_teacher": emd_t(), "emd_gt": emd_gt(), "feature_mse": feat}
        return ow * ((1 - a) * terms["emd_teacher"] + a * terms["emd_gt"]) + fw * feat, terms
    if kind == "mixed_label":  # eq. 11
        mixed = [[a * g + (1 - a) * h for g, h in zip(gr, hr)] for gr, hr in zip(gt, teacher)]
        terms = {"emd_mixed_label": ref_emd(mixed, ds, 2, w), "feature_mse": feat}
        return ow * terms["emd_mixed_label"] + fw * feat, terms
    if kind == "bce":  # eq. 12
        terms = {"bce_teacher": ref_bce(teacher, ds, w), "feature_mse": feat}
        return ow * terms["bce_teacher"] + fw * feat, terms
    if kind == "bce_baseline":
        terms = {"bce_gt": ref_bce(gt, ds, w)}
        return ow * terms["bce_gt"], terms
    if kind == "multitask":  # eq. 9: EMD on the ratings + BCE on the two-hot tag vector, weight 1
        terms = {"emd_gt": emd_gt(), "tag_bce": ref_tag_bce(tgt.tags.numpy(), out.tag_logits.detach().numpy(), w)}
        return ow * terms["emd_gt"] + terms["tag_bce"], terms
    if kind == "mse":  # eq. 13
        terms = {"mse_teacher": ref_score_mse(teacher, ds, w), "feature_mse": feat}
        return ow * terms["mse_teacher"] + fw * feat, terms
    assert kind == "mse_baseline"
    terms = {"mse_gt": ref_score_mse(gt, ds, w)}
    return ow * terms["mse_gt"], terms


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.5), (0.3, 2.5, 0.2)])
def test_student_loss_equals_weighted_sum_of_terms(kind, weights):
    rng = np.random.default_rng([KINDS.index(kind), int(weights[1] * 10)])
    spec = LossSpec(kind, feature_weight=weights[0], output_weight=weights[1], alpha=weights[2])
    _, out, tgt = batch(rng, kind)
    total, terms = student_loss(spec, out, tgt)
    expected_total, expected_terms = reference_total(kind, spec, out, tgt)
    assert set(terms) == set(expected_terms)
    for name, value in expected_terms.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-9), name
        assert not terms[name].requires_grad
    assert total.item() == pytest.approx(expected_total, rel=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_supervises_the_output_with_the_loss_of_its_label(kind):
    """The label table (trainers.labels.LOSSES) and the recipes agree: EMD terms for a
    distribution, BCE for a binary label, MSE on scores for a score."""
    _, out, tgt = batch(np.random.default_rng(4), kind)
    _, terms = student_loss(LossSpec(kind), out, tgt)
    output_losses = {name.split("_", 1)[0] for name in terms if name not in ("feature_mse", "tag_bce")}
    assert output_losses == {{"distribution": "emd", "binary": "bce", "score": "mse"}[LABEL_OF[kind]]}


def test_paper_defaults_eq7_eq10_eq11():
    rng = np.random.default_rng(3)
    _, out, tgt = batch(rng, "kd")
    ds, dt, gt = out.prediction.detach().numpy(), tgt.teacher_prediction.numpy(), tgt.gt.numpy()
    feat = ref_feature_mse(tgt.teacher_feature.numpy(), out.feature.detach().numpy())
    kd, _ = student_loss(LossSpec(), out, tgt)
    assert kd.item() == pytest.approx(ref_emd(dt, ds) + feat)
    mixed_loss, _ = student_loss(LossSpec("mixed_loss"), out, tgt)
    assert mixed_loss.item() == pytest.approx(0.5 * ref_emd(dt, ds) + 0.5 * ref_emd(gt, ds) + feat)
    mixed_label, _ = student_loss(LossSpec("mixed_label"), out, tgt)
    assert mixed_label.item() == pytest.approx(ref_emd(0.5 * gt + 0.5 * dt, ds) + feat)


@pytest.mark.parametrize("kind", KINDS)
def test_student_loss_masks_padding_rows(kind):
    rng = np.random.default_rng(11)
    _, out, tgt = batch(rng, kind, b=7)
    w = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    total, _ = student_loss(LossSpec(kind), out, tgt, weight=w)
    real = StudentOutputs(out.prediction[:5], out.feature[:5], out.tag_logits[:5])
    real_tgt = Targets(tgt.gt[:5], tgt.teacher_prediction[:5], tgt.teacher_feature[:5], tgt.tags[:5])
    expected, _ = student_loss(LossSpec(kind), real, real_tgt)
    assert total.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_student_and_are_finite(kind):
    rng = np.random.default_rng(5)
    pred, out, tgt = batch(rng, kind)
    total, terms = student_loss(LossSpec(kind), out, tgt)
    total.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    if "feature_mse" in terms:
        assert torch.isfinite(out.feature.grad).all() and out.feature.grad.abs().sum() > 0
    else:
        assert out.feature.grad is None


def test_unknown_kind_lists_the_kinds_and_bad_weights_are_rejected():
    with pytest.raises(ValueError) as err:
        LossSpec("distill")
    assert all(kind in str(err.value) for kind in KINDS)
    for bad in (dict(alpha=1.5), dict(alpha=-0.1), dict(feature_weight=-1.0), dict(output_weight=float("nan")),
                dict(feature_weight=float("inf"))):
        with pytest.raises(ValueError):
            LossSpec("mixed_loss", **bad)


def test_missing_supervision_is_named():
    rng = np.random.default_rng(2)
    _, out, tgt = batch(rng, "kd")
    with pytest.raises(ValueError, match="targets.teacher_feature"):
        student_loss(LossSpec("kd"), out, Targets(gt=tgt.gt, teacher_prediction=tgt.teacher_prediction))
    with pytest.raises(ValueError, match="outputs.feature"):
        student_loss(LossSpec("kd"), StudentOutputs(out.prediction), tgt)
    with pytest.raises(ValueError, match="targets.gt"):
        student_loss(LossSpec("baseline"), out, Targets(teacher_prediction=tgt.teacher_prediction))


def test_multitask_is_emd_plus_bce_on_the_two_hot_tags_by_hand():
    """Eq. 9 on two images, every number written out: EMD of the ratings + BCE of the tag vector."""
    probs = np.array([[0.1, 0.2, 0.3, 0.4] + [0.0] * 6, [0.0] * 6 + [0.25] * 4])
    gt = np.array([[0.25] * 4 + [0.0] * 6, [0.0] * 9 + [1.0]])
    # image 0 has tags 1 and 3, image 1 only tag 2, of 3 tag ids
    tags = two_hot(np.array([[1, 3], [2, 0]]), 3)
    np.testing.assert_array_equal(tags, [[1, 0, 1], [0, 1, 0]])
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])

    emd = np.mean([np.sqrt(np.mean((np.cumsum(p) - np.cumsum(g)) ** 2)) for p, g in zip(probs, gt)])
    sig = 1 / (1 + np.exp(-logits))
    bce = np.mean(-(tags * np.log(sig) + (1 - tags) * np.log(1 - sig)))  # 6 entries, 3 per image
    total, terms = student_loss(LossSpec("multitask"), StudentOutputs(t(probs), tag_logits=t(logits)),
                                Targets(gt=t(gt), tags=t(tags)))
    assert terms["emd_gt"].item() == pytest.approx(emd, rel=1e-12)
    assert terms["tag_bce"].item() == pytest.approx(bce, rel=1e-12)
    assert total.item() == pytest.approx(emd + bce, rel=1e-12)
    # output_weight scales the aesthetic term only (eq. 9 has no weight on the tag term)
    scaled, _ = student_loss(LossSpec("multitask", output_weight=2.0), StudentOutputs(t(probs), tag_logits=t(logits)),
                             Targets(gt=t(gt), tags=t(tags)))
    assert scaled.item() == pytest.approx(2 * emd + bce, rel=1e-12)
    assert tag_bce(t(tags), t(logits), weight=t([0.0, 1.0])).item() == pytest.approx(
        np.mean(-(tags[1] * np.log(sig[1]) + (1 - tags[1]) * np.log(1 - sig[1]))), rel=1e-12)


def test_multitask_names_missing_tags_and_tag_logits():
    _, out, tgt = batch(np.random.default_rng(9), "multitask")
    with pytest.raises(ValueError, match="targets.tags"):
        student_loss(LossSpec("multitask"), out, Targets(gt=tgt.gt))
    with pytest.raises(ValueError, match="outputs.tag_logits"):
        student_loss(LossSpec("multitask"), StudentOutputs(out.prediction), tgt)
    with pytest.raises(ValueError, match="tag BCE"):
        tag_bce(tgt.tags[:, :3], out.tag_logits)
