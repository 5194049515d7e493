"""Dataset readers: an AVA directory, a CSV table or a folder of images → a ``DatasetManifest``.

Every reader works on a local path or an ``s3://bucket/prefix`` alike (see ``sources``) and
yields rows in a deterministic order: AVA and CSV keep their file's line order, a folder is
sorted by relative path. The manifest's identity includes the SHA-256 of every image's bytes,
so loading hashes every image; a JSON cache makes reloading an unchanged dataset cost one
listing (or stat) per image instead of a full read.

Decisions a caller can rely on:

* **Missing images stay rows.** A row whose image file does not exist keeps its labels and gets
  ``sha256 = MISSING_SHA256`` (64 zeros), so row counts match ``AVA.txt`` and the extraction
  job can record those rows as failed. The count is in ``HashStats.missing`` and a warning.
  Only *absence* gives the sentinel: any other read error (network, permissions) is raised,
  because a transient failure must not silently change the dataset's identity.
* **Splits come from the data when it has them**: AVA's ``generic_test.jpgl`` and optional
  ``generic_train.jpgl`` (in the dataset directory or its ``aesthetics_image_lists/``), or a
  CSV ``split`` column. With only a test list, every other image is ``train`` — the paper's
  ~230k/20k split. With a train list too, images in neither are ``""``. AVA's
  ``generic_ls_train.jpgl`` is deliberately not read: it lists ~20k images, not the paper's
  training set. Data without splits gets ``""`` everywhere unless ``test_fraction`` is given;
  then :func:`hash_split` assigns ``test``/``train`` from a hash of the image id alone.
* **Default names do not depend on where the data lives**: ``"ava"``, ``"folder"``, or the
  CSV file's stem. The name is part of the manifest's identity; moving a dataset (laptop → S3)
  keeps its digest.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from . import sources
from .errors import UserError
from .files import atomic_write_text
from .sources import MissingSourceError, Stat
from .specs import NUM_BINS, DatasetManifest

FORMATS = ("ava", "csv", "folder")

#: The sha256 of a row whose image does not exist (not the hash of any real content we accept).
MISSING_SHA256 = "0" * 64

DEFAULT_HASH_WORKERS = 16  # reading S3 objects is I/O bound; hashlib releases the GIL for local files
CACHE_DIR_ENV = "AKD_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/aesthetic-kd/hashes"
CACHE_FORMAT = 1

AVA_FILE = "AVA.txt"
AVA_FIELDS = 15  # index, image id, 10 vote counts, 2 tag ids, challenge id
TAGS_FILE = "tags.txt"
TEST_LIST = "generic_test.jpgl"
TRAIN_LIST = "generic_train.jpgl"
SPLIT_LIST_DIRS = ("", "aesthetics_image_lists")

#: CSV columns. Only ``image`` is required; vote columns come as all ten or none.
CSV_IMAGE, CSV_IMAGE_ID, CSV_MEAN, CSV_SPLIT = "image", "image_id", "mean_score", "split"
CSV_VOTES = tuple(f"votes_{score}" for score in range(1, NUM_BINS + 1))
CSV_TAGS = ("tag1", "tag2")

PROGRESS_SECONDS = 5.0
CHECKPOINT_SECONDS = 60.0  # a long hashing run saves its cache this often, so an interruption loses little


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read as its format says; the message names the file and line."""


@dataclass
class HashStats:
    """What one load did to get the images' hashes: read and hashed, reused from the cache, or
    found missing. Pass one to :func:`load_dataset` to observe it."""

    hashed: int = 0
    cached: int = 0
    missing: int = 0


@dataclass
class _Table:
    """A reader's rows before hashing. ``splits`` is ``None`` when the data defines none;
    ``listing`` holds the stats of a folder listing, or ``None`` to stat each image itself."""

    image_ids: list[str]
    uris: list[str]
    listing: Mapping[str, Stat] | None
    splits: list[str] | None = None
    votes: list[tuple[int, ...]] | None = None
    mean_scores: list[float] | None = None
    tags: list[tuple[int, int]] | None = None
    tag_names: tuple[tuple[int, str], ...] = ()


