"""What a label is, for the distiller, the student and evaluation alike.

A label *kind* says what a model predicts for an image and what it is scored against:

==============  ============  ==========================================  =====================
kind            output width  target (from a dataset's votes or scores)   metrics
==============  ============  ==========================================  =====================
distribution    ``NUM_BINS``  the normalised vote distribution            SRCC, PLCC, Acc, EMD
binary          1             1.0 if the mean score ≥ 5 else 0.0 (eq. 12)  Acc
score           1             the mean score (eq. 13)                     SRCC, PLCC, Acc
==============  ============  ==========================================  =====================

Each student loss of :mod:`trainers.losses` fits exactly one kind (``LOSSES``): EMD needs a
distribution, BCE a probability of "high", MSE a score. :func:`check_loss` says so before a run
is launched rather than as a shape error on a GPU worker.

**Semantic tags (Table XII).** A dataset may give each image up to two semantic tag ids (AVA's
``tags.txt`` ids; ``DatasetTable.tags`` [N, 2], 0 = none). A multi-modal student takes them as
input and the ``multitask`` loss predicts them, both as a *two-hot vector*: entry ``i − 1`` is 1
when the image has tag id ``i`` (:func:`two_hot`). Its width (:func:`tag_width`) is the largest
tag id the dataset defines: the largest id of ``tag_names`` (AVA's ``tags.txt`` names 66 tags), or of the tag columns
when they are larger or there are no names (a CSV). It is a property of the whole dataset, not
of a split, so the model's shape does not depend on which tags a split happens to contain; the
student records it (``StudentSpec.tag_width``) and scoring another dataset encodes that
dataset's tags in the same width (:func:`two_hot` refuses an id beyond it). A student or loss
that needs tags on a dataset without them is a :class:`LabelError` (:func:`check_tags`) before
any worker starts.

**Labelled rows.** :func:`labelled_rows` is the one definition of the rows of a split that have
a label, so the teacher and every student are fitted and scored on the same images. A row is
labelled when it has at least one vote (a dataset with vote counts) or a finite mean score (a
dataset with mean scores only); the vote counts decide whenever the dataset has them. Other
filters stay with their owners and are applied on top: the distiller keeps the labelled rows
with features, the student those with knowledge, evaluation those whose image it could read.
An unlabelled row's target is NaN (:func:`targets_for`), never a number that could be taken
for a label.

**Why NUM_BINS lives in featurestore.** The dataset readers and the manifest checks of
``featurestore`` need the number of rating bins to parse and validate vote counts, and the store
library must not import ``trainers`` (it runs without torch). So its one definition is
``featurestore.specs.NUM_BINS``, re-used here.

This module imports no torch either, so a job can validate its config before any worker
starts; :func:`prediction` works on torch tensors through their own methods.
"""

from __future__ import annotations

import numpy as np

from featurestore.dataset_table import DatasetTable
from featurestore.errors import UserError
from featurestore.specs import NUM_BINS
from trainers.metrics import HIGH_THRESHOLD, evaluate, evaluate_binary, evaluate_scores, mean_score

LABELS = ("distribution", "binary", "score")

#: The student losses (``trainers.losses.KINDS``) that fit each label kind.
LOSSES = {
    "distribution": ("baseline", "kd", "kd_feature_only", "kd_output_only", "mixed_loss", "mixed_label", "multitask"),
    "binary": ("bce", "bce_baseline"),
    "score": ("mse", "mse_baseline"),
}

#: The student losses that also predict the two-hot tag vector (eq. 9), so need a tag head and tags.
TAG_LOSSES = ("multitask",)
#: Values of the student's ``semantic`` option (``StudentSpec.semantic``); None: images only.
SEMANTIC = ("multimodal",)

#: What :func:`labelled_rows` can select: a split of the dataset, or every row.
ROW_SPLITS = ("train", "val", "test", "all")


class LabelError(UserError, ValueError):
    """A label kind, loss or split that the dataset's labels cannot serve; the message says which."""


def check_label(label: str) -> str:
    if label not in LABELS:
        raise LabelError(f"label {label!r} is not one of {', '.join(LABELS)}")
    return label


def output_width(label: str) -> int:
    """Width of the model head for ``label``: one logit per bin, or a single value."""
    return NUM_BINS if check_label(label) == "distribution" else 1


