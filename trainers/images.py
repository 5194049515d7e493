"""Decode encoded images into RGB uint8 HWC tensors: DALI first, Pillow where DALI cannot.

The teacher extraction job sees every image at full resolution, so one bad file must cost one
row, never a batch or a job. DALI decodes a whole batch per run (``device="mixed"`` on the GPU's
nvJPEG, ``"cpu"`` on libjpeg-turbo & co.), but one undecodable sample makes the run raise for
all of them and declares the pipeline invalid. So:

1. Cheap checks first, on the bytes alone: empty input, a JPEG without its EOI marker, a PNG
   without its IEND chunk, a WebP shorter than its RIFF size → "truncated image", whichever
   decoder would see the file. DALI and Pillow each reject most truncated files, but not all
   (Pillow decodes a PNG missing only its IEND) and not in the same words; and an aesthetic
   model should not score a half-grey picture. Then Pillow reads the header (lazily, ~50 µs):
   format and size.
2. DALI decodes the batch. If the run raises, the pipeline is rebuilt (~7 ms on CPU) and the
   batch's images are decoded one by one, so only the bad ones fail.
3. Whatever DALI cannot decode (GIF, ICO, …; a sample its run rejected) goes to Pillow, made
   to agree with DALI: EXIF orientation applied, 16-bit grey scaled by 1/257 and rounded,
   alpha dropped (not composited: DALI drops it, and both decoders must give the same pixels;
   transparent areas show whatever colour is stored under them), CMYK converted as DALI does.
4. Still undecodable → ``Decoded(image=None, reason=...)`` with a short reason.

Size policy: images over ``max_pixels`` are decoded (alone, to bound memory), then downscaled
with aspect ratio kept, and ``scaled_from`` records the original (H, W). Pillow's
decompression-bomb *warning* is silenced because that cap is ours; its *error*
(above 2 × ``PIL.Image.MAX_IMAGE_PIXELS``, ~179 M pixels by default) is kept as the hard
ceiling for every decoder, reported as "too large"; raise ``PIL.Image.MAX_IMAGE_PIXELS`` to
admit bigger files.

All resampling (the ``max_pixels`` cap, the student's ``resize`` view, ``pad_crop``) is one
torch function applied to the decoded tensor on its own device, so a view does not depend on
which decoder produced the pixels: bilinear with antialias, which matches Pillow's BILINEAR
resize to within a level (CPU uses torch's uint8 kernel, CUDA a float one; they differ by ≤ 1).
"""

from __future__ import annotations

import importlib.util
import io
import math
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

#: Pillow's names for the formats DALI's image decoder reads; the rest go straight to Pillow.
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "JPEG2000", "WEBP"})


@dataclass(frozen=True, eq=False)
class Decoded:
    """One input's outcome. ``image`` is uint8 HWC RGB (on CUDA for ``device="mixed"``) or None,
    and then ``reason`` says why. ``decoder``: "dali-cpu", "dali-mixed", "pil", or "none" when
    the input was rejected before any decoder ran. ``scaled_from``: original (H, W) when the image
    was downscaled to fit ``max_pixels``."""

    image: torch.Tensor | None
    reason: str | None
    decoder: str
    scaled_from: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


class _Rejected(Exception):
    """An input that cannot be decoded, carrying the result that says why."""

    def __init__(self, reason: str, decoder: str):
        super().__init__(reason)
        self.decoded = Decoded(None, reason, decoder)


def _jpeg_truncated(data: bytes) -> bool:
    """No EOI marker after the first scan starts. Walking the header segments skips an EXIF
    thumbnail's EOI; inside entropy-coded data 0xFF is always followed by 0x00 or a restart
    marker, so any 0xFFD9 after that is the image's own end: usually the last two bytes, else
    found by a C-speed search, which lets data follow it (motion photos, padding)."""
    pos = 2
    while (pos := data.find(b"\xff", pos)) >= 0 and pos + 4 <= len(data):
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan
            return not data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9", pos) < 0
        if marker == 0xD9:  # EOI before any scan: not truncated, just not a picture
            return False
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return True


def _png_truncated(data: bytes) -> bool:
    """Walk the PNG's chunks to IEND."""
    pos = 8
    while pos + 8 <= len(data):
        if data[pos + 4:pos + 8] == b"IEND":
            return False
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    return True


