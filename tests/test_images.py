"""Image decoding: DALI (CPU here) and Pillow agree, and bad inputs fail alone with a reason."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from trainers.images import ImageDecoder, decode_with_pil


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    """The reference: Pillow's own decode of the same bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def mean_abs_diff(image: torch.Tensor, reference: np.ndarray) -> float:
    assert tuple(image.shape) == reference.shape
    return float(np.abs(image.cpu().numpy().astype(np.int16) - reference).mean())


ASTRONAUT = skimage.data.astronaut()  # 512×512 RGB
COFFEE = skimage.data.coffee()  # 400×600 RGB
CAMERA = skimage.data.camera()  # 512×512 grey
JPEG = encode(ASTRONAUT, "JPEG", quality=90)


def corrupt_huffman_table(jpeg: bytes) -> bytes:
    """A JPEG whose header Pillow reads but whose Huffman table libjpeg rejects."""
    at = jpeg.find(b"\xff\xc4")
    return jpeg[:at + 5] + b"\xff" * 16 + jpeg[at + 21:]


def with_thumbnail(jpeg: bytes) -> bytes:
    """The JPEG with a whole small JPEG (its own EOI included) in an APP15 header segment, where
    cameras put EXIF thumbnails: a search for 0xFFD9 would find the thumbnail's."""
    thumbnail = encode(ASTRONAUT[::16, ::16], "JPEG")
    return jpeg[:2] + b"\xff\xef" + struct.pack(">H", len(thumbnail) + 2) + thumbnail + jpeg[2:]


def png_with_bad_idat_crc(png: bytes) -> bytes:
    """libpng (DALI) refuses an IDAT CRC mismatch; Pillow does not check it and decodes exactly."""
    at = png.find(b"IDAT")
    crc_at = at + 4 + int.from_bytes(png[at - 4:at], "big")
    return png[:crc_at] + bytes([png[crc_at] ^ 0xFF]) + png[crc_at + 1:]


