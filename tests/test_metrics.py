"""Metrics against SciPy / NumPy references and hand-built examples."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from trainers.losses import emd_loss
from trainers.metrics import (HIGH_THRESHOLD, accuracy, evaluate, evaluate_binary, evaluate_scores, mean_emd,
                              mean_score, per_category, plcc, srcc)


def random_dists(rng: np.random.Generator, n: int, bins: int = 10) -> np.ndarray:
    x = rng.gamma(0.7, size=(n, bins)) + 1e-9
    return x / x.sum(axis=1, keepdims=True)


def ref_mean_score(dist) -> list[float]:
    return [sum((k + 1) * p for k, p in enumerate(row)) / sum(row) for row in dist]


def ref_emd(p, q) -> float:
    vals = []
    for a, b in zip(p, q):
        ca = cb = acc = 0.0
        for k in range(len(a)):
            ca, cb = ca + a[k], cb + b[k]
            acc += (ca - cb) ** 2
        vals.append(math.sqrt(acc / len(a)))
    return sum(vals) / len(vals)


def ref_accuracy(pred, gt) -> float:
    return sum((p >= 5) == (g >= 5) for p, g in zip(pred, gt)) / len(pred)


def test_mean_score_matches_loop_and_accepts_vote_counts():
    rng = np.random.default_rng(0)
    d = random_dists(rng, 20)
    assert np.allclose(mean_score(d), ref_mean_score(d))
    votes = rng.integers(0, 50, size=(20, 10))
    votes[:, 4] += 1  # every row has mass
    assert np.allclose(mean_score(votes), mean_score(votes / votes.sum(1, keepdims=True)))
    assert mean_score([[0] * 9 + [1]])[0] == 10.0 and mean_score([[3] + [0] * 9])[0] == 1.0
    with pytest.raises(ValueError, match="no mass"):
        mean_score(np.zeros((1, 10)))


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=80, deadline=None)
@given(n=st.integers(3, 60), levels=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_srcc_matches_scipy_with_ties(n, levels, seed):
    rng = np.random.default_rng(seed)
    # few distinct values → many ties, where average ranks matter
    pred, gt = rng.integers(0, levels, size=n).astype(float), rng.integers(0, levels, size=n) + rng.uniform(size=n)
    expected = stats.spearmanr(pred, gt).statistic
    got = srcc(pred, gt)
    if np.isnan(expected):
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 60), seed=st.integers(0, 2**32 - 1))
def test_plcc_matches_corrcoef(n, seed):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=n)
    gt = 0.5 * pred + rng.normal(size=n)
    assert plcc(pred, gt) == pytest.approx(np.corrcoef(pred, gt)[0, 1], abs=1e-12)


def test_correlations_of_monotone_and_reversed_inputs():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    assert srcc(x, x ** 2) == pytest.approx(1.0) and srcc(x, -x) == pytest.approx(-1.0)
    assert plcc(x, 3 * x + 1) == pytest.approx(1.0) and plcc(x, x ** 2) < 1.0


def test_degenerate_correlations_are_none():
    gt = np.array([4.0, 5.5, 6.0, 3.2])
    assert srcc(np.full(4, 5.1), gt) is None and plcc(np.full(4, 5.1), gt) is None  # collapsed model
    assert srcc(gt, np.full(4, 5.1)) is None and plcc(gt, np.full(4, 5.1)) is None
    assert srcc([5.0], [6.0]) is None and plcc([5.0], [6.0]) is None
    d = np.tile(np.eye(10)[4], (4, 1))  # every prediction is the same distribution
    result = evaluate(d, random_dists(np.random.default_rng(1), 4))
    assert result["srcc"] is None and result["plcc"] is None and result["acc"] is not None
    json.dumps(result, allow_nan=False)  # None, not NaN: valid JSON


def test_accuracy_threshold_convention():
    assert HIGH_THRESHOLD == 5.0
    # mean score exactly 5 counts as high, just under 5 as low
    assert accuracy([5.0], [5.3]) == 1.0 and accuracy([4.999], [5.0]) == 0.0 and accuracy([4.999], [4.0]) == 1.0
    rng = np.random.default_rng(2)
    pred, gt = rng.uniform(3, 7, size=200), rng.uniform(3, 7, size=200)
    pred[:10] = 5.0
    gt[5:15] = 5.0
    assert accuracy(pred, gt) == pytest.approx(ref_accuracy(pred, gt))


def test_mean_emd_matches_loop_and_torch_loss():
    rng = np.random.default_rng(3)
    p, q = random_dists(rng, 30), random_dists(rng, 30)
    assert mean_emd(p, q) == pytest.approx(ref_emd(p, q), rel=1e-12)
    assert mean_emd(p, q) == pytest.approx(emd_loss(torch.as_tensor(p), torch.as_tensor(q)).item(), rel=1e-12)
    assert mean_emd(p, p) == 0.0


def test_evaluate_matches_references():
    rng = np.random.default_rng(4)
    pred, gt = random_dists(rng, 50), random_dists(rng, 50)
    ps, gs = ref_mean_score(pred), ref_mean_score(gt)
    result = evaluate(pred, gt)
    assert set(result) == {"n", "srcc", "plcc", "acc", "emd"} and result["n"] == 50
    assert result["srcc"] == pytest.approx(stats.spearmanr(ps, gs).statistic, abs=1e-12)
    assert result["plcc"] == pytest.approx(np.corrcoef(ps, gs)[0, 1], abs=1e-12)
    assert result["acc"] == pytest.approx(ref_accuracy(ps, gs))
    assert result["emd"] == pytest.approx(ref_emd(pred, gt), rel=1e-12)
    # ground truth as raw vote counts gives the same numbers
    votes = np.round(gt * 1000)
    votes[:, 0] += 1
    assert evaluate(pred, votes)["emd"] == pytest.approx(evaluate(pred, votes / votes.sum(1, keepdims=True))["emd"])
    json.dumps(result, allow_nan=False)


def test_evaluate_scores_and_binary():
    rng = np.random.default_rng(5)
    ps, gs = rng.uniform(2, 8, size=40), rng.uniform(2, 8, size=40)
    result = evaluate_scores(ps, gs)
    assert result == {"n": 40, "srcc": pytest.approx(stats.spearmanr(ps, gs).statistic),
                      "plcc": pytest.approx(np.corrcoef(ps, gs)[0, 1]), "acc": pytest.approx(ref_accuracy(ps, gs))}
    prob, label = np.array([0.9, 0.2, 0.5, 0.49, 0.7]), np.array([1, 0, 1, 1, 0])
    assert evaluate_binary(prob, label) == {"n": 5, "acc": pytest.approx(3 / 5)}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="non-finite"):
        srcc([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="differ in shape"):
        plcc([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2-d"):
        evaluate(np.ones(10), np.ones(10))


# ---- per category (Table IX) -----------------------------------------------------------------

TAGS = np.array([(3, 2), (3, 0), (0, 0), (2, 2), (1, 3), (0, 1), (4, 0)])
NAMES = ((1, "Still life"), (2, "Architecture"), (3, "Landscape"))


def test_per_category_counts_and_values_by_hand():
    rng = np.random.default_rng(6)
    pred, gt = random_dists(rng, 7), random_dists(rng, 7)
    rows = per_category(pred, gt, TAGS, NAMES)
    # tag 3: images 0, 1, 4; tag 2: images 0, 3 (same tag twice counts once); tag 1: 4, 5; tag 4: 6
    # largest first, ties by tag id
    assert [(r["tag"], r["name"], r["n"]) for r in rows] == [
        (3, "Landscape", 3), (1, "Still life", 2), (2, "Architecture", 2), (4, "tag 4", 1)]
    assert [r["portion"] for r in rows] == pytest.approx([3 / 7, 2 / 7, 2 / 7, 1 / 7])
    members = {3: [0, 1, 4], 2: [0, 3], 1: [4, 5], 4: [6]}
    for row in rows:
        idx = members[row["tag"]]
        ps, gs = ref_mean_score(pred[idx]), ref_mean_score(gt[idx])
        assert row["emd"] == pytest.approx(ref_emd(pred[idx], gt[idx]))
        assert row["acc"] == pytest.approx(ref_accuracy(ps, gs))
        if len(idx) >= 3:
            assert row["srcc"] == pytest.approx(stats.spearmanr(ps, gs).statistic)
            assert row["plcc"] == pytest.approx(np.corrcoef(ps, gs)[0, 1])
    assert rows[-1]["srcc"] is None and rows[-1]["plcc"] is None  # one image: undefined
    json.dumps(rows, allow_nan=False)


def test_per_category_min_count_mapping_names_and_errors():
    rng = np.random.default_rng(7)
    pred, gt = random_dists(rng, 7), random_dists(rng, 7)
    assert [r["tag"] for r in per_category(pred, gt, TAGS, dict(NAMES), min_count=2)] == [3, 1, 2]
    assert [r["tag"] for r in per_category(pred, gt, TAGS, NAMES, min_count=3)] == [3]
    assert per_category(pred, gt, np.zeros((7, 2), dtype=int), NAMES) == []
    with pytest.raises(ValueError, match="tags"):
        per_category(pred, gt, TAGS[:6], NAMES)
    with pytest.raises(ValueError, match="min_count"):
        per_category(pred, gt, TAGS, NAMES, min_count=0)
