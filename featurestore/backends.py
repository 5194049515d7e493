"""Store URLs → a zarr store for arrays plus an object store for small JSON records.

Two schemes:

* a local directory (``/path``, ``./rel`` or ``file:///path``) — the embedded default, no server;
* ``s3://bucket/prefix`` — through obstore's ``S3Store`` (and ``zarr.storage.ObjectStore`` over
  it for arrays), with credentials, endpoint and region resolved by boto3's standard chain:
  ``AWS_*`` environment variables incl. ``AWS_ENDPOINT_URL``, shared profiles, instance roles.

Records (commit records, the final manifest, the entry spec) go through obstore for both
schemes because it offers an atomic *create-if-absent*: ``If-None-Match: *`` on S3, a hard-link
on a local file system. That primitive is what lets racing writers agree on one winner.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import numpy as np
import obstore
import zarr.storage
from obstore.exceptions import AlreadyExistsError, NotFoundError
from obstore.store import LocalStore, S3Store

from .errors import UserError


class StoreError(UserError, RuntimeError):
    """A store that cannot be opened or used; the message says which URL and what to do."""


class S3URLError(UserError, ValueError):
    """A string that is not a usable ``s3://<bucket>/<key>`` URL; the message names it."""


S3_URL_FORM = "s3://<bucket>/<key or prefix>"


def parse_s3_url(url: str) -> tuple[str, str]:
    """``"s3://bucket/a/b/"`` → ``("bucket", "a/b")``: the bucket and the key (or prefix), the key
    without leading or trailing ``/`` (``""`` for the bucket's root).

    The one parser of S3 URLs here. Not ``urllib.parse``: object keys may hold ``#``, ``?`` or
    ``;``, which a URL parser would cut off. Raises :class:`S3URLError` naming the URL and the
    expected form for anything else, including a bucket name shorter than S3 allows.
    """
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise S3URLError(f"{url!r} is not an S3 URL; expected {S3_URL_FORM}")
    bucket, _, key = url[len("s3://"):].partition("/")
    if len(bucket) < 3:
        raise S3URLError(f"S3 URL {url!r}: bucket name {bucket!r} is too short (S3 bucket names have 3–63 "
                         f"characters); expected {S3_URL_FORM}")
    return bucket, key.strip("/")


@dataclass(frozen=True)
class StoreURL:
    """A parsed store location: ``scheme`` is ``file`` or ``s3``."""

    scheme: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        if not url:
            raise StoreError("empty store URL: give a local directory or s3://bucket/prefix")
        parsed = urlparse(url)  # for the scheme only: an S3 prefix may hold '#' or '?'
        if parsed.scheme == "s3":
            try:
                return cls("s3", *parse_s3_url(url))
            except S3URLError as exc:
                raise StoreError(str(exc)) from None
        if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
            path = parsed.path if parsed.scheme == "file" else url
            return cls("file", "", str(Path(path).expanduser().resolve()))
        raise StoreError(f"store URL {url!r}: unknown scheme {parsed.scheme!r}; "
                         "use a local directory or s3://bucket/prefix")

    def __str__(self) -> str:
        return self.prefix if self.scheme == "file" else f"s3://{self.bucket}/{self.prefix}".rstrip("/")


#: Retries of S3 requests (5xx incl. SlowDown, resets, timeouts), for the store and image reads alike.
#: obstore retries with exponential backoff and jitter; these variables bound it.
RETRIES_ENV, RETRY_TIMEOUT_ENV = "AKD_S3_MAX_RETRIES", "AKD_S3_RETRY_TIMEOUT_S"
DEFAULT_RETRIES, DEFAULT_RETRY_TIMEOUT_S = 10, 180.0


def retry_config() -> dict[str, Any]:
    """obstore's retry config from ``$AKD_S3_MAX_RETRIES`` and ``$AKD_S3_RETRY_TIMEOUT_S``."""
    try:
        retries = int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES))
        timeout = float(os.environ.get(RETRY_TIMEOUT_ENV, DEFAULT_RETRY_TIMEOUT_S))
    except ValueError:
        raise StoreError(f"{RETRIES_ENV} must be an integer and {RETRY_TIMEOUT_ENV} a number of seconds") from None
    return {"max_retries": retries, "retry_timeout": timedelta(seconds=timeout),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=15),
                        "base": 2.0}}


