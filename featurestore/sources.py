"""Read dataset files — images, label tables, split lists — from a local path or ``s3://`` URI.

Dataset readers only need four file operations: read a whole file, stat it, test that it exists and
list a folder. Offering exactly those for both schemes keeps the readers free of scheme checks.

A *stat* is ``(size, version)``: ``version`` is the modification time in nanoseconds for a local
file and the ETag for an S3 object. Together they are what the hash cache trusts to decide that
a file is unchanged since it was last hashed.

S3 access goes through obstore's ``S3Store`` with the store's own credential resolution
(boto3's standard chain, incl. ``AWS_ENDPOINT_URL``), one store per bucket for the process.
Local files use plain file I/O. A file that does not exist raises :class:`MissingSourceError`,
anything else that stops a read raises :class:`SourceError`; both name the URI.
"""

from __future__ import annotations

import functools
import os
import posixpath
from stat import S_ISREG
from typing import NamedTuple
from urllib.parse import urlparse

import obstore
from obstore.exceptions import NotFoundError
from obstore.store import S3Store

from .backends import S3URLError, StoreURL, _s3_store, describe_error, parse_s3_url
from .errors import UserError

#: Suffixes (lower case) that count as images when a folder is listed.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_LIST_CHUNK = 1000  # objects per S3 listing batch: fewer round trips into Python than the default 50


class SourceError(UserError, OSError):
    """A dataset file that cannot be read; the message names its URI."""


class MissingSourceError(SourceError, FileNotFoundError):
    """A dataset file or object that does not exist."""


class Stat(NamedTuple):
    size: int
    version: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Canonical form of a location: an absolute local path, or ``s3://bucket/key`` without a
    trailing slash. Row URIs and cache keys use this form so the same file is always one string."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return f"s3://{bucket}/{key}".rstrip("/")
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def join(root: str, *parts: str) -> str:
    """``root`` joined with relative, ``/``-separated ``parts`` (``..`` resolved on S3 too)."""
    if is_s3(root):
        bucket, key = _split_s3(root)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(key, *parts)).lstrip('/')}"
    return os.path.normpath(os.path.join(root, *parts))


def parent(uri: str) -> str:
    """The folder (local) or prefix (S3) holding ``uri``."""
    return uri.rsplit("/", 1)[0] if is_s3(uri) else os.path.dirname(uri)


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            return bytes(obstore.get(_bucket_store(bucket), key).bytes())
        except (NotFoundError, FileNotFoundError):
            raise MissingSourceError(f"{uri}: no such object") from None
        except Exception as exc:  # noqa: BLE001 - network and auth errors become one clear message
            raise SourceError(f"{uri}: {describe_error(exc)}") from None
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise MissingSourceError(f"{uri}: no such file") from None
    except OSError as exc:
        raise SourceError(f"{uri}: {exc.strerror or exc}") from None


def stat(uri: str) -> Stat:
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            return _object_stat(obstore.head(_bucket_store(bucket), key))
        except (NotFoundError, FileNotFoundError):
            raise MissingSourceError(f"{uri}: no such object") from None
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{uri}: {describe_error(exc)}") from None
    try:
        st = os.stat(uri)
    except FileNotFoundError:
        raise MissingSourceError(f"{uri}: no such file") from None
    except OSError as exc:
        raise SourceError(f"{uri}: {exc.strerror or exc}") from None
    if not S_ISREG(st.st_mode):
        raise MissingSourceError(f"{uri}: not a file")
    return Stat(st.st_size, str(st.st_mtime_ns))


def exists(uri: str) -> bool:
    try:
        stat(uri)
        return True
    except MissingSourceError:
        return False


def list_files(uri: str, recursive: bool = True) -> dict[str, Stat]:
    """Every file under the folder or prefix ``uri`` (only its direct children unless
    ``recursive``), as normalized URI → stat. A folder that does not exist lists as empty."""
    root = normalize(uri)
    if is_s3(root):
        bucket, key = _split_s3(root)
        store, prefix = _bucket_store(bucket), key or None
        try:
            if recursive:
                objects = [o for batch in obstore.list(store, prefix, chunk_size=_LIST_CHUNK) for o in batch]
            else:
                objects = obstore.list_with_delimiter(store, prefix)["objects"]
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{root}: {describe_error(exc)}") from None
        return {f"s3://{bucket}/{o['path']}": _object_stat(o) for o in objects}
    if not os.path.isdir(root):
        return {}
    if recursive:
        paths = (os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    else:
        with os.scandir(root) as entries:
            paths = [e.path for e in entries if not e.is_dir()]
    return {path: st for path in paths if (st := _file_stat(path)) is not None}


def list_images(uri: str, recursive: bool = True) -> dict[str, Stat]:
    """Like :func:`list_files`, keeping names with an image suffix (any case)."""
    return {u: s for u, s in list_files(uri, recursive).items() if u.lower().endswith(IMAGE_SUFFIXES)}


def _split_s3(uri: str) -> tuple[str, str]:
    """``parse_s3_url``, raising this module's ``SourceError`` (a dataset file that cannot be read)."""
    try:
        return parse_s3_url(uri)
    except S3URLError as exc:
        raise SourceError(str(exc)) from None


@functools.cache
def _bucket_store(bucket: str) -> S3Store:
    """One S3Store per bucket: it holds the HTTP connection pool and the resolved credentials."""
    return _s3_store(StoreURL("s3", bucket, ""))


def _object_stat(meta) -> Stat:
    # ETags arrive quoted; listing and HEAD must give the same string for the cache to match.
    version = (meta.get("e_tag") or "").strip('"') or meta["last_modified"].isoformat()
    return Stat(int(meta["size"]), version)


def _file_stat(path: str) -> Stat | None:
    """The stat of a regular file; ``None`` for a broken link or a file deleted while listing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Stat(st.st_size, str(st.st_mtime_ns)) if S_ISREG(st.st_mode) else None
