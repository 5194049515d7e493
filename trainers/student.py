"""The student (paper §III-C, Fig. 3 lower stream): one CNN backbone on a resized view of the image.

    images ─ backbone (timm, global pooling) ─ pooled [B, C] ─ fc: ReLU(Linear(C, F)) = f_s ─ head ─ logits

* ``f_s`` is the student aesthetic feature, trained against the teacher's f_t with MSE (eq. 7).
  The teacher's f_t is the output of a ReLU (``trainers.distiller``), so f_s ends in a ReLU too:
  both live in [0, ∞) and MSE never asks the student for values the teacher cannot produce.
* ``head`` is Linear(F, out): 10 logits for ``label="distribution"`` (softmax at use, D_s), one
  for ``"binary"`` (sigmoid, eq. 12) or ``"score"`` (the mean score itself, eq. 13). Turning
  logits into predictions is ``trainers.distiller.prediction`` — the same rule as the teacher's.
* Semantic guidance (Table XII, ``trainers.labels`` "Semantic tags"). With ``semantic:
  multimodal`` the two-hot tag vector v [B, T] goes through two FC layers,
  ``s = ReLU(Linear(ReLU(Linear(v))))`` [B, ``SEMANTIC_WIDTH``], and the head reads the visual
  feature and s side by side: ``head(concat(f_s, s))``. f_s stays purely visual, so the KD
  feature term still compares like with like. With ``tag_head`` (the ``multitask`` loss) a
  ``tag_head`` Linear(F, T) predicts the tag vector's logits from f_s alone (the paper: "with
  the visual feature"); only the loss asks for them, so scoring an image never needs tags.
* The backbone sees one fixed, enumerated *view* of each image (``StudentSpec.view``): the
  stored teacher knowledge belongs to the image, so random augmentation would make it stale
  (DESIGN §3). ``resize:300`` is the paper's default, ``pad_crop:800:640`` Table VII's.
* Inputs are RGB NCHW on a 0..255 scale, uint8 or float, exactly what ``ImageDecoder`` gives;
  the student normalises with its backbone's own mean/std, so loaders never need to know it.

Checkpoints are two files in a directory (or under an ``s3://`` prefix): ``model.safetensors``
(the whole state dict: ``backbone.*``, ``fc.*``, ``head.*``, and ``semantic.*`` / ``tag_head.*`` when
the spec has them) and ``student.json`` (format, spec,
state digest of the weights, the caller's ``extra``). They are written in that order, each to a
temporary name and renamed, so a directory with ``student.json`` holds a complete checkpoint;
the digest catches a weights file from another save (a crash while overwriting a checkpoint).
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from featurestore import sources
from featurestore.errors import UserError
from featurestore.files import atomic_write_bytes
from trainers.backbones import NORMALISATION, canonical_name, create_model
from trainers.labels import LABELS, NUM_BINS, SEMANTIC, prediction
from trainers.images import ImageDecoder, _dali_installed
from trainers.weights import PACKAGED, load_into, read_state_dict, state_digest

WEIGHTS_FILE, SPEC_FILE = "model.safetensors", "student.json"
CHECKPOINT_FORMAT = 1
READ_THREADS = 8  # image reads are I/O bound (S3 especially)
#: Width of the multi-modal branch's two FC layers; the paper does not give one. A checkpoint's
#: weights are loaded strictly, so a change here cannot go unnoticed with old checkpoints.
SEMANTIC_WIDTH = 128

_VIEW = re.compile(r"resize:(\d+)(?:x(\d+))?|pad_crop:(\d+):(\d+)")


class StudentError(UserError, ValueError):
    """A student spec or checkpoint that cannot be used; the message names it and what to do."""


def parse_view(view: str) -> tuple[str, tuple[int, int]]:
    """``"resize:300"`` → ("resize", (300, 300)); ``"resize:HxW"`` → ("resize", (H, W));
    ``"pad_crop:800:640"`` → ("pad_crop", (800, 640)): the ``ImageDecoder`` keyword and value."""
    match = _VIEW.fullmatch(view)
    if match is None:
        raise StudentError(f"view {view!r} must be 'resize:<side>', 'resize:<H>x<W>' or 'pad_crop:<pad>:<crop>'")
    h, w, pad, crop = (int(g) if g else None for g in match.groups())
    kind, size = ("resize", (h, w or h)) if h is not None else ("pad_crop", (pad, crop))
    if min(size) < 1 or (kind == "pad_crop" and size[1] > size[0]):
        raise StudentError(f"view {view!r}: sizes must be positive and the crop no larger than the pad")
    return kind, size


def view_size(view: str) -> tuple[int, int]:
    """(H, W) of the images the backbone sees under ``view``."""
    kind, size = parse_view(view)
    return size if kind == "resize" else (size[1], size[1])


@dataclass(frozen=True)
class StudentSpec:
    """Everything that determines a student's architecture, input and initialisation.

    ``weights`` are the backbone's initial weights, in the forms of ``backbones.create_model``:
    ``hub``, ``packaged``, ``random:<seed>``, a file path or an ``s3://`` URI (a full timm
    state dict; its classifier is dropped). The fc and head are always randomly initialised
    from ``seed``. ``freeze_backbone`` trains only fc and head (Table V, "non-trainable").

    ``semantic="multimodal"`` adds the tag-input branch and ``tag_head`` the tag prediction of
    the ``multitask`` loss (module docstring); both need ``tag_width``, the width of the dataset's
    two-hot tag vector (``trainers.labels.tag_width``), which is 0 for a student without either.
    """

    backbone: str
    weights: str = "random:0"
    feature_width: int = 512
    label: str = "distribution"
    view: str = "resize:300"
    freeze_backbone: bool = False
    seed: int = 0
    semantic: str | None = None
    tag_width: int = 0
    tag_head: bool = False

    def __post_init__(self):
        name = canonical_name(self.backbone)  # BackboneError (a ValueError) names the unknown backbone
        if not self.weights:
            raise StudentError("weights must be hub, packaged, random:<seed>, a file path or an s3:// URI")
        if self.weights.startswith("random") and not re.fullmatch(r"random:\d+", self.weights):
            raise StudentError(f"random weights need an explicit seed, e.g. 'random:0'; got {self.weights!r}")
        if self.weights == "packaged" and name not in PACKAGED:
            raise StudentError(f"no packaged weights for {name!r}; packaged weights exist for {', '.join(PACKAGED)}")
        if not isinstance(self.feature_width, int) or self.feature_width < 1:
            raise StudentError(f"feature_width must be a positive integer (the teacher's f_t width), "
                               f"got {self.feature_width!r}")
        if self.label not in LABELS:
            raise StudentError(f"label {self.label!r} is not one of {LABELS}")
        parse_view(self.view)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise StudentError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.semantic is not None and self.semantic not in SEMANTIC:
            raise StudentError(f"semantic {self.semantic!r} is not one of {', '.join(SEMANTIC)} "
                               "(or unset: images only)")
        if not isinstance(self.tag_width, int) or self.tag_width < 0:
            raise StudentError(f"tag_width must be a non-negative integer, got {self.tag_width!r}")
        uses_tags = self.semantic is not None or self.tag_head
        if uses_tags != (self.tag_width > 0):
            raise StudentError(f"tag_width={self.tag_width} with semantic={self.semantic!r}, tag_head={self.tag_head}: "
                               "a student reading or predicting tags needs the dataset's tag width (> 0), "
                               "any other has tag_width 0")

    @property
    def output_width(self) -> int:
        return NUM_BINS if self.label == "distribution" else 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudentSpec:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise StudentError(f"student spec has unknown keys {unknown}; known keys: {sorted(known)}")
        if "backbone" not in data:
            raise StudentError("student spec needs a 'backbone'")
        return cls(**data)


class Student(nn.Module):
    """``forward(images, tags)`` → ``(f_s [B, F], logits [B, out])`` for RGB NCHW images on 0..255
    and two-hot tag vectors [B, T]; ``predict_tags=True`` adds the tag head's logits [B, T].

    Only a multi-modal student reads ``tags`` (it needs them); the others ignore them, so a
    caller may pass what its batch holds.

    With ``spec.freeze_backbone`` the backbone's parameters do not require gradients *and* the
    backbone stays in eval mode even after ``.train()``: a frozen backbone must not drift
    through BatchNorm running statistics either, or "frozen" features would still change.
    """

    def __init__(self, spec: StudentSpec, backbone: nn.Module):
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.fc = nn.Linear(backbone.num_features, spec.feature_width)
            merged = spec.feature_width + (SEMANTIC_WIDTH if spec.semantic == "multimodal" else 0)
            self.head = nn.Linear(merged, spec.output_width)
            if spec.semantic == "multimodal":
                self.semantic = nn.Sequential(nn.Linear(spec.tag_width, SEMANTIC_WIDTH), nn.ReLU(),
                                              nn.Linear(SEMANTIC_WIDTH, SEMANTIC_WIDTH), nn.ReLU())
            if spec.tag_head:
                self.tag_head = nn.Linear(spec.feature_width, spec.tag_width)
        mean, std = NORMALISATION.get(canonical_name(spec.backbone)) or (
            backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"])
        # Not persistent: they follow from the backbone's name, so checkpoints hold weights only.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        if spec.freeze_backbone:
            self.backbone.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Student:
        super().train(mode)
        if self.spec.freeze_backbone:
            self.backbone.eval()
        return self

    def pool(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature [B, num_features] of uint8-range images: what a frozen
        student's FC layers see, and what ``trainers.student_features`` stores once per image."""
        return self.backbone((images.float() - self.mean) / self.std)

    def forward(self, images: torch.Tensor, tags: torch.Tensor | None = None,
                predict_tags: bool = False, pooled: bool = False) -> tuple[torch.Tensor, ...]:
        """``pooled=True``: ``images`` are already :meth:`pool`'s output (a frozen student trained
        from stored pooled features; the backbone is skipped)."""
        if pooled and not self.spec.freeze_backbone:
            raise StudentError("pooled features stand in for the backbone only when it is frozen (freeze_backbone)")
        f_s = torch.relu(self.fc(images.float() if pooled else self.pool(images)))
        merged = f_s
        if self.spec.semantic == "multimodal":
            if tags is None or tags.shape != (len(f_s), self.spec.tag_width):
                got = "none" if tags is None else f"shape {tuple(tags.shape)}"
                raise StudentError(f"a multimodal student needs two-hot tags [{len(images)}, {self.spec.tag_width}] "
                                   f"with its images, got {got}")
            merged = torch.cat([f_s, self.semantic(tags.to(f_s.dtype))], dim=1)
        if not predict_tags:
            return f_s, self.head(merged)
        if not self.spec.tag_head:
            raise StudentError("predict_tags needs a student with a tag head (StudentSpec.tag_head, loss multitask)")
        return f_s, self.head(merged), self.tag_head(f_s)


