"""The explanation stage (the paper's Fig. 8-10): do the students and teachers look at the main subject?

For each selected image and each model, the LayerCAM of the model's target score
(``trainers.layercam``: a student's predicted mean score, a teacher's top-1 logit) is computed,
brought into the image's own frame and compared with the image's main-subject mask:

* a student sees its view (``view``, default each checkpoint's own), as in training. A resize
  view covers the whole image, so its map is resized onto the image; for ``pad_crop`` the
  padding is dropped and what the crop cut off gets 0 (the student never saw it);
* a teacher sees the full-resolution image, as in extraction.

**mIoU vs threshold (Fig. 10).** For p = 5, 10, …, 95 each map is thresholded at the p-th
percentile of its own values (foreground: the values above it, so p = 70 keeps the top 30 % as in
Fig. 8), the IoU with the mask is taken per image and averaged over the images: one curve per
model. Thresholding by each map's own percentile compares *where* models look, not how strongly.
``auc`` is the area under a curve over the percentile axis divided by the axis' width (0.9): the
curve's mean height, in [0, 1].

Masks are ``<masks>/<image_id>.png``, the image's size, foreground where ≥ 128;
``ray_jobs.make_demo_data`` writes them into the demo dataset's ``masks/``.

Written to ``out``: ``miou.json`` (images, models, the curves and their areas), ``miou.png`` (the
curves), ``maps/<label>.npz`` (each model's float32 [H, W] maps by image id: the very numbers the
curves come from) and ``grid-NN.png`` in Fig. 8's layout: per image, a row with the image and each
model's map over it, and a row with the mask and each map thresholded at ``grid_percentile``.
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from featurestore import sources
from featurestore.errors import UserError
from featurestore.files import atomic_write_bytes, atomic_write_text
from ray_jobs.config import ConfigError, option
from ray_jobs.runtime import Progress, log
from ray_jobs.stages.dataset_input import DatasetConfig, load_table
from ray_jobs.stages.report import new_figure, save_figure
from trainers.backbones import load_backbone
from trainers.images import ImageDecoder, pad_crop, resize
from trainers.labels import ROW_SPLITS
from trainers.layercam import Target, explain, normalise, student_target, teacher_target
from trainers.student import load_student, parse_view

JOB = "explain"
PERCENTILES = tuple(range(5, 100, 5))
MASK_DIR = "masks"
CURVES_JSON, CURVES_PNG, MAPS_DIR = "miou.json", "miou.png", "maps"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ExplainError(UserError, ValueError):
    """An image, mask or model the explanation cannot use; the message names it."""


@dataclass(frozen=True)
class StudentModel:
    checkpoint: str = option(help="student checkpoint: directory or s3:// prefix with model.safetensors, student.json")
    label: str = option(help="name of its curve and grid column, e.g. kd or baseline")
    layers: tuple[str, ...] = option((), help="target layers, by name in the backbone (e.g. layer4); "
                                              "default its last stage; several are fused by max")


@dataclass(frozen=True)
class TeacherModel:
    backbone: str = option(help="object-classification backbone: a timm name or alias")
    weights: str = option(help="packaged, hub, random:<seed>, a file path or an s3:// URI")
    label: str | None = option(None, help="name of its curve and grid column; default the backbone's name")
    layers: tuple[str, ...] = option((), help="target layers, by name in the backbone; default its last stage")

    @property
    def name(self) -> str:
        return self.label or self.backbone


@dataclass(frozen=True)
class ExplainConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    masks: str | None = option(None, help="folder or s3:// prefix of <image_id>.png subject masks; "
                                          "default <dataset.path>/masks (format ava)")
    image_ids: tuple[str, ...] = option((), help="the images to explain; default the first n of split")
    split: str = option("test", help=f"where the first n images come from: one of {', '.join(ROW_SPLITS)}")
    n: int = option(16, help="images to explain when image_ids is not given")
    students: tuple[StudentModel, ...] = option((), help="students: [{checkpoint, label, layers}]")
    teachers: tuple[TeacherModel, ...] = option((), help="teacher backbones: [{backbone, weights, label, layers}]")
    view: str | None = option(None, help="the students' view (resize:<side>, pad_crop:<pad>:<crop>); "
                                         "default each checkpoint's own")
    device: str = option("auto", help="auto (cuda when available), cpu, cuda or cuda:<index>")
    out: str = option("explain", help="output folder (local)")
    grid_percentile: int = option(70, help="threshold percentile of the grids' mask row (Fig. 8: 70)")
    grid_images: int = option(4, help="images per grid PNG")

    def __post_init__(self):
        if self.dataset.path is None:
            raise ConfigError("dataset.path is required: the images to explain")
        if self.masks is None and self.dataset.format != "ava":
            raise ConfigError(f"masks is required for dataset.format={self.dataset.format} "
                              "(only an AVA-layout dataset has a default, its masks/ folder)")
        if not self.students and not self.teachers:
            raise ConfigError("give at least one model: students: [{checkpoint, label}] or teachers: "
                              "[{backbone, weights}]")
        labels = self.labels
        if bad := [label for label in labels if not _LABEL.fullmatch(label)]:
            raise ConfigError(f"model label {bad[0]!r} must be letters, digits, '.', '_' or '-' (it names files)")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"model labels repeat: {list(labels)}; give each model its own label")
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ConfigError("image_ids repeat an image; list each once")
        if self.split not in ROW_SPLITS:
            raise ConfigError(f"split {self.split!r} is not one of {ROW_SPLITS}")
        if self.n < 1 or self.grid_images < 1:
            raise ConfigError("n and grid_images must be ≥ 1")
        if not 0 < self.grid_percentile < 100:
            raise ConfigError(f"grid_percentile must lie in 1..99, got {self.grid_percentile}")
        if self.view is not None:
            parse_view(self.view)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} must be auto, cpu, cuda or cuda:<index>")
        if self.out.startswith("s3://"):
            raise ConfigError("out must be a local folder; copy it to S3 afterwards")

    @property
    def labels(self) -> tuple[str, ...]:
        return (*(s.label for s in self.students), *(t.name for t in self.teachers))


@dataclass(frozen=True, eq=False)
class Picture:
    """One image to explain: decoded pixels (uint8 HWC, maybe shrunk to the decoder's pixel cap),
    its original (H, W) and its mask at that size."""

    image_id: str
    pixels: torch.Tensor
    size: tuple[int, int]
    mask: np.ndarray


@dataclass(frozen=True)
class ExplainResult:
    """``curves[label]``: mIoU per percentile; ``auc[label]``: its normalised area; ``files``: what was written."""

    out: str
    images: tuple[str, ...]
    models: dict[str, dict]
    curves: dict[str, list[dict]]
    auc: dict[str, float]
    files: dict[str, object]
    seconds: float


# -- mIoU -------------------------------------------------------------------------------------------


def iou_curve(cam: np.ndarray, mask: np.ndarray, percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """IoU of ``cam > percentile_p(cam)`` with the bool ``mask`` (non-empty, same shape), for each p."""
    thresholds = np.percentile(cam, percentiles)
    ious = []
    for t in thresholds:
        foreground = cam > t
        ious.append((foreground & mask).sum() / (foreground | mask).sum())
    return np.array(ious)


def miou_curve(cams: Sequence[np.ndarray], masks: Sequence[np.ndarray],
               percentiles: Sequence[float] = PERCENTILES) -> np.ndarray:
    """Mean over images of :func:`iou_curve`: Fig. 10's curve of one model."""
    return np.mean([iou_curve(c, m, percentiles) for c, m in zip(cams, masks)], axis=0)


def curve_area(curve: Sequence[float], percentiles: Sequence[float] = PERCENTILES) -> float:
    """Trapezoidal area under ``curve`` over the percentile axis (as fractions), over the axis' width."""
    x, y = np.asarray(percentiles, float) / 100, np.asarray(curve, float)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


# -- maps in the image's frame ------------------------------------------------------------------------


def _batch(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    return pixels.permute(2, 0, 1)[None].to(device)


def student_map(target: Target, pixels: torch.Tensor, view: str, size: tuple[int, int],
                layers: Sequence[str], device: torch.device) -> torch.Tensor:
    """The student's map [H, W] over the whole image (``size``), seen through ``view``."""
    kind, (a, b) = parse_view(view)
    if kind == "resize":
        return explain(target, _batch(resize(pixels, (a, b)), device), size, layers)[0]
    pad, crop = a, b
    cam = explain(target, _batch(pad_crop(pixels, pad, crop), device), (crop, crop), layers)[0]
    h, w = pixels.shape[:2]
    if max(h, w) > pad:  # pad_crop first shrinks the image to fit the pad, the same way
        scale = pad / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    canvas = cam.new_zeros((pad, pad))
    start = (pad - crop) // 2
    canvas[start:start + crop, start:start + crop] = cam
    top, left = (pad - h) // 2, (pad - w) // 2
    region = canvas[top:top + h, left:left + w]
    return normalise(F.interpolate(region[None, None], size=size, mode="bilinear", align_corners=False)[0])[0]


def teacher_map(target: Target, pixels: torch.Tensor, size: tuple[int, int], layers: Sequence[str],
                device: torch.device) -> torch.Tensor:
    """The teacher's map [H, W] of the full-resolution image."""
    return explain(target, _batch(pixels, device), size, layers)[0]


# -- inputs -----------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExplainError(f"device={name}, but this machine has no CUDA GPU; use device=cpu or auto")
    return torch.device(name)


def select_images(cfg: ExplainConfig) -> list[tuple[str, str]]:
    """``(image_id, uri)`` of the images to explain, in the order asked."""
    table = load_table(cfg.dataset)
    if cfg.dataset.split:
        table = table.resplit(cfg.dataset.split_spec())
    ids = [str(i) for i in table.image_ids]
    if cfg.image_ids:
        row_of = {image_id: row for row, image_id in enumerate(ids)}
        if unknown := [i for i in cfg.image_ids if i not in row_of]:
            raise ExplainError(f"image {unknown[0]!r} is not in dataset {cfg.dataset.path} "
                               f"({len(unknown)} of the {len(cfg.image_ids)} image_ids are not)")
        rows = [row_of[i] for i in cfg.image_ids]
    else:
        rows = [r for r in range(len(ids)) if cfg.split == "all" or table.splits[r] == cfg.split][:cfg.n]
        if not rows:
            raise ExplainError(f"dataset {cfg.dataset.path} has no {cfg.split!r} images; set split=all or image_ids")
    for row in rows:
        if table.missing[row]:
            raise ExplainError(f"image {ids[row]}: {table.uris[row]} not found")
    return [(ids[r], str(table.uris[r])) for r in rows]


def read_mask(folder: str, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """The bool mask ``<folder>/<image_id>.png`` (foreground ≥ 128), checked to be ``size`` and non-empty."""
    uri = sources.join(folder, f"{image_id}.png")
    try:
        data = sources.read_bytes(uri)
    except sources.MissingSourceError:
        raise ExplainError(f"mask of image {image_id}: {uri} not found; masks are <masks>/<image_id>.png "
                           "(a demo dataset made by ray_jobs.make_demo_data has them in masks/)") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            mask = np.asarray(im.convert("L")) >= 128
    except (UnidentifiedImageError, OSError) as exc:
        raise ExplainError(f"mask of image {image_id}: {uri} is not a readable image ({exc})") from None
    if mask.shape != size:
        raise ExplainError(f"mask {uri} is {mask.shape[1]}×{mask.shape[0]}, its image {size[1]}×{size[0]}; "
                           "a mask must have its image's size")
    if not mask.any():
        raise ExplainError(f"mask {uri} has no foreground (no pixel ≥ 128): there is no subject to find")
    return mask


def read_pictures(cfg: ExplainConfig, chosen: list[tuple[str, str]]) -> list[Picture]:
    """Read and decode the images and read their masks; any that cannot be used stops the job."""
    masks = cfg.masks or sources.join(sources.normalize(cfg.dataset.path), MASK_DIR)
    decoder = ImageDecoder("auto")
    pictures = []
    for image_id, uri in chosen:
        try:
            data = sources.read_bytes(uri)
        except sources.MissingSourceError:
            raise ExplainError(f"image {image_id}: {uri} not found") from None
        (decoded,) = decoder.decode([data])
        if not decoded.ok:
            raise ExplainError(f"image {image_id}: {uri} cannot be decoded: {decoded.reason}")
        pixels = decoded.image.cpu()
        size = tuple(decoded.scaled_from or pixels.shape[:2])
        pictures.append(Picture(image_id, pixels, size, read_mask(masks, image_id, size)))
    return pictures


# -- the stage --------------------------------------------------------------------------------------


def load_model(model: StudentModel | TeacherModel, cfg: ExplainConfig, device: torch.device
               ) -> tuple[str, Target, Callable[[Picture], torch.Tensor], dict]:
    """``(label, target, picture → map [H, W], what is explained)`` of one configured model."""
    if isinstance(model, StudentModel):
        student, spec, _ = load_student(model.checkpoint)
        target, view = student_target(student.to(device)), cfg.view or spec.view
        info = {"kind": "student", "checkpoint": model.checkpoint, "backbone": spec.backbone, "view": view}
        return model.label, target, lambda p: student_map(target, p.pixels, view, p.size, model.layers, device), info
    target = teacher_target(load_backbone(model.backbone, model.weights).to(device))
    info = {"kind": "teacher", "backbone": model.backbone, "weights": model.weights, "view": "full resolution"}
    return model.name, target, lambda p: teacher_map(target, p.pixels, p.size, model.layers, device), info


def explain_models(cfg: ExplainConfig, pictures: list[Picture], device: torch.device
                   ) -> tuple[dict[str, list[np.ndarray]], dict[str, dict]]:
    """Every model's maps of ``pictures`` and what was explained in it, by label; one model in
    memory at a time."""
    maps, models = {}, {}
    for model in (*cfg.students, *cfg.teachers):
        label, target, map_of, info = load_model(model, cfg, device)
        layers = model.layers or target.layers
        models[label] = {**info, "target": target.kind, "layers": list(layers)}
        log(JOB, f"{label}: LayerCAM of the {target.kind} at {', '.join(layers)} ({info['view']})")
        progress = Progress(JOB, len(pictures), unit="images")
        maps[label] = []
        for picture in pictures:
            maps[label].append(map_of(picture).float().cpu().numpy())
            progress.add(1)
    return maps, models


def write_maps(out: Path, maps: dict[str, list[np.ndarray]], pictures: list[Picture]) -> dict[str, str]:
    paths = {}
    (out / MAPS_DIR).mkdir(exist_ok=True)
    for label, cams in maps.items():
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{p.image_id: cam for p, cam in zip(pictures, cams)})
        atomic_write_bytes(out / MAPS_DIR / f"{label}.npz", buffer.getvalue())
        paths[label] = str(out / MAPS_DIR / f"{label}.npz")
    return paths


def plot_curves(out: Path, curves: dict[str, list[dict]], auc: dict[str, float], n: int) -> str:
    figure = new_figure(6.5, 4.2)
    axes = figure.subplots()
    for label, curve in curves.items():
        axes.plot([c["percentile"] for c in curve], [c["miou"] for c in curve], marker="o", markersize=3,
                  label=f"{label} (area {auc[label]:.3f})")
    axes.set_xlabel("segmentation threshold (percentile of each map)")
    axes.set_ylabel("mIoU with the main-subject masks")
    axes.set_xlim(0, 100)
    axes.set_ylim(0, 1)
    axes.set_title(f"main subject vs LayerCAM, {n} images", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return str(out / save_figure(figure, out, CURVES_PNG))


def plot_grids(out: Path, maps: dict[str, list[np.ndarray]], pictures: list[Picture], per_grid: int,
               percentile: int) -> list[str]:
    """Fig. 8's layout: per image, the image and each map over it; below, the mask and each map
    thresholded at ``percentile`` of its values, titled with that mask's IoU."""
    names = []
    for start in range(0, len(pictures), per_grid):
        chunk = pictures[start:start + per_grid]
        figure = new_figure(2.2 * (1 + len(maps)), 4.2 * len(chunk))
        panels = figure.subplots(2 * len(chunk), 1 + len(maps), squeeze=False)
        for i, picture in enumerate(chunk, start):
            top, bottom = panels[2 * (i - start)], panels[2 * (i - start) + 1]
            image, extent = picture.pixels.numpy(), (0, picture.size[1], picture.size[0], 0)  # pixels may be shrunk
            top[0].imshow(image, extent=extent)
            top[0].set_title(f"image {picture.image_id}", fontsize=8)
            bottom[0].imshow(picture.mask, cmap="gray", vmin=0, vmax=1)
            bottom[0].set_title("subject mask", fontsize=8)
            for j, (label, cams) in enumerate(maps.items(), 1):
                cam = cams[i]
                top[j].imshow(image, extent=extent)
                top[j].imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
                top[j].set_title(label, fontsize=8)
                segment = cam > np.percentile(cam, percentile)
                bottom[j].imshow(segment, cmap="gray", vmin=0, vmax=1)
                bottom[j].set_title(f"> p{percentile}: IoU {iou_curve(cam, picture.mask, [percentile])[0]:.2f}",
                                    fontsize=8)
        for axes in panels.ravel():
            axes.axis("off")
        names.append(str(out / save_figure(figure, out, f"grid-{start // per_grid + 1:02d}.png")))
    return names


def explain_images(cfg: ExplainConfig) -> ExplainResult:
    """Explain every model on the chosen images, score the maps against the masks, write the outputs."""
    started = time.perf_counter()
    device = _device(cfg.device)
    pictures = read_pictures(cfg, select_images(cfg))
    log(JOB, f"{len(pictures)} images with subject masks; {len(cfg.labels)} models on {device}")
    maps, models = explain_models(cfg, pictures, device)
    masks = [p.mask for p in pictures]
    curves = {label: [{"percentile": p, "miou": float(v)} for p, v in zip(PERCENTILES, miou_curve(cams, masks))]
              for label, cams in maps.items()}
    auc = {label: curve_area([c["miou"] for c in curve]) for label, curve in curves.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    images = tuple(p.image_id for p in pictures)
    atomic_write_text(out / CURVES_JSON, json.dumps({"images": images, "percentiles": PERCENTILES, "models": models,
                                                     "curves": curves, "auc": auc}, indent=1) + "\n")
    files = {"curves": str(out / CURVES_JSON), "plot": plot_curves(out, curves, auc, len(pictures)),
             "maps": write_maps(out, maps, pictures),
             "grids": plot_grids(out, maps, pictures, cfg.grid_images, cfg.grid_percentile)}
    for label in curves:
        log(JOB, f"{label}: mIoU {curves[label][PERCENTILES.index(70)]['miou']:.3f} at p70, area {auc[label]:.3f}")
    return ExplainResult(out=str(out), images=images, models=models, curves=curves, auc=auc, files=files,
                         seconds=round(time.perf_counter() - started, 2))
