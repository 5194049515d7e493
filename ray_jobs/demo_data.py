"""A synthetic-label, real-pixel demo dataset: what the images are and how they are scored.

Why it exists: AVA cannot be downloaded on these machines, yet the pipeline needs a dataset whose
aesthetic labels carry a *known* signal, so that extraction → distillation → student training can
be checked end to end ("does SRCC rise above chance, and for the right reasons?").

**Pixels are real photographs** that scikit-image ships (loaded offline, no pooch download).
Every demo image is a *subject* — a crop of one source photo under a feathered elliptical mask —
placed on a *background*, a crop of another source photo; crops get random flips and scales.
The background photo's category (it fills most of the frame) is the image's first AVA tag;
Black and White images get that tag second. Sizes vary: a random long side in a range (default
400-900 px) and one of four aspect ratios, landscape or portrait.
Then seven photographic attributes are applied with random strengths, in this order:

* exposure: gain ``2**ev`` in linear light, ``ev ~ U(-1.5, 1.5)``;    g = 1 - |ev| / 1.5
* contrast: PIL contrast factor ``k ~ U(0.4, 1.4)``;                  g = (k - 0.4) / 1.0
* colourfulness: PIL saturation ``s ~ U(0, 1.6)``, below 0.2 rendered
  Black and White (then only grey photos may also be drawn);          g = s / 1.6
* composition: subject centre ``(cx, cy) ~ U(0.05, 0.95)²`` of the frame;
  g = (1 - min(d / 0.4, 1)) * (1 - cut), d = distance to the nearest rule-of-thirds point,
  cut = share of the subject's mask outside the frame (a cut-off subject)
* sharpness: Gaussian blur, ``sigma ~ U(0, 3)`` px;                   g = 1 - sigma / 3
* noise: Gaussian luminance noise, ``sd ~ U(0, 20)`` grey levels;     g = 1 - sd / 20
* JPEG quality: saved with ``Q ~ U{10..95}``;                         g = (Q - 10) / 85

The last three live in fine detail, applied at full resolution (long side ~400-900 px): a 300-px
student view partly loses them, which is the paper's case for a full-resolution teacher.

**Score model.** ``q = 2 + 6 * sum_k w_k g_k + e``, ``e ~ N(0, 0.25)``, weights ``WEIGHTS`` (sum 1),
so q lies in about [2, 8] and, with independent attributes, has mean ~5 and sd ~0.7 like AVA's
mean scores. Votes: ``n ~ U{50..200}`` raters with a per-image spread ``sd ~ U(1.0, 1.8)``, each
voting ``clip(rint(q + sd * z), 1, 10)``; the ten counts are the AVA row.

**Train and test share no pixels.** Each source photo is cut across its longer axis into two
disjoint bands: the first two thirds feed only train images, the last third only test images
(``Source.region``). Crops are cut out of the band *before* any resampling, so no filter kernel
reaches across the cut either; ``demo_meta.json`` records every crop box for tests to check.

**Main-subject masks.** The subject is the one thing in each image with a known outline, so it is
ground truth for asking where a model looks (the paper's Fig. 8-10): ``subject_mask`` is where the
pasted ellipse is at least half opaque, clipped to the frame as the paste is.

Each image is a pure function of the seed, its index, its split and the size range: image ``i``
draws from its own ``numpy.random.default_rng([seed, i])``, so images can be made in any order or
in parallel with byte-identical results.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from featurestore.errors import UserError

VERSION = 1

#: (scikit-image sample, semantic category, trim box as fractions (x0, y0, x1, y1) or None).
#: Left out: ``clock`` (motion-blurred by design), ``moon`` (low contrast by design), ``cell``,
#: ``page``/``text`` (not photographs of scenes) and the samples that need a download.
SOURCES = (
    ("astronaut", "Portraiture", None),
    ("chelsea", "Animals", None),
    ("coffee", "Food and Drink", None),
    ("rocket", "Science and Technology", None),
    ("stereo_motorcycle", "Transportation", None),
    ("hubble_deep_field", "Astrophotography", (0.0, 0.0, 1.0, 0.9)),  # bottom rows are black
    ("immunohistochemistry", "Macro", None),
    ("retina", "Macro", (0.2, 0.2, 0.8, 0.8)),  # the fundus, without the black surround
    ("camera", "Portraiture", None),
    ("coins", "Still Life", None),
    ("brick", "Architecture", None),
    ("grass", "Nature", None),
    ("gravel", "Abstract", None),
)
BLACK_AND_WHITE = "Black and White"
TAGS = tuple(sorted({category for _, category, _ in SOURCES} | {BLACK_AND_WHITE}))  # tag id = position + 1

TEST_BAND = 1 / 3  # share of each source's long axis reserved for test images
WEIGHTS = {"exposure": 0.20, "contrast": 0.12, "colourfulness": 0.12, "composition": 0.16,
           "sharpness": 0.16, "noise": 0.12, "jpeg": 0.12}
EV_MAX, CONTRAST_RANGE, SATURATION_MAX, BW_BELOW = 1.5, (0.4, 1.4), 1.6, 0.2
BLUR_MAX, NOISE_MAX, JPEG_RANGE = 3.0, 20.0, (10, 95)
THIRDS_DISTANCE_MAX, FEATHER = 0.4, 0.2
Q_BASE, Q_SPAN, Q_NOISE = 2.0, 6.0, 0.25
RATERS, RATER_SD = (50, 200), (1.0, 1.8)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels, end exclusive


class DemoDataError(UserError):
    """A request the demo generator refuses, or a missing dependency; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """One trimmed source photo (RGB uint8; grey ones stacked) and its train/test bands."""

    name: str
    category: str
    gray: bool
    pixels: np.ndarray

    def region(self, split: str) -> Box:
        h, w = self.pixels.shape[:2]
        if w >= h:
            cut = round(w * (1 - TEST_BAND))
            return (0, 0, cut, h) if split == "train" else (cut, 0, w, h)
        cut = round(h * (1 - TEST_BAND))
        return (0, 0, w, cut) if split == "train" else (0, cut, w, h)