def _backbone(spec: StudentSpec, weights: str) -> nn.Module:
    model, _ = create_model(spec.backbone, weights)
    model.reset_classifier(0)  # global pooling stays: the backbone outputs the pooled feature
    return model


def build_student(spec: StudentSpec) -> Student:
    """A new student in eval mode: backbone weights from ``spec.weights``, fc and head from ``spec.seed``."""
    return Student(spec, _backbone(spec, spec.weights))


def decoder_for(spec: StudentSpec, device: str | torch.device = "auto", **options) -> ImageDecoder:
    """An ``ImageDecoder`` producing ``spec``'s view. ``device`` is the decoder's own
    ("auto", "mixed", "cpu", "pil") or the torch device the student runs on: cuda → "mixed"
    (images land on the GPU), cpu → DALI on the CPU when installed, else Pillow. ``options``
    go to ``ImageDecoder`` (batch_size, num_threads, max_pixels)."""
    if isinstance(device, torch.device):
        device = "mixed" if device.type == "cuda" else "cpu" if _dali_installed() else "pil"
    kind, size = parse_view(spec.view)
    return ImageDecoder(device, **options, **{kind: size})


def count_params(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of ``model`` (Table VIII's "Params"); only those requiring grad if ``trainable``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous state dict without DistributedDataParallel's ``module.`` prefix."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def save_student(directory: str | os.PathLike, model: nn.Module, spec: StudentSpec,
                 extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` then ``student.json`` into the local ``directory``.

    ``model`` may be wrapped in DDP. ``extra`` is JSON the caller wants kept with the weights
    (epoch, metrics, knowledge entry key). ``student.json`` records the weights' state digest,
    so a weights file from another save is detected at load time. Upload to S3 is the caller's
    (Ray Train's checkpoint upload); ``load_student`` reads either.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _state(model)
    document = {"format": CHECKPOINT_FORMAT, "spec": spec.to_json(), "state_digest": state_digest(state),
                "extra": dict(extra or {})}
    text = json.dumps(document, indent=2, allow_nan=False)  # fails before any file is written
    atomic_write_bytes(directory / WEIGHTS_FILE, safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_bytes(directory / SPEC_FILE, (text + "\n").encode())
    return directory


def read_checkpoint(checkpoint: str | os.PathLike) -> tuple[StudentSpec, dict[str, torch.Tensor], dict[str, Any]]:
    """``(spec, state dict, extra)`` of a checkpoint in a local directory or under an ``s3://``
    prefix, checked: ``student.json`` must be a student checkpoint and ``model.safetensors`` the
    weights it was saved with (state digest). Every way of loading a checkpoint goes through here,
    so a corrupt or mixed checkpoint is a ``StudentError``, never silently loaded."""
    root = sources.normalize(str(checkpoint))
    spec_uri, weights_uri = sources.join(root, SPEC_FILE), sources.join(root, WEIGHTS_FILE)
    try:
        document = json.loads(sources.read_bytes(spec_uri))
    except sources.MissingSourceError:
        raise StudentError(f"checkpoint {root}: no {SPEC_FILE}; a checkpoint is a directory or s3:// prefix "
                           f"holding {WEIGHTS_FILE} and {SPEC_FILE} (written by save_student)") from None
    except (sources.SourceError, ValueError) as exc:
        raise StudentError(f"checkpoint {spec_uri} could not be read: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT \
            or not isinstance(document.get("spec"), dict) or "state_digest" not in document:
        raise StudentError(f"{spec_uri}: not a student checkpoint of format {CHECKPOINT_FORMAT}")
    spec = StudentSpec.from_json(document["spec"])
    state = read_state_dict(weights_uri)
    if state_digest(state) != document["state_digest"]:
        raise StudentError(f"checkpoint {root}: {WEIGHTS_FILE} is not the file {SPEC_FILE} was saved with "
                           "(state digest differs); the checkpoint is corrupt or mixed from two saves")
    return spec, state, document.get("extra", {})


def load_student(checkpoint: str | os.PathLike) -> tuple[Student, StudentSpec, dict[str, Any]]:
    """``(student in eval mode on CPU, spec, extra)`` from a local directory or an ``s3://`` prefix.

    The architecture is built from the spec without reading ``spec.weights`` (the checkpoint
    holds every weight), then loaded strictly and checked against the recorded digest.
    """
    spec, state, extra = read_checkpoint(checkpoint)
    model = Student(spec, _backbone(spec, "random:0"))
    load_into(model, state, sources.join(sources.normalize(str(checkpoint)), WEIGHTS_FILE))
    return model, spec, extra


def restore_student(model: Student, checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (resuming a run) and return its ``extra``.

    The same checks as :func:`load_student` (a corrupt or mixed checkpoint is a ``StudentError``),
    and the checkpoint must have been saved for ``model.spec``: a run resumed under its name with
    another student would otherwise continue from weights that are not its own.
    """
    spec, state, extra = read_checkpoint(checkpoint)
    if spec != model.spec:
        ours, theirs = model.spec.to_json(), spec.to_json()
        changed = ", ".join(f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours if ours[k] != theirs[k])
        raise StudentError(f"checkpoint {checkpoint} belongs to another student ({changed}); "
                           "give this run another name to start it afresh")
    load_into(model, state, sources.join(sources.normalize(str(checkpoint)), WEIGHTS_FILE))
    return extra


@dataclass(frozen=True, eq=False)
class Scores:
    """Per-image student predictions: ``output`` [N, 10] distributions, or [N] probabilities or
    scores (NaN where not scored); ``reasons[i]`` says why image i was not scored, else None."""

    output: np.ndarray
    reasons: tuple[str | None, ...]

    @property
    def ok(self) -> np.ndarray:
        return np.array([r is None for r in self.reasons], dtype=bool)


def score_images(model: Student, uris: Sequence[str], batch_size: int = 32,
                 on_batch: Callable[[int], None] = lambda n: None, tags: np.ndarray | None = None) -> Scores:
    """Read, decode (the student's view) and score ``uris`` in batches on the model's device.

    ``tags``: the images' two-hot tag vectors [N, T] (``trainers.labels.two_hot`` in the
    student's ``tag_width``), row-aligned with ``uris``; a multi-modal student needs them.

    An image that cannot be read or decoded, or gets a non-finite prediction, is not scored and
    gets a reason; nothing else stops.
    Puts the model in eval mode. ``on_batch(n)`` is called after each batch of n images.
    """
    model.eval()
    if model.spec.semantic is not None and (tags is None or np.shape(tags) != (len(uris), model.spec.tag_width)):
        raise StudentError(f"this student is {model.spec.semantic}: scoring needs each image's two-hot tags "
                           f"[{len(uris)}, {model.spec.tag_width}], got {'none' if tags is None else np.shape(tags)}")
    device = next(model.parameters()).device
    decoder = decoder_for(model.spec, device, batch_size=batch_size)
    shape = (len(uris), model.spec.output_width) if model.spec.label == "distribution" else (len(uris),)
    output, reasons = np.full(shape, np.nan, np.float32), [None] * len(uris)

    def read(uri: str) -> bytes | None:
        try:
            return sources.read_bytes(uri)
        except sources.SourceError as exc:
            return str(exc)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(uris), batch_size):
            rows, encoded = [], []
            for row, data in enumerate(pool.map(read, uris[start:start + batch_size]), start):
                if isinstance(data, str):
                    reasons[row] = f"cannot read: {data}"
                else:
                    rows.append(row)
                    encoded.append(data)
            images = {}
            for row, decoded in zip(rows, decoder.decode(encoded)):
                if decoded.ok:
                    images[row] = decoded.image
                else:
                    reasons[row] = f"cannot decode {uris[row]}: {decoded.reason}"
            if images:
                batch = torch.stack(list(images.values())).permute(0, 3, 1, 2).to(device)
                batch_tags = None if tags is None else torch.as_tensor(np.asarray(tags, np.float32)[list(images)],
                                                                       device=device)
                with torch.inference_mode():
                    predicted = prediction(model.spec.label, model(batch, batch_tags)[1]).float().cpu().numpy()
                for row, value in zip(images, predicted):
                    if np.isfinite(value).all():
                        output[row] = value
                    else:
                        reasons[row] = "non-finite prediction (a diverged checkpoint?)"
            on_batch(min(batch_size, len(uris) - start))
    return Scores(output, tuple(reasons))