def check_loss(label: str, loss_kind: str) -> None:
    """Raise :class:`LabelError` unless student loss ``loss_kind`` fits label kind ``label``."""
    allowed = LOSSES[check_label(label)]
    if loss_kind not in allowed:
        fits = next((f" (it trains a {other!r} label)" for other, kinds in LOSSES.items() if loss_kind in kinds),
                    " (no such loss)")
        raise LabelError(f"loss {loss_kind!r} does not fit label {label!r}{fits}; with label {label!r} use one of "
                         f"{', '.join(allowed)}")


# -- semantic tags (Table XII) ------------------------------------------------------------------------


def needs_tags(semantic: str | None, loss_kind: str) -> bool:
    """Whether a student with option ``semantic`` trained with ``loss_kind`` reads the tags."""
    return semantic is not None or loss_kind in TAG_LOSSES


def tag_width(table: DatasetTable) -> int:
    """Width of ``table``'s two-hot tag vector: the largest tag id it defines (module docstring)."""
    named = max((int(i) for i, _ in table.tag_names), default=0)
    used = int(np.asarray(table.tags).max(initial=0)) if table.tags is not None else 0
    return max(named, used)


def check_tags(table: DatasetTable, semantic: str | None, loss_kind: str) -> int:
    """The two-hot width a student with option ``semantic`` and loss ``loss_kind`` needs from
    ``table`` (0: it uses no tags); a :class:`LabelError` naming the dataset when it has none."""
    if semantic is not None and semantic not in SEMANTIC:
        raise LabelError(f"student.semantic {semantic!r} is not one of {', '.join(SEMANTIC)} (or unset)")
    if not needs_tags(semantic, loss_kind):
        return 0
    if table.tags is None or (width := tag_width(table)) < 1:
        who = " and ".join(([f"student.semantic={semantic}"] if semantic else [])
                           + ([f"loss {loss_kind!r}"] if loss_kind in TAG_LOSSES else []))
        raise LabelError(f"dataset {table.name!r} has no semantic tags, which {who} needs; use a dataset with "
                         "tags (AVA's tag ids and tags.txt, or CSV columns tag1, tag2), or drop student.semantic "
                         "and use another loss")
    return width


def two_hot(tags: np.ndarray, width: int) -> np.ndarray:
    """float32 [N, width] two-hot vectors of tag ids [N, 2] (0 = none; id i sets entry i − 1).

    An image with one tag gets a one-hot vector, one with none a zero vector. An id beyond
    ``width`` (a dataset with more tags than the student was trained on) is a :class:`LabelError`."""
    tags = np.asarray(tags, np.int64)
    if tags.ndim != 2:
        raise LabelError(f"tag ids must be [N, 2], got shape {tags.shape}")
    if tags.size and (tags.min() < 0 or tags.max() > width):
        raise LabelError(f"tag id {int(tags.max()) if tags.max() > width else int(tags.min())} is outside "
                         f"1..{width}, the tag ids the student was trained with (0 = no tag)")
    out = np.zeros((len(tags), width + 1), np.float32)
    np.put_along_axis(out, tags, 1.0, axis=1)
    return out[:, 1:]


def scoring_tags(dataset: str, tags, width: int) -> np.ndarray:
    """Two-hot vectors [N, width] of a dataset's tag ids [N, 2] for scoring a multi-modal student
    (trained with ``width``); a :class:`LabelError` naming ``dataset`` when it has no tags."""
    if tags is None:
        raise LabelError(f"dataset {dataset!r} has no semantic tags, which a multimodal student reads with each "
                         "image; score it on images with tags (an AVA dataset, or a CSV with columns tag1, tag2)")
    try:
        return two_hot(np.asarray(tags, np.int64).reshape(-1, 2), width)
    except LabelError as exc:
        raise LabelError(f"dataset {dataset!r}: {exc}") from None


# -- labelled rows ----------------------------------------------------------------------------------


def labelled(table: DatasetTable) -> np.ndarray:
    """Which rows of ``table`` have a label: ≥ 1 vote, or (without vote counts) a finite mean score."""
    if table.votes is not None:
        return np.asarray(table.votes).sum(1) > 0
    if table.mean_scores is not None:
        return np.isfinite(np.asarray(table.mean_scores, np.float64))
    raise LabelError(f"dataset {table.name!r} has no labels (neither vote counts nor mean scores): fitting and "
                     "evaluation need them; ray_jobs.predict scores unlabelled images")


