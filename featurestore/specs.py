"""Specs that decide what an entry contains, and the content-addressed keys derived from them.

An entry's key is a hash of the canonical JSON of everything that determines its bytes. Same
spec ⇒ same key ⇒ the entry is found and reused; any change ⇒ a new key. Specs are frozen
dataclasses so a key can never drift from the spec that produced it.

Features are keyed by image content and extractor alone (features.py): a dataset's labels,
splits, names, URIs and row order never enter a GSF key. A dataset's own identity
(:meth:`DatasetManifest.digest`) leaves out its URIs, so a moved copy is the same dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import UserError

#: Bump when the on-disk layout or the meaning of a spec field changes; it is part of every key.
FORMAT_VERSION = 1

SPLITS = ("train", "val", "test", "")
#: Rating bins of a vote distribution (scores 1..10). Its one definition: the dataset readers
#: here need it, and trainers.labels (which the store must not import) re-uses it.
NUM_BINS = 10


class SpecError(UserError, ValueError):
    """A spec that cannot describe a valid entry (wrong lengths, bad values)."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN. Tuples serialise as lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def digest(obj: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def entry_key(kind: str, identity: Mapping[str, Any]) -> str:
    """``<kind>-<24 hex>``: readable in listings, 96 bits of a SHA-256 against collisions."""
    if not kind.isidentifier():
        raise SpecError(f"entry kind {kind!r} must be an identifier")
    payload = {"kind": kind, "format_version": FORMAT_VERSION, "identity": identity}
    return f"{kind}-{digest(payload)[:24]}"


def _to_json(spec: Any) -> dict[str, Any]:
    return json.loads(canonical_json(dataclasses.asdict(spec)))


