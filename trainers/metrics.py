"""Evaluation metrics of the paper (§IV-A, Table IX, Table XV); NumPy only.

* SRCC and PLCC are computed on mean scores: "we convert the aesthetic rating distributions into
  aesthetic scores by weighted average", i.e. Σ_k k·p_k over the bins k = 1..10.
* Acc: "we take five as the cut-off threshold for converting aesthetic scores into binary
  aesthetic categories". An image is *high* when its mean score is ≥ 5 and *low* when < 5, for
  predictions and ground truth alike: the AVA convention of [29] (Murray et al., CVPR 2012) and
  RAPID [5] with δ = 0 (low below 5 − δ, high at or above 5 + δ). Ground-truth means of exactly
  5.0 do occur (vote counts are integers), so the side matters; ``HIGH_THRESHOLD`` names it.
* EMD: eq. 3 with r = 2 per image, averaged over images (same value as ``losses.emd_loss``).

Undefined values are ``None``, never NaN, so a metrics dict is valid JSON as it stands: SRCC and
PLCC of fewer than two images or of a constant input (zero variance, e.g. a collapsed model that
predicts the same score for every image). Non-finite inputs raise ``ValueError``.

Padding rows of the partition plan are dropped by the caller (``pred[~pad]``) before calling
these functions: each image must be counted once.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

HIGH_THRESHOLD = 5.0


def _array(x, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} non-finite values (NaN or inf); "
                         "a diverged model or a corrupt row")
    return a


def _pair(pred, gt, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    p, g = _array(pred, "predictions", ndim), _array(gt, "ground truth", ndim)
    if p.shape != g.shape:
        raise ValueError(f"predictions {p.shape} and ground truth {g.shape} differ in shape")
    return p, g


def mean_score(dist) -> np.ndarray:
    """Weighted average Σ_k k·p_k / Σ_k p_k over bins k = 1..n of each row of ``dist`` [N, n].

    Dividing by the row sum makes raw vote counts (AVA.txt) give the same score as their
    normalised distribution.
    """
    d = _array(dist, "distribution", 2)
    totals = d.sum(axis=1)
    if (totals <= 0).any():
        raise ValueError(f"distribution: {int((totals <= 0).sum())} rows with no mass (sum ≤ 0)")
    return d @ np.arange(1, d.shape[1] + 1) / totals


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (as Spearman needs)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], len(x)]
    group_rank = (starts + ends + 1) / 2  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = group_rank[np.cumsum(starts_group) - 1]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx @ dx) * (dy @ dy))
    if denom == 0:
        return None
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def plcc(pred_score, gt_score) -> float | None:
    """Pearson linear correlation of predicted vs ground-truth mean scores; None if undefined."""
    return _pearson(*_pair(pred_score, gt_score, 1))


def srcc(pred_score, gt_score) -> float | None:
    """Spearman rank correlation (Pearson on tie-averaged ranks); None if undefined."""
    p, g = _pair(pred_score, gt_score, 1)
    return _pearson(_ranks(p), _ranks(g))


def accuracy(pred_score, gt_score, threshold: float = HIGH_THRESHOLD) -> float | None:
    """Share of images put on the same side of ``threshold`` (high: score ≥ threshold)."""
    p, g = _pair(pred_score, gt_score, 1)
    if len(p) == 0:
        return None
    return float(((p >= threshold) == (g >= threshold)).mean())


def mean_emd(pred_dist, gt_dist, r: float = 2) -> float | None:
    """Eq. 3 per image, (1/n · Σ_k |CDF_pred(k) − CDF_gt(k)|^r)^(1/r), averaged over images."""
    p, g = _pair(pred_dist, gt_dist, 2)
    if len(p) == 0:
        return None
    per_image = (np.abs(np.cumsum(p - g, axis=1)) ** r).mean(axis=1) ** (1.0 / r)
    return float(per_image.mean())


def evaluate_scores(pred_score, gt_score) -> dict:
    """``{"n", "srcc", "plcc", "acc"}`` for score predictions (Table XV "Regression")."""
    p, g = _pair(pred_score, gt_score, 1)
    return {"n": len(p), "srcc": srcc(p, g), "plcc": plcc(p, g), "acc": accuracy(p, g)}


def evaluate(pred_dist, gt_dist) -> dict:
    """``{"n", "srcc", "plcc", "acc", "emd"}`` for rating distributions [N, 10] (Tables III–XIV).

    Rows are normalised to sum to 1 first, so raw vote counts serve as ground truth.
    """
    p, g = _pair(pred_dist, gt_dist, 2)
    p_score, g_score = mean_score(p), mean_score(g)  # also rejects rows without mass
    return {**evaluate_scores(p_score, g_score),
            "emd": mean_emd(p / p.sum(axis=1, keepdims=True), g / g.sum(axis=1, keepdims=True))}


def evaluate_binary(pred_prob, gt_label) -> dict:
    """``{"n", "acc"}`` for binary labels (Table XV "Classification"): high iff prob ≥ ½."""
    p, g = _pair(pred_prob, gt_label, 1)
    return {"n": len(p), "acc": accuracy(p, g, threshold=0.5)}


def per_category(pred_dist, gt_dist, tags, tag_names: Mapping[int, str] | Iterable[tuple[int, str]],
                 min_count: int = 1) -> list[dict]:
    """Table IX: ``evaluate`` on the images of each AVA semantic tag.

    ``tags`` [N, 2] holds each image's two tag ids (0 = none). An image with two different tags
    counts in both categories; one with the same tag twice counts once. Rows are
    ``{"tag", "name", "n", "portion", "srcc", "plcc", "acc", "emd"}`` for every tag with at least
    ``min_count`` images, largest first (ties by tag id); ``portion`` = n / N, the share of the
    evaluated set (the paper reports the top 8 by portion). A tag missing from ``tag_names`` is
    named ``"tag <id>"``.
    """
    p, g = _pair(pred_dist, gt_dist, 2)
    t = np.asarray(tags)
    if t.shape != (len(p), 2) or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"tags: expected integer ids of shape ({len(p)}, 2), got {t.dtype} {t.shape}")
    if min_count < 1:
        raise ValueError(f"min_count must be ≥ 1, got {min_count}")
    names = dict(tag_names)
    rows = []
    for tag in np.unique(t[t != 0]):
        members = (t == tag).any(axis=1)
        n = int(members.sum())
        if n >= min_count:  # evaluate() adds "n"
            rows.append({"tag": int(tag), "name": names.get(int(tag), f"tag {int(tag)}"), "portion": n / len(p),
                         **evaluate(p[members], g[members])})
    return sorted(rows, key=lambda row: (-row["n"], row["tag"]))
