"""The demo dataset: AVA-readable, deterministic, train/test disjoint, and scored by its attributes.

Datasets here are small (40 images, long side 64-128 px) so the module runs in seconds; the score
model's directions are checked on 1500 sampled specs, which need no pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from featurestore.datasets import load_dataset
from ray_jobs import demo_data
from ray_jobs.make_demo_data import META_FILE, main

N, SEED, TEST_FRACTION = 40, 7, 0.25
SMALL = ["--long-side", "64", "128"]


def make(out, *extra: str) -> tuple[int, dict | None, str]:
    """Run the CLI in-process: (exit code, last stdout line as JSON or None, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["--out", str(out), "--n", str(N), "--seed", str(SEED), "--test-fraction", str(TEST_FRACTION),
                   *SMALL, *extra])
    lines = stdout.getvalue().splitlines()
    return rc, json.loads(lines[-1]) if lines else None, stderr.getvalue()


def digests(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources():
    return demo_data.load_sources()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ava"
    rc, result, _ = make(out)
    assert rc == 0 and result["created"]
    assert (result["n"], result["train"], result["test"]) == (N, 30, 10)
    return out


@pytest.fixture(scope="module")
def meta(dataset):
    return json.loads((dataset / META_FILE).read_text())


def test_reads_as_ava_with_splits_votes_and_tags(dataset, meta, tmp_path):
    m = load_dataset(str(dataset), "ava", cache_dir=tmp_path)
    images = meta["images"]
    assert list(m.image_ids) == [image["image_id"] for image in images]
    assert list(m.splits) == [image["split"] for image in images]
    assert m.splits.count("test") == 10
    assert [list(v) for v in m.votes] == [image["votes"] for image in images]
    assert all(demo_data.RATERS[0] <= sum(v) <= demo_data.RATERS[1] for v in m.votes)
    names = dict(m.tag_names)
    assert names == {i: name for i, name in meta["tags"]}
    assert all(t1 in names and (t2 == 0 or names[t2] == "Black and White") for t1, t2 in m.tags)
    assert {t2 for _, t2 in m.tags} == {0, demo_data.TAGS.index("Black and White") + 1}  # both kinds occur
    assert all(uri.endswith(f"/images/{i}.jpg") for uri, i in zip(m.uris, m.image_ids))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    assert make(tmp_path / "again", "--workers", "1")[0] == 0  # thread count does not matter either
    assert digests(tmp_path / "again") == digests(dataset)
    assert make(tmp_path / "other", "--seed", str(SEED + 1))[0] == 0
    other, first = digests(tmp_path / "other"), digests(dataset)
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first if name.startswith("images/"))


def test_train_and_test_images_take_pixels_from_disjoint_regions(meta):
    regions = {s["name"]: s["regions"] for s in meta["sources"]}
    for r in regions.values():
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = r["train"], r["test"]
        assert min(ax1, bx1) <= max(ax0, bx0) or min(ay1, by1) <= max(ay0, by0)  # boxes do not overlap
    for image in meta["images"]:
        for crop in (image["background"], image["subject"]):
            x0, y0, x1, y1 = crop["box"]
            rx0, ry0, rx1, ry1 = regions[crop["source"]][image["split"]]
            assert rx0 <= x0 < x1 <= rx1 and ry0 <= y0 < y1 <= ry1


def test_mean_score_follows_latent_quality(meta):
    bins = np.arange(1, 11)
    mean_scores = [np.dot(image["votes"], bins) / sum(image["votes"]) for image in meta["images"]]
    assert spearmanr(mean_scores, [image["q"] for image in meta["images"]]).statistic > 0.8
    for image in meta["images"]:
        assert image["goodness"] == demo_data.goodness_of(image["attributes"])
        weighted = sum(demo_data.WEIGHTS[k] * g for k, g in image["goodness"].items())
        assert abs(image["q"] - demo_data.Q_BASE - demo_data.Q_SPAN * weighted) < 5 * demo_data.Q_NOISE


def test_each_attribute_moves_the_score_in_its_direction(sources):
    specs = [demo_data.sample_image(3, i, str(i), "train", sources, (64, 128)) for i in range(1500)]
    mean_scores = [np.dot(s.votes, np.arange(1, 11)) / sum(s.votes) for s in specs]
    directions = {"exposure_ev": lambda v: -abs(v), "contrast": float, "saturation": float,
                  "thirds_distance": lambda v: -v, "cut_fraction": lambda v: -v, "blur_sigma": lambda v: -v,
                  "noise_sd": lambda v: -v, "jpeg_quality": float}
    for name, better in directions.items():
        rho = spearmanr([better(s.attributes[name]) for s in specs], mean_scores).statistic
        assert rho > 0.15, f"{name}: Spearman {rho:.3f} with the mean score"


