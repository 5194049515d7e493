"""Teacher backbones and their multi-level spatially pooled (MLSP) features.

The paper's generic semantic feature of an image is, for each POC backbone, the global average
of the stem output and of each of the four stage outputs, concatenated, then concatenated across
backbones (eq. 5). Here the five levels are the ones timm lists in ``model.feature_info`` (one
per reduction 2, 4, 8, 16, 32) and are read with ``forward_intermediates``, so every model keeps
its original state-dict layout and loads its published weights unchanged:

* timm ResNet / ResNeXt: ``act1`` (stem), ``layer1`` … ``layer4``;
* timm ResNetV2 (BiT): ``stem.conv``, ``stages.0`` … ``stages.3`` (pre-activation residual stream);
* timm EfficientNet: ``blocks.0, 1, 2, 4, 6`` — the last block at each reduction.

A backbone's name alone fixes its architecture and input normalisation; its ``weights`` field
(a state digest or ``random:<seed>``) fixes its parameters. Together they are a ``BackboneSpec``.
``backbone_specs`` gives the specs ``build_extractor`` would, without the weights in memory: the
architecture is built on the meta device and digests come from the weights digest cache.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Conv2dSame, StdConv2d
from timm.models.resnet import Bottleneck, ResNet
from torch import nn
from torch.nn import functional as F

from featurestore.errors import UserError
from featurestore.specs import BackboneSpec, ExtractorSpec
from trainers.weights import (DigestCache, check_fit, check_suffix, file_identity, load_into, loaded_digest,
                              packaged_entry, packaged_state_dict, read_state_dict, state_digest)

#: Short names for the paper's trio (Table XIII) that timm spells out.
ALIASES = {
    "bit_m_r152x4": "resnetv2_152x4_bit.goog_in21k_ft_in1k",
    "swsl_resnext101_32x8d": "resnext101_32x8d.fb_swsl_ig1b_ft_in1k",
}
#: Architectures timm lacks; the WSL-Images weights use torchvision's key layout, as timm's ResNet.
CUSTOM = {
    "ig_resnext101_32x48d": lambda: ResNet(block=Bottleneck, layers=[3, 4, 23, 3], cardinality=32, base_width=48),
}
GROUPS = {
    "paper_trio": ("bit_m_r152x4", "ig_resnext101_32x48d", "swsl_resnext101_32x8d"),
    # CPU-sized stand-in with real weights that install offline (``weights="packaged"``).
    "lite_trio": ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"),
}
#: (mean, std) on a 0..1 scale where the model's pretrained_cfg is absent or not what the weights
#: were trained with: WSL-Images used torchvision's ImageNet statistics; TensorFlow's Edge models
#: (EfficientNet-Lite) were trained on (x - 127) / 128.
NORMALISATION = {
    "ig_resnext101_32x48d": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    **{name: ((127 / 255,) * 3, (128 / 255,) * 3) for name in GROUPS["lite_trio"]},
}
MLSP_LEVELS = 5
#: Layers whose forward is one autocast-cast op on their parameters (see ``prepare_for_inference``).
AUTOCAST_BF16 = (nn.Conv2d, Conv2dSame, nn.Linear)


class BackboneError(UserError, ValueError):
    """A backbone that cannot be named, built or given the requested weights."""


def canonical_name(name: str) -> str:
    """The one name a backbone is recorded under: its alias if it has one, else its timm name."""
    name = {target: alias for alias, target in ALIASES.items()}.get(name, name)
    if name in ALIASES or name in CUSTOM:
        return name
    if timm.is_model(name):
        try:
            timm.models.get_pretrained_cfg(name)  # rejects an unknown ``.tag``
            return name
        except RuntimeError:
            pass
    raise BackboneError(f"unknown backbone {name!r}: use a timm model name, an alias "
                        f"({', '.join([*ALIASES, *CUSTOM])}) or a group ({', '.join(GROUPS)})")


def expand_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical backbone names, with groups expanded in place; a repeated backbone is an error."""
    names = [names] if isinstance(names, str) else list(names)
    out = tuple(canonical_name(n) for group in names for n in GROUPS.get(group, (group,)))
    if len(set(out)) != len(out):
        raise BackboneError(f"backbones repeat: {list(out)}")
    return out


def create_model(name: str, weights: str = "random:0") -> tuple[nn.Module, str]:
    """An eval-mode model for ``name`` and the identity of its parameters.

    ``weights``: ``random:<seed>`` (seeded init, identity ``random:<seed>``), ``packaged``,
    ``hub`` (timm's download), or a local path / ``s3://`` URI; all but random are identified
    by their state digest.
    """
    name = canonical_name(name)
    if (seed := _random_seed(weights)) is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(name)
        return model.eval(), f"random:{seed}"
    if weights == "hub":
        model = _from_hub(name)
    else:
        model = _build(name)
        state = packaged_state_dict(name, model.state_dict()) if weights == "packaged" else read_state_dict(weights)
        load_into(model, state, weights)
    return model.eval(), state_digest(model.state_dict())