@dataclass(frozen=True)
class Crop:
    source: str
    box: Box
    flip: bool


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines one image's bytes and labels; JSON-ready via ``asdict``."""

    image_id: str
    split: str
    size: tuple[int, int]  # width, height
    background: Crop
    subject: Crop
    subject_size: tuple[int, int]
    subject_xy: tuple[int, int]  # top-left corner in the frame; may lie outside it
    black_and_white: bool
    attributes: dict[str, float]  # the random strengths, in their physical units
    goodness: dict[str, float]
    noise_seed: int
    q: float
    votes: tuple[int, ...]
    rater_sd: float
    tags: tuple[int, int]


def load_sources() -> dict[str, Source]:
    """The sample photos, decoded once (they ship inside scikit-image; no download)."""
    try:
        from skimage import data
    except ImportError:
        raise DemoDataError("the demo dataset is built from scikit-image's sample photos: "
                            "pip install 'scikit-image>=0.26'") from None
    sources = {}
    for name, category, trim in SOURCES:
        pixels = getattr(data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo pair: the left view
        if trim is not None:
            h, w = pixels.shape[:2]
            pixels = pixels[round(trim[1] * h):round(trim[3] * h), round(trim[0] * w):round(trim[2] * w)]
        gray = pixels.ndim == 2
        pixels = np.ascontiguousarray(np.stack([pixels] * 3, -1) if gray else pixels[..., :3])
        sources[name] = Source(name, category, gray, pixels)
    return sources


def split_of(index: int, test_fraction: float) -> str:
    """Every ``1/test_fraction``-th image is a test image: exact counts, independent of the seed."""
    return "test" if math.floor((index + 1) * test_fraction) > math.floor(index * test_fraction) else "train"


def sample_image(seed: int, index: int, image_id: str, split: str, sources: dict[str, Source],
                 long_side: tuple[int, int]) -> ImageSpec:
    """Draw image ``index``'s content, attributes, latent quality and votes (no pixels yet)."""
    rng = np.random.default_rng([seed, index])
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    long = int(rng.integers(long_side[0], long_side[1] + 1))
    short = max(1, round(long / aspect))
    width, height = (long, short) if rng.random() < 0.7 else (short, long)

    saturation = rng.uniform(0, SATURATION_MAX)
    black_and_white = saturation < BW_BELOW
    pool = [s for s in sources.values() if black_and_white or not s.gray]  # grey photos only in B&W images
    subject_src, background_src = (pool[i] for i in rng.choice(len(pool), 2, replace=False))
    background = _crop(rng, background_src, split, width / height, (0.6, 1.0))
    subject = _crop(rng, subject_src, split, rng.uniform(0.75, 1.33), (0.5, 0.9))
    sub_w, sub_h = subject.box[2] - subject.box[0], subject.box[3] - subject.box[1]
    scale = rng.uniform(0.45, 0.75) * min(width, height) / max(sub_w, sub_h)
    subject_size = (max(1, round(sub_w * scale)), max(1, round(sub_h * scale)))
    cx, cy = rng.uniform(0.05, 0.95, 2)
    subject_xy = (round(cx * width - subject_size[0] / 2), round(cy * height - subject_size[1] / 2))

    attributes = {
        "exposure_ev": rng.uniform(-EV_MAX, EV_MAX),
        "contrast": rng.uniform(*CONTRAST_RANGE),
        "saturation": saturation,
        "thirds_distance": min(math.hypot(cx - px, cy - py) for px in (1 / 3, 2 / 3) for py in (1 / 3, 2 / 3)),
        "cut_fraction": _cut_fraction(subject_size, subject_xy, (width, height)),
        "blur_sigma": rng.uniform(0, BLUR_MAX),
        "noise_sd": rng.uniform(0, NOISE_MAX),
        "jpeg_quality": int(rng.integers(JPEG_RANGE[0], JPEG_RANGE[1] + 1)),
    }
    attributes = {k: round(v, 4) for k, v in attributes.items()}
    goodness = goodness_of(attributes)
    q = Q_BASE + Q_SPAN * sum(WEIGHTS[k] * g for k, g in goodness.items()) + rng.normal(0, Q_NOISE)
    rater_sd = rng.uniform(*RATER_SD)
    ratings = np.clip(np.rint(q + rater_sd * rng.standard_normal(int(rng.integers(RATERS[0], RATERS[1] + 1)))), 1, 10)
    votes = tuple(int(v) for v in np.bincount(ratings.astype(int), minlength=11)[1:])
    tags = (TAGS.index(background_src.category) + 1, TAGS.index(BLACK_AND_WHITE) + 1 if black_and_white else 0)
    return ImageSpec(image_id, split, (width, height), background, subject, subject_size, subject_xy,
                     bool(black_and_white), attributes, goodness, int(rng.integers(2**63)), round(float(q), 4),
                     votes, round(float(rater_sd), 4), tags)


def goodness_of(a: dict[str, float]) -> dict[str, float]:
    """Each attribute's goodness in [0, 1] (table in the module docstring); keys as ``WEIGHTS``."""
    return {
        "exposure": 1 - abs(a["exposure_ev"]) / EV_MAX,
        "contrast": (a["contrast"] - CONTRAST_RANGE[0]) / (CONTRAST_RANGE[1] - CONTRAST_RANGE[0]),
        "colourfulness": a["saturation"] / SATURATION_MAX,
        "composition": (1 - min(a["thirds_distance"] / THIRDS_DISTANCE_MAX, 1)) * (1 - a["cut_fraction"]),
        "sharpness": 1 - a["blur_sigma"] / BLUR_MAX,
        "noise": 1 - a["noise_sd"] / NOISE_MAX,
        "jpeg": (a["jpeg_quality"] - JPEG_RANGE[0]) / (JPEG_RANGE[1] - JPEG_RANGE[0]),
    }


def render(spec: ImageSpec, sources: dict[str, Source]) -> bytes:
    """The JPEG bytes of ``spec``: compose, then tone, colour, blur, noise, compression."""
    a = spec.attributes
    frame = _cut(sources[spec.background.source], spec.background).resize(spec.size, Image.Resampling.BICUBIC)
    subject = _cut(sources[spec.subject.source], spec.subject).resize(spec.subject_size, Image.Resampling.BICUBIC)
    mask = Image.fromarray(np.rint(_ellipse(*spec.subject_size) * 255).astype(np.uint8))
    frame.paste(subject, spec.subject_xy, mask)  # PIL clips the parts outside the frame
    frame = frame.point(_exposure_lut(a["exposure_ev"]) * 3)
    frame = ImageEnhance.Contrast(frame).enhance(a["contrast"])
    if spec.black_and_white:
        frame = frame.convert("L").convert("RGB")
    else:
        frame = ImageEnhance.Color(frame).enhance(a["saturation"])
    frame = frame.filter(ImageFilter.GaussianBlur(a["blur_sigma"]))
    pixels = np.asarray(frame, dtype=np.float32)
    # Luminance grain, one field for all channels: a B&W image stays grey, and it is 3× cheaper.
    noise = np.random.default_rng(spec.noise_seed).standard_normal((*pixels.shape[:2], 1), dtype=np.float32)
    noise *= a["noise_sd"]
    pixels += noise
    np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=a["jpeg_quality"])
    return buffer.getvalue()