def labelled_rows(table: DatasetTable, split: str, required: bool = True) -> np.ndarray:
    """Indices (ascending) of the rows of ``split`` that have a label; ``split="all"``: every row.

    A :class:`LabelError` when the table has no labels, or, if ``required``, when ``split`` has no
    labelled row (with ``required=False`` that gives an empty array: a split that may be absent,
    such as the distiller's test split).
    """
    if split not in ROW_SPLITS:
        raise LabelError(f"split {split!r} is not one of {', '.join(ROW_SPLITS)}")
    has_label = labelled(table)
    splits = np.asarray(table.splits, str)
    in_split = np.ones(len(table), bool) if split == "all" else splits == split
    rows = np.flatnonzero(in_split & has_label)
    if required and not len(rows):
        counts = {str(s) or "(none)": int((splits == s).sum()) for s in np.unique(splits)}
        found = f"none of its {int(in_split.sum())} images there has a label" if in_split.any() else "it has none"
        raise LabelError(f"dataset {table.name!r} has no labelled {split!r} images ({found}; rows per split: "
                         f"{counts}); check dataset.split (or dataset.test_fraction), or use split=all")
    return rows


# -- targets and predictions ------------------------------------------------------------------------


def _vote_means(votes: np.ndarray) -> np.ndarray:
    """Mean score of each row of vote counts; NaN for a row without votes."""
    votes = np.asarray(votes)
    voted = votes.sum(1) > 0
    means = np.full(len(votes), np.nan)
    means[voted] = mean_score(votes[voted])
    return means


def targets_for(label: str, votes: np.ndarray | None, scores: np.ndarray | None) -> np.ndarray:
    """float32 targets in ``label``'s form from vote counts [N, NUM_BINS] or mean scores [N].

    Vote counts take precedence when given. A row without a label gets NaN (a NaN row for a
    distribution); select rows with :func:`labelled_rows` first.
    """
    if check_label(label) == "distribution":
        if votes is None:
            raise LabelError("label=distribution needs vote counts in the dataset (it has mean scores at most); "
                             "use label=score or label=binary")
        votes = np.asarray(votes).astype(np.float32)
        total = votes.sum(1, keepdims=True)
        return votes / np.where(total > 0, total, np.nan)
    if votes is not None:
        score = _vote_means(votes)
    elif scores is not None:
        score = np.asarray(scores, np.float64)
    else:
        raise LabelError(f"label={label} needs vote counts or mean scores in the dataset")
    score = score.astype(np.float32)
    if label == "score":
        return score
    return np.where(np.isnan(score), np.nan, score >= HIGH_THRESHOLD).astype(np.float32)


def table_targets(label: str, table: DatasetTable) -> np.ndarray:
    """:func:`targets_for` every row of ``table``; the error names the dataset."""
    try:
        return targets_for(label, table.votes, table.mean_scores)
    except LabelError as exc:
        raise LabelError(f"dataset {table.name!r}: {exc}") from None


def prediction(label: str, logits):
    """The head's logits [B, width] (a torch tensor) → the prediction in ``label``'s form:
    softmax over the bins (D, eq. 6), the sigmoid probability of "high" (eq. 12), or the score
    itself (eq. 13). The same rule for the teacher and the student."""
    if check_label(label) == "distribution":
        return logits.softmax(dim=1)
    return logits[:, 0].sigmoid() if label == "binary" else logits[:, 0]


def scores_of(label: str, values: np.ndarray) -> np.ndarray:
    """One number per image, the one SRCC and PLCC compare: the mean score Σ k·p_k of a
    distribution, a score as it is, a binary label's probability of "high" (or its 0/1 target)."""
    if check_label(label) == "distribution":
        return mean_score(values)
    return np.asarray(values, np.float64)


def evaluate_label(label: str, pred: np.ndarray, target: np.ndarray) -> dict:
    """Test metrics in the paper's terms for ``label``'s predictions (``trainers.metrics``).

    ``target`` is :func:`targets_for`'s form; for a distribution it may also be mean scores [N]
    (a dataset without votes): SRCC/PLCC/Acc of the predicted mean score, and ``emd`` None.
    """
    if check_label(label) == "binary":
        return evaluate_binary(pred, target)
    if label == "score":
        return evaluate_scores(pred, target)
    if np.ndim(target) == 1:
        return {**evaluate_scores(mean_score(pred), target), "emd": None}
    return evaluate(pred, target)