def _s3_store(url: StoreURL) -> S3Store:
    """An obstore S3Store configured from boto3's credential/endpoint/region resolution."""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.Session()
        credentials = session.get_credentials()
        client = session.client("s3")
    except BotoCoreError as exc:
        raise StoreError(f"store {url}: AWS configuration error: {exc}") from None
    if credentials is None:
        raise StoreError(f"store {url}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance role")
    endpoint = client.meta.endpoint_url
    region = client.meta.region_name or "us-east-1"
    config: dict[str, Any] = {"region": region}
    # boto3 always reports an endpoint; only pass a custom one (MinIO, moto, another cloud's S3).
    if not endpoint.rstrip("/").endswith(".amazonaws.com"):
        config["endpoint"] = endpoint
    from obstore.auth.boto3 import Boto3CredentialProvider

    return S3Store(url.bucket, prefix=url.prefix or None, config=config,
                   client_options={"allow_http": endpoint.startswith("http://")}, retry_config=retry_config(),
                   credential_provider=Boto3CredentialProvider(session))


class Backend:
    """The two views of one store location: ``zarr_store`` for arrays, record methods for JSON."""

    def __init__(self, url: str | StoreURL, create: bool = True):
        self.url = url if isinstance(url, StoreURL) else StoreURL.parse(url)
        if self.url.scheme == "file":
            if not create and not Path(self.url.prefix).is_dir():
                raise StoreError(f"store {self.url}: no such directory; check the path")
            Path(self.url.prefix).mkdir(parents=True, exist_ok=True)
            self.objects = LocalStore(self.url.prefix)
            self.zarr_store: zarr.abc.store.Store = zarr.storage.LocalStore(self.url.prefix)
        else:
            self.objects = _s3_store(self.url)
            self.zarr_store = zarr.storage.ObjectStore(self.objects)
        self._check_reachable()

    def _check_reachable(self) -> None:
        try:
            obstore.list_with_delimiter(self.objects, None)
        except Exception as exc:  # noqa: BLE001 - every failure here becomes one clear message
            raise StoreError(f"store {self.url}: {describe_error(exc)}") from None

    # -- records -----------------------------------------------------------------------------

    def read_bytes(self, path: str) -> bytes | None:
        try:
            return bytes(obstore.get(self.objects, path).bytes())
        except (NotFoundError, FileNotFoundError):
            return None

    def read_buffer(self, path: str):
        """A large object as a buffer without extra copies (a local file is read straight into an
        uninitialised, writable numpy buffer); ``None`` if it does not exist."""
        if self.url.scheme == "file":
            try:
                with open(Path(self.url.prefix) / path, "rb", buffering=0) as f:
                    buffer = np.empty(os.fstat(f.fileno()).st_size, np.uint8)
                    if f.readinto(memoryview(buffer)) != buffer.size:
                        raise StoreError(f"store {self.url}: {path} changed size while being read")
                    return buffer
            except FileNotFoundError:
                return None
        try:
            return obstore.get(self.objects, path).bytes()
        except (NotFoundError, FileNotFoundError):  # obstore raises either, by backend and version
            return None

    def read_json(self, path: str) -> Any | None:
        data = self.read_bytes(path)
        return None if data is None else json.loads(data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())

    def write_bytes(self, path: str, data: bytes) -> None:
        obstore.put(self.objects, path, data)

    def create_json(self, path: str, obj: Any) -> bool:
        """Write ``obj`` only if ``path`` does not exist yet; ``True`` if this call created it."""
        try:
            obstore.put(self.objects, path, json.dumps(obj, indent=1, sort_keys=True).encode(), mode="create")
            return True
        except (AlreadyExistsError, FileExistsError):
            return False

    def exists(self, path: str) -> bool:
        try:
            obstore.head(self.objects, path)
            return True
        except (NotFoundError, FileNotFoundError):
            return False

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Objects under ``prefix`` (``path``, ``size``, ``last_modified``)."""
        for batch in obstore.list(self.objects, prefix=prefix):
            yield from batch

    def list_dirs(self, prefix: str | None = None) -> list[str]:
        listing = obstore.list_with_delimiter(self.objects, prefix)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]]

    def delete_prefix(self, prefix: str) -> int:
        paths = [o["path"] for o in self.list(prefix)]
        if paths:
            obstore.delete(self.objects, paths)
        if self.url.scheme == "file":  # obstore leaves empty directories behind
            _remove_empty_dirs(Path(self.url.prefix) / prefix)
        return len(paths)


def _remove_empty_dirs(root: Path) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def describe_error(exc: BaseException) -> str:
    """One line a user can act on, for the errors a store URL or credentials commonly cause."""
    text = str(exc)
    if "NoSuchBucket" in text or ("bucket" in text.lower() and "not" in text.lower() and "exist" in text.lower()):
        return "the bucket does not exist; create it or fix the bucket name in the URL"
    if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                               "ExpiredToken", "InvalidToken")):
        return "access denied: the AWS credentials were rejected; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
    if any(s in text.lower() for s in ("connection refused", "dns error", "error sending request",
                                       "timed out", "connect error")):
        return "cannot reach the S3 endpoint; check AWS_ENDPOINT_URL and the network"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}"
