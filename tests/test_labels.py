"""Label kinds: which rows are labelled, targets, losses that fit each kind, metrics per kind."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore import specs
from featurestore.dataset_table import DatasetTable, hashes_from_hex
from featurestore.errors import UserError
from trainers.labels import (LABELS, LOSSES, NUM_BINS, LabelError, check_loss, check_tags, scoring_tags, tag_width,
                             two_hot, evaluate_label, labelled_rows,
                             output_width, prediction, scores_of, table_targets, targets_for)
from trainers.losses import KINDS
from trainers.metrics import evaluate, evaluate_scores

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "test", "train", "val", "", "test", "train", "test", "train", "test")
#: Rows 1 (test), 4 ("") and 8 (train) have no votes; row 6 (train) has one.
VOTES = [[0, 0, 1, 3, 5, 8, 5, 2, 1, 0], [0] * 10, [1] * 10, [0, 0, 0, 0, 4, 0, 0, 0, 0, 0], [0] * 10,
         [9, 1, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1], [2, 2, 2, 2, 2, 2, 2, 2, 2, 3], [0] * 10,
         [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]]


def table(votes=VOTES, mean_scores=None, splits=SPLITS, name="hand") -> DatasetTable:
    n = len(splits)
    return DatasetTable(name=name, image_ids=np.array([str(i) for i in range(n)], object),
                        uris=np.array([f"/d/{i}.jpg" for i in range(n)], object),
                        sha256=hashes_from_hex([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]),
                        splits=np.array(splits, object),
                        votes=None if votes is None else np.array(votes, np.int64),
                        mean_scores=None if mean_scores is None else np.array(mean_scores, np.float64))


# ---- labelled rows --------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test", "val", "all"])
def test_labelled_rows_are_the_rows_of_the_split_with_a_vote(split):
    expected = [i for i in range(len(SPLITS)) if (split == "all" or SPLITS[i] == split) and sum(VOTES[i]) >= 1]
    assert labelled_rows(table(), split).tolist() == expected
    assert {"train": [0, 2, 6], "test": [5, 7, 9], "val": [3], "all": [0, 2, 3, 5, 6, 7, 9]}[split] == expected


def test_vote_counts_decide_over_mean_scores_and_a_nan_score_is_no_label():
    scores_only = table(votes=None, mean_scores=[5.0, np.nan, 3.2, 7.0, 1.0, np.nan, 6.0, 4.0, 2.0, 9.0])
    assert labelled_rows(scores_only, "train").tolist() == [0, 2, 6, 8]
    assert labelled_rows(scores_only, "test").tolist() == [7, 9]
    both = table(mean_scores=[5.0] * 10)  # row 1 has a mean score but no votes: the votes decide
    assert labelled_rows(both, "all").tolist() == labelled_rows(table(), "all").tolist()


def test_no_labels_and_empty_splits_are_clear_errors():
    with pytest.raises(LabelError, match="'bare' has no labels") as err:
        labelled_rows(table(votes=None, name="bare"), "test")
    assert isinstance(err.value, UserError)
    only_train = table(splits=("train",) * 10)
    with pytest.raises(LabelError, match=r"no labelled 'test' images \(it has none; rows per split: \{'train': 10"):
        labelled_rows(only_train, "test")
    assert labelled_rows(only_train, "test", required=False).tolist() == []
    unvoted = table(votes=[VOTES[0]] + [[0] * 10] * 9)
    with pytest.raises(LabelError, match="no labelled 'test' images \\(none of its 4 images there has a label"):
        labelled_rows(unvoted, "test")
    with pytest.raises(LabelError, match="'valid' is not one of train, val, test, all"):
        labelled_rows(table(), "valid")


# ---- targets --------------------------------------------------------------------------------


def test_targets_follow_the_votes_and_unlabelled_rows_are_nan():
    t = table()
    dist, binary, score = (table_targets(label, t) for label in ("distribution", "binary", "score"))
    for i, v in enumerate(VOTES):
        total = sum(v)
        if total == 0:
            assert np.isnan(dist[i]).all() and np.isnan(score[i]) and np.isnan(binary[i])
            continue
        mean = sum(k * c for k, c in zip(range(1, 11), v)) / total
        np.testing.assert_allclose(dist[i], np.array(v) / total, rtol=1e-6)
        assert score[i] == pytest.approx(mean, rel=1e-6)
        assert binary[i] == (1.0 if mean >= 5 else 0.0)
    assert score[3] == 5.0 and binary[3] == 1.0  # a mean of exactly 5 is "high"
    assert dist.dtype == score.dtype == binary.dtype == np.float32 and dist.shape == (10, NUM_BINS)


def test_targets_of_labelled_rows_are_bitwise_what_they_were():
    """The knowledge key hashes the targets: for labelled rows they must not move by one bit."""
    votes = np.array([v for v in VOTES if sum(v)], np.int64)
    old_dist = votes.astype(np.float32) / np.maximum(votes.astype(np.float32).sum(1, keepdims=True), 1e-12)
    old_score = np.asarray(votes @ np.arange(1, 11) / votes.sum(1), np.float32)
    assert targets_for("distribution", votes, None).tobytes() == old_dist.tobytes()
    assert targets_for("score", votes, None).tobytes() == old_score.tobytes()
    assert targets_for("binary", votes, None).tobytes() == (old_score >= 5).astype(np.float32).tobytes()
    scores = np.array([1.5, 5.0, 9.25])
    assert targets_for("score", None, scores).tobytes() == scores.astype(np.float32).tobytes()


def test_targets_need_the_labels_they_are_made_of():
    with pytest.raises(LabelError, match="dataset 'scores': label=distribution needs vote counts"):
        table_targets("distribution", table(votes=None, mean_scores=[5.0] * 10, name="scores"))
    with pytest.raises(LabelError, match="label=score needs vote counts or mean scores"):
        targets_for("score", None, None)
    with pytest.raises(LabelError, match="'ranking' is not one of distribution, binary, score"):
        targets_for("ranking", np.ones((1, 10)), None)


# ---- losses per label -----------------------------------------------------------------------


#: Written out from the paper: EMD kinds (eq. 2–3, 7, 9, 10, 11, Tables VI, XII) need a
#: distribution, BCE (eq. 12) a binary label, MSE (eq. 13) a score.
FITS = {("distribution", k) for k in ("baseline", "kd", "kd_feature_only", "kd_output_only", "mixed_loss",
                                      "mixed_label", "multitask")} | {("binary", "bce"), ("binary", "bce_baseline"),
                                                         ("score", "mse"), ("score", "mse_baseline")}


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("kind", KINDS)
def test_check_loss_accepts_exactly_the_losses_that_fit(label, kind):
    if (label, kind) in FITS:
        check_loss(label, kind)
        return
    with pytest.raises(LabelError) as err:
        check_loss(label, kind)
    message = str(err.value)
    assert repr(kind) in message and repr(label) in message
    assert all(allowed in message for allowed in LOSSES[label])
    assert isinstance(err.value, UserError)


def test_every_loss_fits_one_label_and_unknown_names_are_named():
    assert sorted(KINDS) == sorted(kind for _, kind in FITS) and len(set(KINDS)) == len(KINDS)
    with pytest.raises(LabelError, match="'huber' does not fit label 'score' \\(no such loss\\)"):
        check_loss("score", "huber")
    with pytest.raises(LabelError, match="'bce' does not fit label 'distribution' \\(it trains a 'binary' label\\)"):
        check_loss("distribution", "bce")
    with pytest.raises(LabelError, match="'ranking'"):
        check_loss("ranking", "kd")


# ---- widths, predictions, metrics -----------------------------------------------------------


def test_widths_and_the_one_home_of_num_bins():
    assert NUM_BINS is specs.NUM_BINS == 10
    assert [output_width(label) for label in LABELS] == [10, 1, 1]


def test_prediction_per_label_on_torch_logits():
    logits = torch.tensor([[2.0, -1.0] + [0.0] * 8, [-3.0, 4.0] + [1.0] * 8])
    dist = prediction("distribution", logits)
    torch.testing.assert_close(dist, torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    torch.testing.assert_close(prediction("binary", logits), 1 / (1 + torch.exp(-logits[:, 0])))
    assert torch.equal(prediction("score", logits), logits[:, 0])


def test_scores_of_each_kind():
    dist = np.array([[0.5, 0.5] + [0.0] * 8, [0.0] * 9 + [1.0]])
    assert scores_of("distribution", dist).tolist() == [1.5, 10.0]
    assert scores_of("score", np.float32([3.5, 6.0])).tolist() == [3.5, 6.0]
    assert scores_of("binary", np.float32([0.25, 1.0])).tolist() == [0.25, 1.0]


def test_evaluate_label_per_kind():
    rng = np.random.default_rng(0)
    pred, gt = rng.dirichlet(np.ones(10), 20), rng.dirichlet(np.ones(10), 20)
    assert evaluate_label("distribution", pred, gt) == evaluate(pred, gt)
    gt_mean = scores_of("distribution", gt)  # a dataset with mean scores only
    assert evaluate_label("distribution", pred, gt_mean) == {**evaluate_scores(scores_of("distribution", pred),
                                                                               gt_mean), "emd": None}
    assert evaluate_label("score", gt_mean + 0.5, gt_mean) == evaluate_scores(gt_mean + 0.5, gt_mean)
    assert evaluate_label("binary", np.array([0.9, 0.1, 0.6]), np.array([1.0, 0.0, 0.0])) == {"n": 3, "acc": 2 / 3}


# ---- semantic tags (Table XII) --------------------------------------------------------------


def tagged(tags, names=((1, "Abstract"), (2, "Animals"), (3, "Architecture"), (4, "Urban"))) -> DatasetTable:
    base = table(splits=SPLITS[:len(tags)], votes=VOTES[:len(tags)])
    return DatasetTable(**{**base.__dict__, "tags": np.array(tags, np.int64), "tag_names": tuple(names)})


def test_two_hot_sets_the_entry_of_each_tag_id_and_none_for_zero():
    got = two_hot(np.array([[1, 4], [3, 0], [0, 0], [2, 2]]), 4)
    np.testing.assert_array_equal(got, [[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert got.dtype == np.float32
    with pytest.raises(LabelError, match="tag id 5 is outside 1..4"):
        two_hot(np.array([[5, 1]]), 4)
    with pytest.raises(LabelError, match="tag id -1"):
        two_hot(np.array([[-1, 1]]), 4)


def test_tag_width_is_the_datasets_not_a_splits():
    # the rows use only tags 1 and 2, tags.txt names 4: the width is 4 whatever a split contains
    assert tag_width(tagged([[1, 2], [2, 0], [1, 0]])) == 4
    assert tag_width(tagged([[1, 2], [7, 0]])) == 7  # an id beyond the names (a CSV) widens it
    assert tag_width(tagged([[1, 2], [3, 0]], names=())) == 3  # no names: the largest id used
    assert check_tags(tagged([[1, 2]]), "multimodal", "baseline") == 4
    assert check_tags(tagged([[1, 2]]), None, "multitask") == 4
    assert check_tags(table(), None, "kd") == 0  # uses no tags: none needed


def test_tags_needed_but_missing_are_one_clear_error_naming_the_dataset_and_the_keys():
    with pytest.raises(LabelError, match=r"dataset 'hand' has no semantic tags, which student.semantic=multimodal "
                                         r"and loss 'multitask' needs; use a dataset with tags"):
        check_tags(table(), "multimodal", "multitask")
    with pytest.raises(LabelError, match=r"which loss 'multitask' needs"):
        check_tags(tagged([[0, 0]], names=()), None, "multitask")  # tag columns, but no tag at all
    with pytest.raises(LabelError, match=r"student.semantic 'text' is not one of multimodal"):
        check_tags(tagged([[1, 0]]), "text", "baseline")
    with pytest.raises(LabelError, match=r"'multitask' does not fit label 'binary' \(it trains a 'distribution'"):
        check_loss("binary", "multitask")
    with pytest.raises(LabelError, match=r"dataset 'photos' has no semantic tags, which a multimodal student reads"):
        scoring_tags("photos", None, 4)
    with pytest.raises(LabelError, match=r"dataset 'photos': tag id 9 is outside 1..4"):
        scoring_tags("photos", [(1, 9)], 4)
    np.testing.assert_array_equal(scoring_tags("photos", [(1, 3)], 4), [[1, 0, 1, 0]])


def test_labels_import_no_torch():
    code = "import sys, trainers.labels; assert 'torch' not in sys.modules, 'torch was imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