def subject_mask(size: tuple[int, int], subject_size: tuple[int, int], subject_xy: tuple[int, int]) -> np.ndarray:
    """[H, W] bool for a ``size`` = (W, H) frame: True where the subject pasted at ``subject_xy``
    with ``subject_size`` is at least half opaque (its feathered ellipse ≥ 0.5), clipped to the frame.
    Takes the three ``ImageSpec`` fields that place the subject, so a dataset's ``demo_meta.json``
    is enough to rebuild every mask."""
    (width, height), (sub_w, sub_h), (x, y) = size, subject_size, subject_xy
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(width, x + sub_w), min(height, y + sub_h)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = (_ellipse(sub_w, sub_h) >= 0.5)[y0 - y:y1 - y, x0 - x:x1 - x]
    return mask


def mask_png(mask: np.ndarray) -> bytes:
    """A bool mask as a greyscale PNG: 255 inside, 0 outside."""
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, "PNG")
    return buffer.getvalue()


def _crop(rng: np.random.Generator, source: Source, split: str, aspect: float, share: tuple[float, float]) -> Crop:
    """A random box of width/height ``aspect`` inside ``source``'s band for ``split``, spanning a
    random ``share`` of the largest such box."""
    x0, y0, x1, y1 = source.region(split)
    w, h = x1 - x0, y1 - y0
    fit_w, fit_h = (h * aspect, h) if w / h > aspect else (w, w / aspect)
    s = rng.uniform(*share)
    cw, ch = max(1, min(w, round(fit_w * s))), max(1, min(h, round(fit_h * s)))
    left, top = x0 + int(rng.integers(w - cw + 1)), y0 + int(rng.integers(h - ch + 1))
    return Crop(source.name, (left, top, left + cw, top + ch), bool(rng.random() < 0.5))