def test_attributes_reach_the_pixels(sources):
    specs = (demo_data.sample_image(1, i, str(i), "train", sources, (256, 256)) for i in range(50))
    spec = next(s for s in specs if not s.black_and_white)

    def pixels(**attributes):
        a = {**spec.attributes, "exposure_ev": 0.0, "contrast": 1.0, "saturation": 1.0, "blur_sigma": 0.0,
             "noise_sd": 0.0, "jpeg_quality": 95, **attributes}
        data = demo_data.render(dataclasses.replace(spec, attributes=a), sources)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64), len(data)

    def detail(x):  # energy of the finest scale: mean squared horizontal difference
        return np.mean(np.diff(x, axis=1) ** 2)

    plain, plain_bytes = pixels()
    assert detail(pixels(blur_sigma=3.0)[0]) < 0.5 * detail(plain)
    assert detail(pixels(noise_sd=20.0)[0]) > 1.5 * detail(plain)
    assert pixels(jpeg_quality=10)[1] < 0.5 * plain_bytes
    assert pixels(exposure_ev=1.5)[0].mean() > plain.mean() > pixels(exposure_ev=-1.5)[0].mean()
    assert pixels(contrast=0.4)[0].std() < plain.std()
    chroma = lambda x: np.mean(np.abs(x - x.mean(axis=2, keepdims=True)))  # noqa: E731
    assert chroma(pixels(saturation=0.3)[0]) < chroma(plain) < chroma(pixels(saturation=1.6)[0])


def test_images_decode_at_varied_sizes(dataset, meta):
    sizes = set()
    for image in meta["images"]:
        with Image.open(dataset / "images" / f"{image['image_id']}.jpg") as im:
            assert im.format == "JPEG" and im.size == tuple(image["size"])
            im.load()
        sizes.add(im.size)
        assert 64 <= max(im.size) <= 128
    assert len(sizes) >= 10
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)


def test_rerun_with_same_args_is_a_no_op(dataset):
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    rc, result, err = make(dataset)
    assert rc == 0 and not result["created"] and (result["n"], result["test"]) == (N, 10)
    assert "nothing to do" in err
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before


def test_other_args_or_foreign_contents_are_refused(dataset, tmp_path):
    before = digests(dataset)
    rc, result, err = make(dataset, "--seed", str(SEED + 1))
    assert rc == 2 and result is None and "'seed': 7" in err and "choose another --out" in err
    assert digests(dataset) == before
    (tmp_path / "mine.txt").write_text("not a demo dataset")
    rc, _, err = make(tmp_path)
    assert rc == 2 and "holds no demo_meta.json" in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_empty_out_dir_is_filled(tmp_path):
    assert make(tmp_path)[0] == 0
    assert (tmp_path / META_FILE).is_file() and len(list((tmp_path / "images").iterdir())) == N
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))


def test_masks_mark_the_pasted_subject(dataset, meta):
    for image in meta["images"]:
        with Image.open(dataset / "masks" / f"{image['image_id']}.png") as im:
            assert im.mode == "L" and im.size == tuple(image["size"])
            pixels = np.asarray(im)
        assert set(np.unique(pixels)) <= {0, 255}
        mask = pixels == 255
        (w, h), (sw, sh), (x, y) = image["size"], image["subject_size"], image["subject_xy"]
        # The paste's own alpha, clipped by PIL as render() clips it: the mask is where it is ≥ 0.5.
        alpha = Image.new("L", (w, h), 0)
        alpha.paste(Image.fromarray(np.rint(demo_data._ellipse(sw, sh) * 255).astype(np.uint8)), (x, y))
        assert np.array_equal(mask, np.asarray(alpha) >= 128)
        # Geometry: an ellipse of semi-axes 0.9·(sw/2, sh/2) (alpha = (1 - r) / FEATHER ≥ 0.5 ⇔ r ≤ 0.9)
        # around the subject box's centre, clipped to the frame.
        cx, cy, ax, ay = x + sw / 2, y + sh / 2, 0.9 * sw / 2, 0.9 * sh / 2
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        expected = (max(0, cx - ax), max(0, cy - ay), min(w, cx + ax), min(h, cy + ay))
        assert all(abs(a - b) <= 1 for a, b in zip(box, expected)), (box, expected)
        assert x <= box[0] and y <= box[1] and box[2] <= x + sw and box[3] <= y + sh  # inside the subject box
        fine = 8  # the clipped ellipse's area, integrated on a grid 8× finer than the pixels
        ys, xs = (np.arange(n * fine) / fine + 0.5 / fine for n in (h, w))
        area = (((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2 <= 1).sum() / fine**2
        assert abs(mask.sum() - area) <= 3 + 0.02 * area, (mask.sum(), area)
    assert any(image["attributes"]["cut_fraction"] > 0 for image in meta["images"])  # clipping was exercised


def test_a_dataset_from_before_masks_gets_them_added(dataset, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(dataset, old)
    shutil.rmtree(old / "masks")
    rc, result, err = make(old)
    assert rc == 0 and not result["created"] and "added its masks/" in err
    assert digests(old) == digests(dataset)
    assert not list(old.glob(".masks.tmp-*"))