def _truncated(data: bytes) -> bool:
    if data[:2] == b"\xff\xd8":
        return _jpeg_truncated(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png_truncated(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open (header only) after the byte-level checks; raises ``_Rejected``."""
    if not data:
        raise _Rejected("empty file", "none")
    if _truncated(data):
        raise _Rejected("truncated image", "none")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        reason = f"too large ({str(e).rstrip('.')}; raise PIL.Image.MAX_IMAGE_PIXELS to allow)"
        raise _Rejected(reason, "none") from None
    except UnidentifiedImageError:
        raise _Rejected("not an image (cannot identify format)", "pil") from None
    except Exception as e:  # a plugin that recognised the format but not this header
        raise _Rejected(f"corrupt image ({e})", "pil") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Pillow image → HWC uint8 RGB, the way DALI's decoder renders the same file."""
    ImageOps.exif_transpose(im, in_place=True)
    if im.mode.startswith("I"):  # 16/32-bit grey: Pillow's convert would clip at 255
        grey = np.rint(np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))  # drops alpha, as DALI does


def decode_with_pil(data: bytes) -> Decoded:
    """Decode one image at full resolution with Pillow only: the fallback and the benchmark's
    baseline. Same checks and same pixels as the DALI path."""
    try:
        with _open(data) as im:
            rgb = _to_rgb(im)
    except _Rejected as e:
        return e.decoded
    except Exception as e:
        reason = "truncated image" if "truncated" in str(e) else f"corrupt image ({e})"
        return Decoded(None, reason, "pil")
    return Decoded(torch.from_numpy(rgb), None, "pil")


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """HWC uint8 image → exactly ``size`` (H, W), bilinear with antialias, on the image's device."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = image.permute(2, 0, 1).unsqueeze(0)
    if x.is_cuda:  # no uint8 kernel for antialiased interpolation on CUDA
        x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x[0].permute(1, 2, 0).contiguous()


def pad_crop(image: torch.Tensor, pad: int = 800, crop: int = 640) -> torch.Tensor:
    """Table VII's view: pad to pad×pad (centred, zeros), then centre-crop crop×crop. An image
    with a side over ``pad`` is first shrunk so its long side is ``pad`` (the paper does not say;
    this keeps the whole picture in the padded frame)."""
    h, w = image.shape[:2]
    if max(h, w) > pad:
        scale = pad / max(h, w)
        image = resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))
        h, w = image.shape[:2]
    canvas = image.new_zeros((pad, pad, 3))
    top, left = (pad - h) // 2, (pad - w) // 2
    canvas[top:top + h, left:left + w] = image
    start = (pad - crop) // 2
    return canvas[start:start + crop, start:start + crop].contiguous()


def _fit(image: torch.Tensor, max_pixels: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Shrink an image over ``max_pixels`` to fit, keeping its aspect ratio; return the original
    size when it was shrunk."""
    h, w = image.shape[:2]
    if h * w <= max_pixels:
        return image, None
    scale = math.sqrt(max_pixels / (h * w))
    return resize(image, (max(1, int(h * scale)), max(1, int(w * scale)))), (h, w)


def _dali_installed() -> bool:
    try:  # find_spec raises, rather than returning None, when there is no `nvidia` package at all
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


class ImageDecoder:
    """Decode batches of encoded images; one ``Decoded`` per input, in order.

    ``device``: "mixed" (DALI on the GPU), "cpu" (DALI on the CPU), "pil" (Pillow only), or
    "auto": mixed with CUDA, else cpu with DALI installed, else pil — fixed at construction,
    because a mixed pipeline cannot even be built without a GPU. ``batch_size`` bounds one DALI
    run; ``decode`` takes any number of inputs. Optional views, at most one: ``resize=(H, W)``
    (the student's input; the paper's default is (300, 300)) or ``pad_crop=(pad, crop)``
    (Table VII: (800, 640)); both apply after the ``max_pixels`` cap.
    """

    def __init__(self, device: str = "auto", *, max_pixels: int = 4096 * 4096, num_threads: int = 2,
                 batch_size: int = 32, resize: tuple[int, int] | None = None,
                 pad_crop: tuple[int, int] | None = None):
        if device == "auto":
            device = "mixed" if torch.cuda.is_available() else "cpu" if _dali_installed() else "pil"
        if device not in ("mixed", "cpu", "pil"):
            raise ValueError(f"ImageDecoder device must be 'auto', 'mixed', 'cpu' or 'pil', not {device!r}")
        if device == "mixed" and not torch.cuda.is_available():
            raise ValueError("ImageDecoder device='mixed' needs a CUDA GPU; use 'cpu' or 'auto'")
        if resize is not None and pad_crop is not None:
            raise ValueError("ImageDecoder takes resize or pad_crop, not both")
        if pad_crop is not None and not 0 < pad_crop[1] <= pad_crop[0]:
            raise ValueError(f"pad_crop=(pad, crop) needs 0 < crop <= pad, got {pad_crop}")
        if max_pixels < 1 or batch_size < 1:
            raise ValueError("ImageDecoder max_pixels and batch_size must be positive")
        self.device, self.max_pixels, self.num_threads, self.batch_size = device, max_pixels, num_threads, batch_size
        self.resize, self.pad_crop = resize, pad_crop
        self._device_id = torch.cuda.current_device() if device == "mixed" else None
        self.output_device = torch.device("cuda", self._device_id) if device == "mixed" else torch.device("cpu")
        self._name = f"dali-{device}"
        self._pipe = None if device == "pil" else self._build()

    def decode(self, encoded: Sequence[bytes]) -> list[Decoded]:
        raw = [decode_with_pil(data) for data in encoded] if self.device == "pil" else self._decode_dali(encoded)
        return [self._finish(r) for r in raw]

    def _build(self):
        """The DALI pipeline, built once and reused; rebuilt only after a failed run."""
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def
        def graph():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, batch=True)
            return fn.decoders.image(encoded, device=self.device, output_type=types.RGB)

        # prefetch_queue_depth=1: each run() decodes exactly the batch just fed.
        pipe = graph(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                     prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _decode_dali(self, encoded: Sequence[bytes]) -> list[Decoded]:
        results: list[Decoded | None] = [None] * len(encoded)
        normal, large = [], []
        for i, data in enumerate(encoded):
            try:
                with _open(data) as im:
                    fmt, pixels = im.format, im.width * im.height
            except _Rejected as e:
                results[i] = e.decoded
                continue
            if fmt not in DALI_FORMATS:
                results[i] = decode_with_pil(data)
            else:
                (normal if pixels <= self.max_pixels else large).append(i)
        # Oversized images run alone so peak memory is one of them, not a batch of them.
        batches = [normal[k:k + self.batch_size] for k in range(0, len(normal), self.batch_size)]
        for batch in batches + [[i] for i in large]:
            for i, result in zip(batch, self._dali_batch([encoded[i] for i in batch])):
                results[i] = result
        return results

    def _dali_batch(self, batch: list[bytes]) -> list[Decoded]:
        try:
            images = self._run(batch)
        except RuntimeError:
            self._pipe = self._build()  # DALI declares a pipeline invalid after a failed run
            if len(batch) == 1:
                return [decode_with_pil(batch[0])]
            return [result for data in batch for result in self._dali_batch([data])]
        return [Decoded(image, None, self._name) for image in images]

    def _run(self, batch: list[bytes]) -> list[torch.Tensor]:
        self._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in batch])
        (out,) = self._pipe.run()
        if self.device == "cpu":
            return [torch.from_numpy(out.at(i)) for i in range(len(batch))]  # at() returns a copy
        from nvidia.dali.plugin.pytorch import feed_ndarray

        # Device-to-device copies into torch-owned memory, ordered on torch's stream: no host
        # round trip, and the tensors outlive DALI's output buffers.
        stream = torch.cuda.current_stream(self.output_device)
        images = []
        for i in range(len(batch)):
            image = torch.empty(out[i].shape(), dtype=torch.uint8, device=self.output_device)
            images.append(feed_ndarray(out[i], image, cuda_stream=stream))
        return images

    def _finish(self, result: Decoded) -> Decoded:
        """Move to the output device, cap at ``max_pixels``, apply the view."""
        if result.image is None:
            return result
        image, scaled_from = _fit(result.image.to(self.output_device), self.max_pixels)
        if self.resize is not None:
            image = resize(image, self.resize)
        elif self.pad_crop is not None:
            image = pad_crop(image, *self.pad_crop)
        return replace(result, image=image, scaled_from=scaled_from)