def _cut(source: Source, crop: Crop) -> Image.Image:
    """The crop's own pixels only (sliced before resampling, so nothing outside the box leaks in)."""
    x0, y0, x1, y1 = crop.box
    image = Image.fromarray(source.pixels[y0:y1, x0:x1])
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if crop.flip else image


def _ellipse(width: int, height: int) -> np.ndarray:
    """The subject's mask: 1 inside an inscribed ellipse, fading to 0 at its rim over ``FEATHER``."""
    y, x = np.ogrid[:height, :width]
    r = np.hypot((x + 0.5) / width * 2 - 1, (y + 0.5) / height * 2 - 1)
    return np.clip((1 - r) / FEATHER, 0, 1)


def _cut_fraction(size: tuple[int, int], xy: tuple[int, int], frame: tuple[int, int]) -> float:
    """Share of the subject's mask weight that falls outside the frame (a cut-off subject)."""
    mask = _ellipse(*size)
    x0, y0 = max(0, -xy[0]), max(0, -xy[1])
    x1, y1 = min(size[0], frame[0] - xy[0]), min(size[1], frame[1] - xy[1])
    inside = mask[y0:y1, x0:x1].sum() if x1 > x0 and y1 > y0 else 0.0
    return float(1 - inside / mask.sum())


def _exposure_lut(ev: float) -> list[int]:
    """Per-level map for a gain of ``2**ev`` applied in linear light (sRGB approximated by gamma 2.2):
    overexposure clips highlights, underexposure crushes shadows."""
    levels = np.arange(256) / 255.0
    return np.rint(255 * np.clip(levels**2.2 * 2.0**ev, 0, 1) ** (1 / 2.2)).astype(int).tolist()