def png_header_only(width: int, height: int) -> bytes:
    """A structurally complete PNG that claims a size (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def cpu():
    return ImageDecoder("cpu", batch_size=4)


@pytest.fixture(scope="module")
def pil():
    return ImageDecoder("pil")


def test_auto_picks_cpu_without_cuda_and_rejects_bad_arguments():
    if not torch.cuda.is_available():
        assert ImageDecoder("auto").device == "cpu"
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            ImageDecoder("mixed")
    with pytest.raises(ValueError, match="device must be"):
        ImageDecoder("gpu")
    with pytest.raises(ValueError, match="not both"):
        ImageDecoder("cpu", resize=(300, 300), pad_crop=(800, 640))


def test_mixed_sizes_decode_like_pil_and_reuse_one_pipeline(cpu):
    jpegs = [JPEG, encode(COFFEE, "JPEG"), encode(CAMERA, "JPEG"), encode(ASTRONAUT[:123, :457], "JPEG")]
    pngs = [encode(COFFEE, "PNG"), encode(ASTRONAUT[100:, 7:300], "PNG")]
    pipe = cpu._pipe
    # 6 inputs through a batch size of 4: a full run then a smaller last one.
    results = cpu.decode(jpegs + pngs)
    assert [r.decoder for r in results] == ["dali-cpu"] * 6 and cpu._pipe is pipe
    for data, result in zip(jpegs, results):
        assert result.image.dtype == torch.uint8 and result.image.device.type == "cpu"
        assert mean_abs_diff(result.image, pil_rgb(data)) < 2  # IDCTs may differ slightly
    assert np.array_equal(results[4].image.numpy(), COFFEE)
    assert np.array_equal(results[5].image.numpy(), ASTRONAUT[100:, 7:300])
    assert [tuple(r.image.shape) for r in cpu.decode([pngs[1], jpegs[1]])] == [(412, 293, 3), (400, 600, 3)]


RGBA = np.dstack([ASTRONAUT, np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8)])
GREY16 = (np.arange(256 * 256, dtype=np.uint16) * 7).reshape(256, 256)
ORIENTED = Image.fromarray(ASTRONAUT[:, :300])
_exif = ORIENTED.getexif()
_exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display

#: name → (bytes, expected pixels or None for "close to Pillow's decode", tolerance)
DECODABLE = {
    "grey jpeg": (encode(CAMERA, "JPEG"), np.dstack([CAMERA] * 3), 3),
    "cmyk jpeg": (encode(Image.fromarray(ASTRONAUT).convert("CMYK"), "JPEG"), ASTRONAUT, 6),
    "rgb png": (encode(ASTRONAUT, "PNG"), ASTRONAUT, 0),
    "rgba png (alpha dropped)": (encode(RGBA, "PNG"), ASTRONAUT, 0),
    "palette png": (encode(Image.fromarray(ASTRONAUT).convert("P"), "PNG"), None, 0),
    "16-bit grey png": (encode(GREY16, "PNG"), np.dstack([np.rint(GREY16 / 257)] * 3), 0),
    "lossless webp": (encode(ASTRONAUT, "WEBP", lossless=True), ASTRONAUT, 0),
    "lossy webp": (encode(ASTRONAUT, "WEBP", quality=90), ASTRONAUT, 6),
    "gif": (encode(Image.fromarray(COFFEE).convert("P"), "GIF"), None, 0),
    "jpeg with trailing data": (JPEG + b"\0" * 64 + b"motion photo", ASTRONAUT, 3),
    "jpeg with a thumbnail": (with_thumbnail(JPEG), ASTRONAUT, 3),
    "exif-rotated jpeg": (encode(ORIENTED, "JPEG", quality=95, exif=_exif.tobytes()),
                          np.rot90(ASTRONAUT[:, :300], -1), 3),
}


@pytest.mark.parametrize("name", DECODABLE)
def test_formats_decode_to_the_same_rgb_with_dali_and_pil(name, cpu, pil):
    data, expected, tolerance = DECODABLE[name]
    expected = pil_rgb(data) if expected is None else np.asarray(expected, dtype=np.int16)
    for decoder in (cpu, pil):
        (result,) = decoder.decode([data])
        assert result.ok, result.reason
        assert result.image.shape[2] == 3 and result.image.dtype == torch.uint8
        assert mean_abs_diff(result.image, expected) <= tolerance, (name, result.decoder)
    assert cpu.decode([data])[0].decoder == ("pil" if name == "gif" else "dali-cpu")


PNG = encode(ASTRONAUT, "PNG")
#: name → (bytes, reason substring, decoder recorded)
UNDECODABLE = {
    "empty": (b"", "empty file", "none"),
    "truncated jpeg": (JPEG[:len(JPEG) // 2], "truncated image", "none"),
    "jpeg missing its last bytes": (JPEG[:-2], "truncated image", "none"),
    "truncated jpeg with a thumbnail": (with_thumbnail(JPEG)[:-1000], "truncated image", "none"),
    "truncated progressive jpeg": (encode(ASTRONAUT, "JPEG", progressive=True)[:-300], "truncated image", "none"),
    "png missing only IEND": (PNG[:-12], "truncated image", "none"),  # Pillow alone would decode it
    "truncated webp": (encode(ASTRONAUT, "WEBP")[:-100], "truncated image", "none"),
    "random bytes": (np.random.default_rng(0).bytes(4096), "not an image (cannot identify format)", "pil"),
    "text file": (b"id,score\n1,5.5\n" * 50, "not an image (cannot identify format)", "pil"),
    "bad huffman table": (corrupt_huffman_table(JPEG), "corrupt image", "pil"),
    "decompression bomb": (png_header_only(20000, 20000), "too large", "none"),
}


@pytest.mark.parametrize("name", UNDECODABLE)
def test_bad_inputs_fail_with_the_same_reason_with_dali_and_pil(name, cpu, pil):
    data, reason, decoder = UNDECODABLE[name]
    for result in (cpu.decode([data])[0], pil.decode([data])[0], decode_with_pil(data)):
        assert result.image is None and reason in result.reason and result.decoder == decoder


def test_a_bad_image_fails_alone_and_order_is_kept(cpu):
    good = [JPEG, encode(COFFEE, "JPEG"), encode(CAMERA, "PNG")]
    inputs = [good[0], b"", corrupt_huffman_table(JPEG), good[1], png_with_bad_idat_crc(PNG), JPEG[:-500], good[2]]
    results = cpu.decode(inputs)
    assert [r.ok for r in results] == [True, False, False, True, True, False, True]
    assert [r.decoder for r in results] == ["dali-cpu", "none", "pil", "dali-cpu", "pil", "none", "dali-cpu"]
    # The run that raised (bad Huffman table, bad CRC) did not disturb its neighbours.
    for result, data in zip([results[0], results[3], results[6]], good):
        assert mean_abs_diff(result.image, pil_rgb(data)) < 2
    assert np.array_equal(results[4].image.numpy(), ASTRONAUT)  # DALI refused it, Pillow decoded it
    assert "corrupt image" in results[2].reason and results[5].reason == "truncated image"
    assert mean_abs_diff(cpu.decode([JPEG])[0].image, pil_rgb(JPEG)) < 2  # the rebuilt pipeline works


@pytest.fixture(scope="module")
def huge_jpeg():
    """10000 wide × 9000 high (90 M pixels: over Pillow's 89.5 M warning limit), built cheaply."""
    image = Image.fromarray(ASTRONAUT).resize((10000, 9000), Image.Resampling.NEAREST)
    return encode(image, "JPEG", quality=50)


def test_max_pixels_downscales_keeping_aspect_and_records_original_size(huge_jpeg):
    decoder = ImageDecoder("cpu", max_pixels=1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the decompression-bomb warning is ours to handle, not the caller's
        small_jpeg = encode(COFFEE, "JPEG")
        big, small = decoder.decode([huge_jpeg, small_jpeg])
    h, w = big.image.shape[:2]
    assert big.scaled_from == (9000, 10000) and big.decoder == "dali-cpu"
    assert 0.99e6 <= h * w <= 1e6 and abs(w / h - 10000 / 9000) < 0.005
    reference = np.asarray(Image.fromarray(ASTRONAUT).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    assert mean_abs_diff(big.image, reference) < 4
    assert small.scaled_from is None and small.image.shape == (400, 600, 3)


def test_resize_gives_exact_size_like_pils_bilinear(cpu):
    views = ImageDecoder("cpu", resize=(300, 300)).decode([JPEG, encode(COFFEE, "PNG"), encode(CAMERA, "GIF")])
    assert [tuple(v.image.shape) for v in views] == [(300, 300, 3)] * 3
    reference = np.asarray(Image.fromarray(COFFEE).resize((300, 300), Image.Resampling.BILINEAR), dtype=np.int16)
    assert mean_abs_diff(views[1].image, reference) < 1
    # A view does not depend on the decoder that produced the pixels.
    pil_views = ImageDecoder("pil", resize=(300, 300)).decode([encode(COFFEE, "PNG")])
    assert torch.equal(pil_views[0].image, views[1].image)


def test_pad_crop_centres_the_picture_in_a_640_square():
    decoder = ImageDecoder("cpu", pad_crop=(800, 640))
    tall_small = np.full((200, 100, 3), 200, np.uint8)  # fits: padded as is
    wide_large = np.full((1000, 1600, 3), 90, np.uint8)  # long side 1600 → shrunk to 800×500 first
    small, large = (r.image for r in decoder.decode([encode(tall_small, "PNG"), encode(wide_large, "PNG")]))
    assert small.shape == large.shape == (640, 640, 3)
    # 200×100 sits at rows 300..500, cols 350..450 of the 800 frame; the crop starts at 80.
    expected = np.zeros((640, 640, 3), np.uint8)
    expected[220:420, 270:370] = 200
    assert np.array_equal(small.numpy(), expected)
    # 500×800 sits at rows 150..650 of the frame → rows 70..570 of the crop, full width.
    assert (large[70:570] == 90).all() and (large[:70] == 0).all() and (large[570:] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decode_matches_cpu_decode(cpu):
    inputs = [JPEG, encode(COFFEE, "JPEG"), encode(CAMERA, "JPEG"), PNG, b"", corrupt_huffman_table(JPEG)]
    gpu = ImageDecoder("mixed", batch_size=4).decode(inputs)
    ref = cpu.decode(inputs)
    assert [r.ok for r in gpu] == [r.ok for r in ref] == [True, True, True, True, False, False]
    for g, c in zip(gpu[:4], ref[:4]):
        assert g.image.is_cuda and g.decoder == "dali-mixed"
        assert mean_abs_diff(g.image, c.image.numpy().astype(np.int16)) < 2
