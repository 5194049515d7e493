"""Small generated image datasets for job tests (AVA layout, mixed sizes, optional bad inputs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((64, 48), (80, 80), (96, 64))  # (width, height): three size groups


def jpeg_bytes(rng: np.random.Generator, width: int, height: int, mode: str = "RGB", quality: int = 90) -> bytes:
    """A smooth random picture (gradients + blobs), so JPEG and decoders behave as on photos."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6.3 * (rng.random() * x + rng.random() * y) + rng.random() * 6) for _ in range(3)]
    rgb = ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_ava(root: Path, images: dict[str, bytes | None], seed: int = 0, test_every: int = 4) -> list[str]:
    """AVA.txt + tags.txt + split lists + ``<id>.jpg``; a ``None`` image is listed but not written."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines, test_ids = [], []
    for index, (image_id, data) in enumerate(images.items()):
        votes = rng.integers(0, 20, size=10)
        lines.append(" ".join(map(str, [index + 1, image_id, *votes, 1 + index % 3, 0, 100])))
        if index % test_every == 0:
            test_ids.append(image_id)
        if data is not None:
            (root / f"{image_id}.jpg").write_bytes(data)
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    (root / "tags.txt").write_text("1 Animals\n2 Urban\n3 Still Life\n")
    (root / "generic_test.jpgl").write_text("\n".join(test_ids) + "\n")
    return list(images)


def good_images(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {str(1000 + i): jpeg_bytes(rng, *SIZES[i % len(SIZES)]) for i in range(n)}