def load_dataset(path: str, format: str, name: str | None = None, *, test_fraction: float | None = None,
                 hash_workers: int = DEFAULT_HASH_WORKERS, cache_dir: str | os.PathLike | None = None,
                 stats: HashStats | None = None) -> DatasetManifest:
    """Read the dataset at ``path`` (a directory, prefix or CSV file; local or ``s3://``), hashing
    every image the cache does not vouch for.

    ``cache_dir`` holds the hash cache (default ``$AKD_CACHE_DIR`` or ``~/.cache/aesthetic-kd/hashes``);
    ``stats``, when given, has what hashing did added to its counts.
    """
    stats = HashStats() if stats is None else stats
    dataset = index_dataset(path, format, name, test_fraction=test_fraction, hash_workers=hash_workers,
                            cache_dir=cache_dir, stats=stats)
    return dataset.hashed(hash_workers, stats).complete({})


def index_dataset(path: str, format: str, name: str | None = None, *, test_fraction: float | None = None,
                  hash_workers: int = DEFAULT_HASH_WORKERS, cache_dir: str | os.PathLike | None = None,
                  stats: HashStats | None = None) -> IndexedDataset:
    """:func:`load_dataset` up to, not including, reading images to hash them (see ``IndexedDataset``)."""
    if format not in _READERS:
        raise DatasetError(f"unknown dataset format {format!r}; use one of: {', '.join(FORMATS)}")
    if hash_workers < 1:
        raise DatasetError(f"hash_workers must be at least 1, got {hash_workers}")
    root = sources.normalize(path)
    table = _READERS[format](root)
    _check_unique(table.image_ids, root)
    splits = _resolve_splits(table, test_fraction, root)
    cache_file = _cache_file(cache_dir, format, root)
    sha256, unhashed, entries, cached = index_images(table, cache_file, hash_workers,
                                                     HashStats() if stats is None else stats)
    return IndexedDataset(
        name=name or (posixpath.splitext(posixpath.basename(root))[0] if format == "csv" else format),
        root=root, rows=table, splits=tuple(splits), sha256=tuple(sha256), stats=unhashed, entries=entries,
        cache_file=cache_file, cached=cached)


def hash_split(image_id: str, test_fraction: float) -> str:
    """``"test"`` for a fixed pseudo-random ``test_fraction`` of ids, else ``"train"``.

    It depends on the id alone, so adding or removing images never moves another across the split.
    """
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2**64 else "train"


# -- readers ---------------------------------------------------------------------------------