@dataclass(frozen=True)
class DatasetManifest:
    """The images of a dataset, in row order, with their labels.

    Row ``i`` of every entry built from this manifest belongs to ``image_ids[i]``. ``votes`` are
    the ten per-score vote counts (AVA), ``mean_scores`` a mean score when only that is known;
    either may be absent (an unlabelled folder has neither). ``tags`` holds up to two semantic
    tag ids per image (0 = none) and ``tag_names`` maps ids to names.
    """

    name: str
    image_ids: tuple[str, ...]
    uris: tuple[str, ...]
    sha256: tuple[str, ...]
    splits: tuple[str, ...]
    votes: tuple[tuple[int, ...], ...] | None = None
    mean_scores: tuple[float, ...] | None = None
    tags: tuple[tuple[int, int], ...] | None = None
    tag_names: tuple[tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        columns = {"uris": self.uris, "sha256": self.sha256, "splits": self.splits}
        columns.update({k: v for k, v in (("votes", self.votes), ("mean_scores", self.mean_scores),
                                          ("tags", self.tags)) if v is not None})
        for col, values in columns.items():
            if len(values) != n:
                raise SpecError(f"manifest {self.name!r}: {col} has {len(values)} rows, image_ids has {n}")
        if len(set(self.image_ids)) != n:
            raise SpecError(f"manifest {self.name!r}: image ids are not unique")
        if bad := sorted(set(self.splits) - set(SPLITS)):
            raise SpecError(f"manifest {self.name!r}: unknown split(s) {bad}; use one of {SPLITS}")
        if self.votes is not None and any(len(v) != NUM_BINS or min(v) < 0 for v in self.votes):
            raise SpecError(f"manifest {self.name!r}: every votes row needs {NUM_BINS} non-negative counts")
        if any(len(h) != 64 for h in self.sha256):
            raise SpecError(f"manifest {self.name!r}: sha256 values must be 64 hex characters")

    def __len__(self) -> int:
        return len(self.image_ids)

    def identity(self) -> dict[str, Any]:
        """What determines extracted features and labels: everything but the source URIs."""
        data = self.to_json()
        del data["uris"]
        return data

    def digest(self) -> str:
        return digest(self.identity())

    def to_json(self) -> dict[str, Any]:
        # Built field by field: dataclasses.asdict deep-copies every row tuple, which takes
        # seconds at AVA's 255k rows.
        def lists(rows):
            return None if rows is None else [list(r) for r in rows]

        return {"name": self.name, "image_ids": list(self.image_ids), "uris": list(self.uris),
                "sha256": list(self.sha256), "splits": list(self.splits), "votes": lists(self.votes),
                "mean_scores": None if self.mean_scores is None else list(self.mean_scores),
                "tags": lists(self.tags), "tag_names": lists(self.tag_names)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DatasetManifest:
        def tuples(rows):
            return None if rows is None else tuple(tuple(r) for r in rows)

        return cls(
            name=data["name"],
            image_ids=tuple(data["image_ids"]),
            uris=tuple(data["uris"]),
            sha256=tuple(data["sha256"]),
            splits=tuple(data["splits"]),
            votes=tuples(data.get("votes")),
            mean_scores=None if data.get("mean_scores") is None else tuple(data["mean_scores"]),
            tags=tuples(data.get("tags")),
            tag_names=tuple((int(i), str(n)) for i, n in data.get("tag_names", ())),
        )


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone's part of an extractor: its name, exact weights and pooled layers.

    ``weights`` names the parameters exactly: ``sha256:<hex>`` of a weights file, or
    ``random:<seed>`` when random initialisation was asked for explicitly. ``width`` is the
    number of MLSP columns this backbone contributes.
    """

    name: str
    weights: str
    layers: tuple[str, ...]
    width: int

    def __post_init__(self) -> None:
        if not (self.weights.startswith("sha256:") or self.weights.startswith("random:")):
            raise SpecError(f"backbone {self.name!r}: weights must be 'sha256:<hex>' or 'random:<seed>', "
                            f"got {self.weights!r}")
        if self.width <= 0:
            raise SpecError(f"backbone {self.name!r}: width must be positive")


@dataclass(frozen=True)
class ExtractorSpec:
    """How generic semantic features (GSFs) are computed: backbones, input policy, precision."""

    backbones: tuple[BackboneSpec, ...]
    input_policy: str = "full-resolution"
    pooling: str = "global-average"
    compute_dtype: str = "float32"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if not self.backbones:
            raise SpecError("an extractor needs at least one backbone")
        names = [b.name for b in self.backbones]
        if len(set(names)) != len(names):
            raise SpecError(f"backbone names repeat: {names}")

    @property
    def width(self) -> int:
        return sum(b.width for b in self.backbones)

    def column_ranges(self) -> dict[str, tuple[int, int]]:
        """Half-open column range of each backbone in the concatenated GSF row."""
        ranges, start = {}, 0
        for b in self.backbones:
            ranges[b.name] = (start, start + b.width)
            start += b.width
        return ranges

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExtractorSpec:
        backbones = tuple(BackboneSpec(name=b["name"], weights=b["weights"], layers=tuple(b["layers"]),
                                       width=int(b["width"])) for b in data["backbones"])
        return cls(backbones=backbones, **{k: v for k, v in data.items() if k != "backbones"})


@dataclass(frozen=True)
class EntrySpec:
    """What an entry is and where it came from.

    ``identity`` is everything that determines the entry's bytes and is hashed into its key.
    ``parent`` is the key of the entry it was derived from (lineage), ``producer`` the spec of
    the step that made it (e.g. a distiller's hyper-parameters); both are part of the identity.
    """

    kind: str
    identity: Mapping[str, Any]
    parent: str | None = None
    producer: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return entry_key(self.kind, {"parent": self.parent, "producer": self.producer, **self.identity})

    def to_json(self) -> dict[str, Any]:
        return json.loads(canonical_json({"kind": self.kind, "key": self.key, "parent": self.parent,
                                          "producer": self.producer, "identity": self.identity,
                                          "format_version": FORMAT_VERSION}))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EntrySpec:
        spec = cls(kind=data["kind"], identity=data["identity"], parent=data.get("parent"),
                   producer=data.get("producer", {}))
        if data.get("key") not in (None, spec.key):
            raise SpecError(f"entry spec says key {data['key']!r} but hashes to {spec.key!r}")
        return spec

