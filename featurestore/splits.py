"""Train/test splits as specs: pure functions of the image ids (and the dataset's own split).

A split is a label, not a feature: it never enters a feature key, so trying another split
(the paper's Fig. 6 repeats KD vs baseline over 12 cross-validation splits and two fixed ones)
refits only the distiller and the students. Every derived assignment depends on an image's id
alone, never on which other images are present, so a dataset that grows keeps every old image
in its fold.

Text forms (``dataset.split`` in every job config):

* ``official``: the dataset's own split (AVA's lists, a CSV column, a hash split);
* ``file:PATH``: the ids listed in PATH are test, every other row is train;
* ``cv:K:FOLD[:SEED]``: K folds by hash of (seed, id); fold FOLD is test;
* ``random:FRACTION:SEED``: ids whose hash of (seed, id) falls below FRACTION are test.

A validation set is carved out of train the same way (:func:`validation_mask`), under a hash
of its own, so it is independent of every test split above and stays the same for every
student, seed and split that a train image belongs to.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UserError

FORMS = "official, file:PATH, cv:K:FOLD[:SEED] or random:FRACTION:SEED"
KINDS = ("official", "file", "cv", "random")


class SplitError(UserError, ValueError):
    """A split that cannot be applied; the message names the spec or the ids and what to do."""


@dataclass(frozen=True)
class SplitSpec:
    """One way to split a dataset; only the fields of its ``kind`` matter, the rest stay default.

    Validated on construction, so a bad spec fails when a config is read, before any work.
    """

    kind: str
    path: str = ""
    k: int = 0
    fold: int = 0
    seed: int = 0
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SplitError(f"split kind {self.kind!r} is unknown; the accepted forms are {FORMS}")
        if self.kind == "file" and not self.path:
            raise SplitError("split file: needs a path, e.g. file:generic_test.jpgl")
        if self.kind == "cv" and (self.k < 2 or not 0 <= self.fold < self.k):
            raise SplitError(f"split {self}: needs K ≥ 2 folds and FOLD in 0..K-1"
                             + (f" (0..{self.k - 1} for K={self.k})" if self.k >= 2 else ""))
        if self.kind == "random" and not 0 < self.fraction < 1:
            raise SplitError(f"split {self}: FRACTION must be strictly between 0 and 1")

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        kind, sep, rest = text.strip().partition(":")
        parts = rest.split(":")
        try:
            if kind == "official" and not sep:
                return cls("official")
            if kind == "file" and rest:
                return cls("file", path=rest)  # the path may hold colons: s3://bucket/list.txt
            if kind == "cv" and len(parts) in (2, 3):
                return cls("cv", k=int(parts[0]), fold=int(parts[1]), seed=int(parts[2]) if len(parts) == 3 else 0)
            if kind == "random" and len(parts) == 2:
                return cls("random", fraction=float(parts[0]), seed=int(parts[1]))
        except SplitError as exc:
            raise SplitError(f"{exc}; the accepted forms are {FORMS}") from None
        except ValueError:
            pass  # a number that does not parse: the message below
        raise SplitError(f"split {text.strip()!r} is malformed; the accepted forms are {FORMS}")

    def __str__(self) -> str:
        """The canonical text form: ``parse(str(spec)) == spec`` (repr keeps the fraction exact)."""
        if self.kind == "file":
            return f"file:{self.path}"
        if self.kind == "cv":
            return f"cv:{self.k}:{self.fold}:{self.seed}"
        if self.kind == "random":
            return f"random:{self.fraction!r}:{self.seed}"
        return "official"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VALIDATION_SALT = "validation"


def id_hash(seed: int | str, image_ids: Sequence[str]) -> np.ndarray:
    """A uniform 64-bit number per id: the first 8 bytes of SHA-256 of ``"<seed>:<id>"``.

    A cryptographic hash rather than Python's ``hash`` so that folds are the same in every
    process and release, and uniform enough that folds come out balanced without looking at
    the other ids.
    """
    prefix, sha256 = f"{seed}:".encode(), hashlib.sha256
    digests = b"".join([sha256(prefix + i.encode()).digest()[:8] for i in image_ids])  # ~2× faster than int()s
    return np.frombuffer(digests, ">u8").astype(np.uint64)


def below(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """Which of :func:`id_hash`'s numbers fall in the lowest ``fraction`` of their range."""
    return hashes < np.uint64(int(fraction * 2**64))


def validation_mask(image_ids: Sequence[str], fraction: float) -> np.ndarray:
    """Which ids a validation set of ``fraction`` of them holds: those whose hash of
    ``"validation:<id>"`` falls below ``fraction``. A pure function of each id alone, salted apart
    from the ``cv``/``random`` hashes (their seeds are integers), so carving validation out of a
    split's train images never correlates with which images that split tests on."""
    if not 0 <= fraction < 1:
        raise SplitError(f"validation fraction must be in [0, 1), got {fraction!r}")
    return below(id_hash(VALIDATION_SALT, image_ids), fraction)


def _read_local(path: str) -> str:
    return Path(path).read_text(encoding="utf-8-sig")


def _listed_test_ids(spec: SplitSpec, image_ids: Sequence[str], read_text: Callable[[str], str]) -> np.ndarray:
    try:
        listed = set(read_text(spec.path).split())
    except FileNotFoundError:  # also featurestore.sources' MissingSourceError, for s3:// lists
        raise SplitError(f"split file {spec.path} does not exist; give the path of a list of test image ids") from None
    if not listed:
        raise SplitError(f"split file {spec.path} lists no image ids; list the test ids, whitespace-separated")
    if unknown := sorted(listed.difference(image_ids)):
        raise SplitError(f"split file {spec.path}: {len(unknown)} id(s) are not in the dataset, e.g. "
                         f"{unknown[:5]}; fix the list or index the dataset it belongs to")
    return np.fromiter((i in listed for i in image_ids), bool, count=len(image_ids))


def assign_splits(spec: SplitSpec, image_ids: Sequence[str], official: Sequence[str],
                  read_text: Callable[[str], str] | None = None) -> np.ndarray:
    """The split of each row, in row order, as an object array of str.

    ``"train"`` or ``"test"`` for derived splits; ``official`` is returned as given (it may hold
    ``"val"`` or ``""`` for excluded rows). ``read_text`` reads a ``file:`` list; the default
    reads a local file, a caller passes one that also reads ``s3://``.
    """
    if spec.kind == "official":
        return np.asarray(official, object)
    if spec.kind == "file":
        test = _listed_test_ids(spec, image_ids, read_text or _read_local)
    elif spec.kind == "cv":
        test = id_hash(spec.seed, image_ids) % np.uint64(spec.k) == np.uint64(spec.fold)
    else:
        test = below(id_hash(spec.seed, image_ids), spec.fraction)
    splits = np.full(len(test), "train", object)
    splits[test] = "test"
    return splits
