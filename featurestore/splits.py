"""Train/test splits as specs: pure functions of the image ids (and the dataset's own split).

A split is a label, not a feature: it never enters a feature key, so trying another split
(the paper's Fig. 6 repeats KD vs baseline over 12 cross-validation splits and two fixed ones)
refits only the distiller and the students. Every assignment depends on an image's id alone,
never on which other images are present, so a dataset that grows keeps every old image in its
fold.

Text forms (``dataset.split`` in every job config):

* ``official``: the dataset's own split (AVA's lists, a CSV column, a hash split);
* ``file:PATH``: the ids listed in PATH are test, every other row is train;
* ``cv:K:FOLD[:SEED]``: K folds by hash of (seed, id); fold FOLD is test;
* ``random:FRACTION:SEED``: ids whose hash of (seed, id) falls below FRACTION are test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FORMS = "official, file:PATH, cv:K:FOLD[:SEED] or random:FRACTION:SEED"


class SplitError(ValueError):
    """A split that cannot be applied; the message names the spec or the ids and what to do."""


@dataclass(frozen=True)
class SplitSpec:
    kind: str
    path: str = ""
    k: int = 0
    fold: int = 0
    seed: int = 0
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("official", "file", "cv", "random"):
            raise SplitError(f"unknown split kind {self.kind!r}; use {FORMS}")
        if self.kind == "file" and not self.path:
            raise SplitError("split file: needs a path, e.g. file:generic_test.jpgl")
        if self.kind == "cv" and (self.k < 2 or not 0 <= self.fold < self.k):
            raise SplitError(f"split cv:{self.k}:{self.fold}: needs K ≥ 2 folds and 0 ≤ FOLD < K "
                             f"(FOLD in 0..{max(self.k, 2) - 1})")
        if self.kind == "random" and not 0 < self.fraction < 1:
            raise SplitError(f"split random:{self.fraction}:{self.seed}: FRACTION must be between 0 and 1")

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        kind, _, rest = text.strip().partition(":")
        parts = rest.split(":") if rest else []
        try:
            if kind == "official" and not parts:
                return cls("official")
            if kind == "file" and rest:
                return cls("file", path=rest)
            if kind == "cv" and len(parts) in (2, 3):
                return cls("cv", k=int(parts[0]), fold=int(parts[1]), seed=int(parts[2]) if len(parts) == 3 else 0)
            if kind == "random" and len(parts) == 2:
                return cls("random", fraction=float(parts[0]), seed=int(parts[1]))
        except SplitError:
            raise
        except ValueError:
            pass  # a number that does not parse: the message below
        raise SplitError(f"split {text!r} is not one of {FORMS}")

    def __str__(self) -> str:
        if self.kind == "file":
            return f"file:{self.path}"
        if self.kind == "cv":
            return f"cv:{self.k}:{self.fold}:{self.seed}"
        if self.kind == "random":
            return f"random:{self.fraction:g}:{self.seed}"
        return "official"

    def to_json(self) -> dict:
        return {"kind": self.kind, "path": self.path, "k": self.k, "fold": self.fold, "seed": self.seed,
                "fraction": self.fraction}


def id_hash(seed: int, image_ids: Sequence[str]) -> np.ndarray:
    """A uniform 64-bit number per id, from SHA-256 of ``"<seed>:<id>"``."""
    return np.fromiter((int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big")
                        for i in image_ids), np.uint64, count=len(image_ids))


def _read_local(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SplitError(f"split file {path} does not exist; give the path of a list of test image ids") from None


def assign_splits(spec: SplitSpec, image_ids: Sequence[str], official: Sequence[str],
                  read_text: Callable[[str], str] | None = None) -> np.ndarray:
    """``"train"``, ``"test"`` (or, for ``official``, the dataset's own values) per row, in row order."""
    if spec.kind == "official":
        return np.asarray(official, object)
    ids = np.asarray(image_ids, object)
    if spec.kind == "file":
        try:
            listed = set((read_text or _read_local)(spec.path).split())
        except FileNotFoundError:
            raise SplitError(f"split file {spec.path} does not exist; give the path of a list of test ids") from None
        if not listed:
            raise SplitError(f"split file {spec.path} lists no image ids")
        if unknown := sorted(listed - set(ids.tolist())):
            raise SplitError(f"split file {spec.path}: {len(unknown)} id(s) are not in the dataset, e.g. "
                             f"{unknown[:5]}; fix the list or index the dataset it belongs to")
        test = np.isin(ids, np.asarray(sorted(listed), object))
    elif spec.kind == "cv":
        test = id_hash(spec.seed, ids) % np.uint64(spec.k) == np.uint64(spec.fold)
    else:
        test = id_hash(spec.seed, ids) < np.uint64(min(int(spec.fraction * 2**64), 2**64 - 1))
    return np.where(test, "test", "train").astype(object)