def _random_seed(weights: str) -> int | None:
    """The seed of ``random:<seed>`` weights; ``None`` for any other source."""
    if weights == "random" or weights.startswith("random:"):
        seed = weights.removeprefix("random:")
        if not seed.isdigit():
            raise BackboneError(f"random weights need an explicit seed, e.g. 'random:0'; got {weights!r}")
        return int(seed)
    return None


def _build(name: str) -> nn.Module:
    return CUSTOM[name]() if name in CUSTOM else timm.create_model(ALIASES.get(name, name))


def _from_hub(name: str) -> nn.Module:
    timm_name = ALIASES.get(name, name)
    cfg = None if name in CUSTOM else timm.models.get_pretrained_cfg(timm_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise BackboneError(f"timm has no hub weights for {name!r}; pass a local file or s3:// URI as weights")
    try:
        return timm.create_model(timm_name, pretrained=True)
    except OSError as e:  # no network, no cache: the usual case on cluster workers
        raise BackboneError(f"could not download hub weights for {name!r} ({type(e).__name__}); this machine "
                            "may be offline: pass a local weights file or s3:// URI instead") from e


class Backbone(nn.Module):
    """One backbone's MLSP: float RGB [B, 3, H, W] on a 0..255 scale → [B, width] float32.

    Normalises with this backbone's own mean/std, so several backbones share one input batch.
    """

    def __init__(self, name: str, model: nn.Module, weights: str):
        super().__init__()
        info = model.feature_info
        if len(info) != MLSP_LEVELS:
            raise BackboneError(f"{name!r}: MLSP pools the stem and four stages ({MLSP_LEVELS} levels), "
                                f"timm lists {len(info)} feature levels for it")
        self.model = model
        self.channels = tuple(int(f["num_chs"]) for f in info)
        self.spec = BackboneSpec(name=name, weights=weights, layers=tuple(f["module"] for f in info),
                                 width=sum(self.channels))
        mean, std = NORMALISATION.get(name) or (model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_intermediates(self.normalise(images), indices=MLSP_LEVELS,
                                                 intermediates_only=True)
        if tuple(f.shape[1] for f in feats) != self.channels:  # cheap guard for untested architectures
            raise BackboneError(f"{self.spec.name!r}: forward_intermediates gave channels "
                                f"{[f.shape[1] for f in feats]}, feature_info says {list(self.channels)}")
        return torch.cat([f.mean(dim=(2, 3), dtype=torch.float32) for f in feats], dim=1)


def load_backbone(name: str, weights: str = "random:0") -> Backbone:
    model, identity = create_model(name, weights)
    return Backbone(canonical_name(name), model, identity)


class MLSPExtractor(nn.Module):
    """Concatenated MLSP of several backbones (eq. 5), for images at any resolution.

    ``forward`` takes uint8 or float RGB [B, 3, H, W] on a 0..255 scale (any device) and returns
    [B, width] float32 on the extractor's device. On CUDA the backbones run channels-last under
    bfloat16 autocast; on CPU in float32. Pooling always accumulates in float32.

    The weights are prepared for inference once, here, instead of on every call (see
    ``prepare_for_inference``); the specs keep the identity of the weights as loaded.
    """

    def __init__(self, backbones: Sequence[Backbone], device: str | torch.device | None = None):
        super().__init__()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda_mode = self.device.type == "cuda"
        self.backbones = nn.ModuleList(backbones).to(self.device)
        prepare_for_inference(self.backbones, bf16=self.cuda_mode)  # on the device: its own arithmetic
        if self.cuda_mode:
            self.backbones.to(memory_format=torch.channels_last)
        self.compute_dtype = "bfloat16" if self.cuda_mode else "float32"

    @property
    def specs(self) -> tuple[BackboneSpec, ...]:
        return tuple(b.spec for b in self.backbones)

    @property
    def width(self) -> int:
        return sum(s.width for s in self.specs)

    def extractor_spec(self, **fields) -> ExtractorSpec:
        """The ``ExtractorSpec`` of these features; ``fields`` set its other parts (input policy…)."""
        return ExtractorSpec(backbones=self.specs, compute_dtype=self.compute_dtype, **fields)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.cuda_mode:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.cuda_mode):
            return torch.cat([b(x) for b in self.backbones], dim=1)


def prepare_for_inference(module: nn.Module, bf16: bool) -> None:
    """Do once what the forward would redo per call, without changing its numbers.

    * timm's ``StdConv2d`` (BiT) standardises its weight on every forward: each becomes a plain
      ``Conv2d`` holding the standardised weight, computed by the very expression StdConv2d
      uses, so the convolution sees bit-identical weights (tests/test_backbones.py checks the
      GSF bytes).
    * ``bf16``: the parameters of plain convolutions and linear layers (``AUTOCAST_BF16``) are
      held in bfloat16. Autocast casts exactly these to bfloat16 on every call (round to
      nearest either way), so the result is the same and the per-call casts and their float32
      copies disappear. Norms keep float32 parameters as under autocast, and so do conv
      subclasses that compute on their weight (e.g. ``ScaledStdConv2d``). Used on CUDA; the CPU
      path stays float32.
    """
    for name, child in list(module.named_children()):
        if type(child) is StdConv2d:
            child = _folded_std_conv(child)
            setattr(module, name, child)
        else:
            prepare_for_inference(child, bf16)
        if bf16 and type(child) in AUTOCAST_BF16:
            child.to(torch.bfloat16)


def _folded_std_conv(conv: StdConv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=conv.bias is not None, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    with torch.no_grad():
        weight = F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, training=True,
                              momentum=0., eps=conv.eps).reshape_as(conv.weight)  # = StdConv2d.forward
        plain.weight.copy_(weight)
        if conv.bias is not None:
            plain.bias.copy_(conv.bias)
    return plain.eval()


def build_extractor(names: str | Sequence[str], weights: str | Mapping[str, str] = "random:0",
                    device: str | torch.device | None = None) -> MLSPExtractor:
    """An ``MLSPExtractor`` for ``names`` (timm names, aliases or groups, e.g. ``"lite_trio"``).

    ``weights`` is one source for all backbones or a mapping from backbone name (alias or
    canonical) to source; see ``create_model`` for the forms a source takes.
    """
    names = expand_names(names)
    sources = _sources(names, weights)
    return MLSPExtractor([load_backbone(n, sources[n]) for n in names], device=device)


def _sources(names: tuple[str, ...], weights: str | Mapping[str, str]) -> dict[str, str]:
    if isinstance(weights, str):
        return dict.fromkeys(names, weights)
    sources = {canonical_name(k): v for k, v in weights.items()}
    if missing := [n for n in names if n not in sources]:
        raise BackboneError(f"no weights given for {missing}")
    return sources


def backbone_specs(names: str | Sequence[str], weights: str | Mapping[str, str] = "random:0",
                   cache_dir: str | os.PathLike | None = None) -> tuple[BackboneSpec, ...]:
    """``build_extractor(names, weights, device="cpu").specs``, without holding any weights.

    Layers and widths come from the architecture built on the meta device (no parameters
    allocated). ``random:<seed>`` needs no I/O. A weights file's digest (local path, ``s3://`` URI
    or packaged ``.pth``) comes from the digest cache in ``cache_dir`` (default
    ``$AKD_CACHE_DIR/weights`` or ``~/.cache/aesthetic-kd/weights``), keyed by backbone, timm
    version and the file's identity (stat / HEAD only); on a miss the file is read once and its
    digest recorded. ``hub`` weights are downloaded and loaded as ``build_extractor`` does.
    """
    names = expand_names(names)
    sources = _sources(names, weights)
    cache: DigestCache | None = None
    try:
        specs = []
        for name in names:
            source = sources[name]
            if source == "hub":
                specs.append(load_backbone(name, "hub").spec)
                continue
            seed = _random_seed(source)
            model = _meta_build(name)
            if seed is not None:
                identity = f"random:{seed}"
            else:
                cache = cache or DigestCache.load(cache_dir)
                identity = _cached_digest(name, model, source, cache)
            specs.append(Backbone(name, model, identity).spec)
        return tuple(specs)
    finally:
        if cache is not None:
            cache.save()


def pooled_width(name: str) -> int:
    """Width of ``name``'s globally pooled output (timm's ``num_features``), without weights."""
    return _meta_build(canonical_name(name)).num_features


def _meta_build(name: str) -> nn.Module:
    """``name``'s architecture with parameters on the meta device (same names, shapes, dtypes);
    built for real should some architecture's constructor need real tensors."""
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return _build(name)
        except Exception:  # noqa: BLE001 - e.g. a constructor that reads a tensor's values
            return _build(name)


def _cached_digest(name: str, model: nn.Module, source: str, cache: DigestCache) -> str:
    """The digest ``create_model(name, source)`` yields, from ``cache`` when the file is unchanged."""
    if source == "packaged":
        entry = packaged_entry(name)
        key = ["packaged", timm.__version__, name, entry.requirement, *file_identity(str(entry.path()))]
    else:
        check_suffix(source)
        key = ["file", timm.__version__, name, *file_identity(source)]
    if (digest := cache.get(key)) is None:
        digest = _load_digest(name, model, source)
        cache.put(key, digest)
    return digest


def _load_digest(name: str, model: nn.Module, source: str) -> str:
    """Read the weights once and digest them as they would sit in ``model`` after ``load_into``."""
    if _has_tied_tensors(model):  # loading keeps one of two tied tensors: only a real load says which
        return create_model(name, source)[1]
    own = model.state_dict()
    state = packaged_state_dict(name, own) if source == "packaged" else read_state_dict(source)
    check_fit(model, own, state, source)
    return loaded_digest(own, state)


def _has_tied_tensors(model: nn.Module) -> bool:
    return (len(list(model.named_parameters(remove_duplicate=False))) != len(list(model.named_parameters()))
            or len(list(model.named_buffers(remove_duplicate=False))) != len(list(model.named_buffers())))