def _read_ava(root: str) -> _Table:
    ava_uri = sources.join(root, AVA_FILE)
    text = _read_text(ava_uri, f"AVA dataset {root} has no {AVA_FILE}")
    ids, votes, tags = [], [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != AVA_FIELDS:
            raise DatasetError(f"{ava_uri} line {lineno}: expected {AVA_FIELDS} fields (index, image id, "
                               f"{NUM_BINS} vote counts, 2 tag ids, challenge id), got {len(fields)}")
        try:
            numbers = list(map(int, fields[2:2 + NUM_BINS + 2]))
        except ValueError:
            raise DatasetError(f"{ava_uri} line {lineno}: vote counts and tag ids must be integers") from None
        ids.append(fields[1])
        votes.append(tuple(numbers[:NUM_BINS]))
        tags.append((numbers[NUM_BINS], numbers[NUM_BINS + 1]))
    image_dir, listing = _ava_images(root)
    # Plain concatenation, not sources.join: AVA ids are bare numbers, and this runs 255k times.
    return _Table(image_ids=ids, uris=[f"{image_dir}/{i}.jpg" for i in ids], listing=listing,
                  splits=_ava_splits(root, ids), votes=votes, tags=tags, tag_names=_ava_tag_names(root))


def _ava_images(root: str) -> tuple[str, dict[str, Stat]]:
    """The folder holding ``<id>.jpg`` — ``images/`` if it has any, else the dataset directory."""
    for image_dir in (sources.join(root, "images"), root):
        listing = sources.list_files(image_dir, recursive=False)
        if any(uri.endswith(".jpg") for uri in listing):
            break
    return image_dir, listing


def _ava_tag_names(root: str) -> tuple[tuple[int, str], ...]:
    uri = sources.join(root, TAGS_FILE)
    text = _read_optional_text(uri)
    if text is None:
        return ()
    names = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{uri} line {lineno}: expected '<tag id> <name>', got {line!r}")
        names[int(parts[0])] = parts[1].strip()
    return tuple(sorted(names.items()))


def _ava_splits(root: str, ids: list[str]) -> list[str] | None:
    test, train = _split_list(root, TEST_LIST), _split_list(root, TRAIN_LIST)
    if test is None and train is None:
        return None
    test = test or set()
    if both := test & (train or set()):
        raise DatasetError(f"{root}: {len(both)} image ids are in both {TEST_LIST} and {TRAIN_LIST}, "
                           f"e.g. {sorted(both)[:5]}")
    return ["test" if i in test else "train" if train is None or i in train else "" for i in ids]


def _split_list(root: str, name: str) -> set[str] | None:
    for folder in SPLIT_LIST_DIRS:
        text = _read_optional_text(sources.join(root, folder, name))
        if text is not None:
            return set(text.split())
    return None


def _read_csv(csv_uri: str) -> _Table:
    reader = csv.DictReader(io.StringIO(_read_text(csv_uri, "CSV dataset file does not exist")))
    columns = reader.fieldnames or []
    if CSV_IMAGE not in columns:
        raise DatasetError(f"{csv_uri}: needs an {CSV_IMAGE!r} column; the header has {columns}")
    if vote_columns := [c for c in CSV_VOTES if c in columns]:
        if len(vote_columns) != NUM_BINS:
            missing = [c for c in CSV_VOTES if c not in columns]
            raise DatasetError(f"{csv_uri}: vote columns come as all of {CSV_VOTES[0]}..{CSV_VOTES[-1]}; "
                               f"missing {missing}")
    has_mean, has_split = CSV_MEAN in columns, CSV_SPLIT in columns
    has_tags = any(c in columns for c in CSV_TAGS)
    folder = sources.parent(csv_uri)
    ids, uris, splits, votes, mean_scores, tags = [], [], [], [], [], []
    for row in reader:
        image = (row.get(CSV_IMAGE) or "").strip()
        if not image:
            raise DatasetError(f"{csv_uri} line {reader.line_num}: empty {CSV_IMAGE!r} cell")
        uris.append(_resolve_image(folder, image))
        ids.append((row.get(CSV_IMAGE_ID) or "").strip() or posixpath.splitext(posixpath.basename(image))[0])
        try:
            if vote_columns:
                votes.append(tuple(int(row[c]) for c in CSV_VOTES))
            if has_mean:
                mean_scores.append(float(row[CSV_MEAN]))
                if not math.isfinite(mean_scores[-1]):
                    raise ValueError
            if has_tags:
                tags.append(tuple(int((row.get(c) or "").strip() or 0) for c in CSV_TAGS))
        except (TypeError, ValueError):
            raise DatasetError(f"{csv_uri} line {reader.line_num}: votes and tags must be integers and "
                               f"{CSV_MEAN} a finite number") from None
        splits.append((row.get(CSV_SPLIT) or "").strip())
    return _Table(image_ids=ids, uris=uris, listing=None, splits=splits if has_split else None,
                  votes=votes if vote_columns else None, mean_scores=mean_scores if has_mean else None,
                  tags=tags if has_tags else None)


def _resolve_image(folder: str, image: str) -> str:
    """An ``image`` cell as a URI: ``s3://`` and absolute paths as they are, others relative to the CSV."""
    if sources.is_s3(image) or image.startswith("file://") or os.path.isabs(image):
        return sources.normalize(image)
    return sources.join(folder, image)


def _read_folder(root: str) -> _Table:
    listing = sources.list_images(root)
    if not listing:
        raise DatasetError(f"{root}: no such folder, or it holds no images "
                           f"({', '.join(s.lstrip('.') for s in sources.IMAGE_SUFFIXES)})")
    uris = sorted(listing)
    # Ids are relative paths without the suffix: flat folders get their file stems, as a CSV does.
    ids = [posixpath.splitext(uri[len(root) + 1:])[0] for uri in uris]
    return _Table(image_ids=ids, uris=uris, listing=listing)


_READERS: dict[str, Callable[[str], _Table]] = {"ava": _read_ava, "csv": _read_csv, "folder": _read_folder}


def _read_text(uri: str, missing_message: str) -> str:
    try:
        data = sources.read_bytes(uri)
    except MissingSourceError:
        raise MissingSourceError(f"{missing_message}: {uri}") from None
    return _decode(uri, data)


def _read_optional_text(uri: str) -> str | None:
    try:
        return _decode(uri, sources.read_bytes(uri))
    except MissingSourceError:
        return None


def _decode(uri: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{uri}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _check_unique(ids: list[str], source: str) -> None:
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
        raise DatasetError(f"{source}: {len(repeated)} image ids repeat, e.g. {repeated[:5]}")


def _resolve_splits(table: _Table, test_fraction: float | None, root: str) -> list[str]:
    if table.splits is not None:
        if test_fraction is not None:
            raise DatasetError(f"{root} defines its own splits; drop test_fraction or remove them")
        return table.splits
    if test_fraction is None:
        return [""] * len(table.image_ids)
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    return [hash_split(i, test_fraction) for i in table.image_ids]


# -- hashing ---------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class IndexedDataset:
    """A dataset's rows with the image hashes that need no read: absent images and those whose
    stat still matches the cache. ``unhashed`` rows need their bytes read to be hashed.

    :func:`load_dataset` reads them on the spot. The extraction job instead leaves them to the
    workers that read each image anyway to decode it, so a first extraction reads every image
    once, and then calls :meth:`complete` with the hashes the workers report. Until then an
    unhashed image is known by its :meth:`fingerprints` (URI, size, version).
    """

    name: str
    root: str
    rows: _Table
    splits: tuple[str, ...]
    sha256: tuple[str | None, ...]   # None: unhashed; MISSING_SHA256: absent
    stats: Mapping[int, Stat]        # row → stat, for the unhashed rows
    entries: Mapping[str, list]      # URI → cache entry [size, version, sha256], for the hashed rows
    cache_file: Path
    cached: Mapping[str, list]       # the cache as loaded

    @property
    def unhashed(self) -> list[int]:
        return sorted(self.stats)

    def fingerprints(self, rows: Iterable[int]) -> list[str]:
        """What an unhashed image is known by until it is read: its URI, size and version."""
        return [f"{self.rows.uris[i]}\0{self.stats[i].size}\0{self.stats[i].version}" for i in rows]

    def hashed(self, workers: int = DEFAULT_HASH_WORKERS, stats: HashStats | None = None) -> IndexedDataset:
        """This dataset with its unhashed rows read and hashed, on ``workers`` threads."""
        digests = read_hashes(self, workers, HashStats() if stats is None else stats)
        uris = self.rows.uris
        return dataclasses.replace(
            self, sha256=tuple(digests.get(i, h) for i, h in enumerate(self.sha256)), stats={},
            entries={**self.entries, **{uris[i]: [self.stats[i].size, self.stats[i].version, d]
                                        for i, d in digests.items() if d != MISSING_SHA256}})

    def complete(self, digests: Mapping[int, str]) -> DatasetManifest:
        """The manifest, given the hex SHA-256 (``MISSING_SHA256`` for an image found gone) of
        every unhashed row; the new hashes go into the cache."""
        if lacking := [i for i in self.stats if i not in digests]:
            raise ValueError(f"{len(lacking)} unhashed row(s) have no digest, e.g. {self.rows.uris[lacking[0]]}")
        sha256 = [digests[i] if h is None else h for i, h in enumerate(self.sha256)]
        fresh = dict(self.entries)
        for i, st in self.stats.items():
            if digests[i] != MISSING_SHA256:
                fresh[self.rows.uris[i]] = [st.size, st.version, digests[i]]
        if fresh != self.cached:
            _save_cache(self.cache_file, fresh)  # only this dataset's current files: stale URIs drop out
        if missing := sha256.count(MISSING_SHA256):
            warnings.warn(f"{self.root}: {missing} of {len(sha256)} images are missing; their rows carry "
                          "sha256 MISSING_SHA256 (64 zeros) and will be recorded as failed rows", stacklevel=2)
        table = self.rows
        return DatasetManifest(
            name=self.name, image_ids=tuple(table.image_ids), uris=tuple(table.uris), sha256=tuple(sha256),
            splits=self.splits, votes=None if table.votes is None else tuple(table.votes),
            mean_scores=None if table.mean_scores is None else tuple(table.mean_scores),
            tags=None if table.tags is None else tuple(table.tags), tag_names=table.tag_names)


def index_images(table: _Table, cache_file: Path, workers: int, stats: HashStats) -> tuple[
        list[str | None], dict[int, Stat], dict[str, list], dict[str, list]]:
    """Settle every image that needs no read: ``(sha256 or None per row, stat of each unhashed
    row, cache entries of the settled ones, the cache as loaded)``.

    ``listing`` supplies stats from a folder listing, which settles absent and unchanged images
    without any I/O; without one each image is stat-ed, on a thread pool in bounded chunks.
    """
    cached = _load_cache(cache_file)
    digests: list[str | None] = [MISSING_SHA256] * len(table.uris)
    unhashed: dict[int, Stat] = {}
    entries: dict[str, list] = {}

    def settle(i: int, uri: str, st: Stat | None) -> None:
        if st is None:
            stats.missing += 1
        elif (hit := cached.get(uri)) is not None and hit[0] == st.size and hit[1] == st.version:
            stats.cached += 1
            entries[uri], digests[i] = hit, hit[2]
        else:
            digests[i], unhashed[i] = None, st

    listing = table.listing
    if listing is not None:
        for i, uri in enumerate(table.uris):
            settle(i, uri, listing.get(uri))
    else:
        rows = list(enumerate(table.uris))
        for (i, uri), st in _pooled(rows, lambda row: _stat_or_none(row[1]), workers, "checking images"):
            settle(i, uri, st)
    return digests, unhashed, entries, cached


def read_hashes(dataset: IndexedDataset, workers: int, stats: HashStats) -> dict[int, str]:
    """Read and hash the unhashed rows of ``dataset``: row → hex SHA-256 (``MISSING_SHA256`` for
    an image gone since its stat). A long run checkpoints the cache, so an interruption loses
    little."""
    uris = dataset.rows.uris
    digests: dict[int, str] = {}
    last_checkpoint = time.monotonic()

    def checkpoint() -> None:
        _save_cache(dataset.cache_file, {**dataset.cached, **{
            uris[i]: [dataset.stats[i].size, dataset.stats[i].version, d] for i, d in digests.items()
            if d != MISSING_SHA256}})

    def read(i: int) -> str:
        try:
            return hashlib.sha256(sources.read_bytes(uris[i])).hexdigest()
        except MissingSourceError:
            return MISSING_SHA256

    try:
        for i, digest in _pooled(dataset.unhashed, read, workers, "hashing images"):
            digests[i] = digest
            stats.hashed += digest != MISSING_SHA256
            stats.missing += digest == MISSING_SHA256
            if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS:
                checkpoint()
                last_checkpoint = time.monotonic()
    except BaseException:
        if digests:  # keep what was hashed so a rerun resumes instead of starting over
            checkpoint()
        raise
    return digests


def _pooled(items: list, fn: Callable, workers: int, label: str) -> Iterator[tuple]:
    """``(item, fn(item))`` in order, ``fn`` on a thread pool in chunks (memory stays flat for
    255k images), with progress on stderr every few seconds."""
    chunk = 64 * workers
    started = last_progress = time.monotonic()
    with ThreadPoolExecutor(workers, thread_name_prefix="hash") as pool:
        for start in range(0, len(items), chunk):
            batch = items[start:start + chunk]
            yield from zip(batch, pool.map(fn, batch))
            if (now := time.monotonic()) - last_progress >= PROGRESS_SECONDS:
                print(f"{label}: {start + len(batch)}/{len(items)} ({now - started:.0f}s)", file=sys.stderr, flush=True)
                last_progress = now


def _stat_or_none(uri: str) -> Stat | None:
    try:
        return sources.stat(uri)
    except MissingSourceError:
        return None


def _cache_file(cache_dir: str | os.PathLike | None, format: str, root: str) -> Path:
    folder = Path(cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()
    return folder / f"{format}-{hashlib.sha256(root.encode()).hexdigest()[:24]}.json"


def _load_cache(path: Path) -> dict[str, list]:
    """The cached entries, or none if the file is absent, unreadable or of another format:
    a cache only saves work, so a bad one costs a rehash, never a failure."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
    return files if isinstance(files, dict) else {}


def _save_cache(path: Path, files: Mapping[str, list]) -> None:
    """Write atomically (temp file + rename) so a crash or a concurrent loader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "files": files}, separators=(",", ":")))
