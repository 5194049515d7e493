"""Write the demo dataset of ``ray_jobs.demo_data`` to a directory in AVA layout.

    python -m ray_jobs.make_demo_data --out DIR --n N [--seed S] [--test-fraction F]
                                      [--long-side MIN MAX] [--workers W]

``DIR`` gets what ``featurestore.datasets.load_dataset(DIR, "ava")`` reads — ``AVA.txt``,
``tags.txt``, ``generic_train.jpgl``, ``generic_test.jpgl``, ``images/<id>.jpg`` (the reader looks
in ``images/`` first) — plus ``demo_meta.json``: the parameters, the score model and every image's
crops, attributes and latent quality, so tests and reports can check the signal; and
``masks/<id>.png``, each image's main-subject mask (``demo_data.subject_mask``: 255 inside, 0
outside, the image's size), the ground truth of ``ray_jobs.explain``.

The pipeline calls this on every run, so reruns must be cheap and safe. The dataset is built in
a hidden sibling directory and renamed into place as the last step: ``DIR`` is absent, empty or
complete, never half-written. A complete ``DIR`` made with the same parameters is left as it is;
any other non-empty ``DIR`` is refused, never overwritten. A complete ``DIR`` from before masks
were written gets its ``masks/`` added (built aside and renamed in; the images are untouched).
Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from featurestore.errors import UserError
from ray_jobs.config import ConfigError, option

from . import demo_data
from .demo_data import DemoDataError, ImageSpec

META_FILE = "demo_meta.json"
ID_BASE = 100001  # six-digit ids, AVA-like, that differ from the 1-based index so mix-ups show
CHALLENGE_SIZE = 50  # consecutive images share a challenge id, as entries of one AVA contest do
PROGRESS_SECONDS = 2.0
MASK_DIR = "masks"


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        result = generate(Path(args.out), args.n, args.seed, args.test_fraction, tuple(args.long_side), args.workers)
    except UserError as exc:  # DemoDataError: a refused request or a missing dependency
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def generate(out: Path, n: int, seed: int = 0, test_fraction: float = 0.2,
             long_side: tuple[int, int] = (400, 900), workers: int = min(8, os.cpu_count() or 1)) -> dict:
    """Make the dataset at ``out`` unless the same one is there; returns the job's result fields."""
    started = time.monotonic()
    params = {"seed": seed, "n": n, "test_fraction": test_fraction, "long_side": list(long_side)}
    meta = _existing(out, params)
    created = meta is None
    if created:
        meta = _build(out, params, workers)
    elif not (out / MASK_DIR).is_dir():
        _add_masks(out, meta)
        print(f"{out}: demo dataset already complete; added its {MASK_DIR}/", file=sys.stderr)
    else:
        print(f"{out}: demo dataset with these parameters already complete; nothing to do", file=sys.stderr)
    splits = [image["split"] for image in meta["images"]]
    return {"out": str(out), "n": len(splits), "train": splits.count("train"), "test": splits.count("test"),
            "created": created, "seconds": round(time.monotonic() - started, 2)}


@dataclass(frozen=True)
class DemoDataConfig:
    """What a demo dataset is made of, with its checks: the pipeline's ``demo_data`` section and
    this command's flags (``--n`` is required on the command line)."""

    n: int = option(160, help="number of images")
    seed: int = option(0, help="generator seed")
    test_fraction: float = option(0.2, help="share of test images")
    long_side: tuple[int, ...] = option((400, 900), help="[min, max] long side in pixels")

    def __post_init__(self):
        if self.n < 1 or not 0 < self.test_fraction < 1 or len(self.long_side) != 2 \
                or not 16 <= self.long_side[0] <= self.long_side[1]:
            raise ConfigError("demo_data needs n ≥ 1, 0 < test_fraction < 1 and long_side [min, max] with 16 ≤ min ≤ max")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.make_demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="dataset directory: absent, empty, or made by an earlier run with the same arguments")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of test images (default 0.2)")
    parser.add_argument("--long-side", type=int, nargs=2, default=(400, 900), metavar=("MIN", "MAX"),
                        help="range of the images' long side in pixels (default 400 900)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads (the output does not depend on it)")
    args = parser.parse_args(argv)
    try:
        DemoDataConfig(args.n, args.seed, args.test_fraction, tuple(args.long_side))
    except ConfigError:
        parser.error(f"needs --n ≥ 1, 0 < --test-fraction < 1 and --long-side MIN MAX with 16 ≤ MIN ≤ MAX; got "
                     f"--n {args.n} --test-fraction {args.test_fraction} --long-side {' '.join(map(str, args.long_side))}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


def _existing(out: Path, params: dict) -> dict | None:
    """The metadata of a complete same-parameter dataset at ``out``, or None if ``out`` is free."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DemoDataError(f"{out} is a file; --out must name a directory")
    if not any(out.iterdir()):
        return None
    meta_path = out / META_FILE
    if not meta_path.is_file():
        raise DemoDataError(f"{out} is not empty and holds no {META_FILE}, so it is not a demo dataset; "
                            "choose a new or empty --out")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        raise DemoDataError(f"{meta_path} is not valid JSON; delete {out} or choose another --out") from None
    if meta.get("version") != demo_data.VERSION or meta.get("params") != params:
        raise DemoDataError(f"{out} holds a demo dataset made with {meta.get('params')} (generator version "
                            f"{meta.get('version')}), not {params} (version {demo_data.VERSION}); "
                            "delete it or choose another --out")
    return meta


def _build(out: Path, params: dict, workers: int) -> dict:
    """Write everything into a hidden sibling, then rename it to ``out`` (the commit)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write(tmp, params, workers)
        try:
            os.replace(tmp, out)  # replaces an empty directory too
        except OSError:  # a concurrent run committed first: fine if it made this very dataset
            meta = _existing(out, params)
            if meta is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _mask_bytes(image: ImageSpec | dict) -> bytes:
    """The PNG of one image's subject mask, from its spec or its ``demo_meta.json`` record."""
    fields = asdict(image) if isinstance(image, ImageSpec) else image
    size, subject_size, subject_xy = (tuple(fields[k]) for k in ("size", "subject_size", "subject_xy"))
    return demo_data.mask_png(demo_data.subject_mask(size, subject_size, subject_xy))


def _add_masks(out: Path, meta: dict) -> None:
    """Write the masks of a dataset made before masks existed, into a hidden sibling renamed to
    ``masks/``: the folder is absent or complete. Losing a race to a concurrent run is fine."""
    tmp = out / f".{MASK_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for image in meta["images"]:
            (tmp / f"{image['image_id']}.png").write_bytes(_mask_bytes(image))
        os.replace(tmp, out / MASK_DIR)
    except OSError:
        if not (out / MASK_DIR).is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(root: Path, params: dict, workers: int) -> dict:
    sources = demo_data.load_sources()
    (root / "images").mkdir()
    (root / MASK_DIR).mkdir()
    seed, n, test_fraction = params["seed"], params["n"], params["test_fraction"]
    long_side = tuple(params["long_side"])

    def make(index: int) -> ImageSpec:
        image_id = str(ID_BASE + index)
        split = demo_data.split_of(index, test_fraction)
        spec = demo_data.sample_image(seed, index, image_id, split, sources, long_side)
        (root / "images" / f"{image_id}.jpg").write_bytes(demo_data.render(spec, sources))
        (root / MASK_DIR / f"{image_id}.png").write_bytes(_mask_bytes(spec))
        return spec

    specs: list[ImageSpec] = []
    started = last = time.monotonic()
    with ThreadPoolExecutor(workers, thread_name_prefix="demo") as pool:
        for spec in pool.map(make, range(n)):
            specs.append(spec)
            if (now := time.monotonic()) - last >= PROGRESS_SECONDS or len(specs) == n:
                print(f"demo data: {len(specs)}/{n} images ({now - started:.1f}s)", file=sys.stderr, flush=True)
                last = now

    (root / "AVA.txt").write_text("".join(  # index, id, ten vote counts, two tag ids, challenge id
        f"{i + 1} {s.image_id} {' '.join(map(str, s.votes))} {s.tags[0]} {s.tags[1]} {1 + i // CHALLENGE_SIZE}\n"
        for i, s in enumerate(specs)))
    (root / "tags.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(demo_data.TAGS, 1)))
    for split in ("train", "test"):
        (root / f"generic_{split}.jpgl").write_text("".join(f"{s.image_id}\n" for s in specs if s.split == split))
    meta = {
        "generator": "ray_jobs.demo_data",
        "version": demo_data.VERSION,
        "params": params,
        "score_model": {"q": f"{demo_data.Q_BASE} + {demo_data.Q_SPAN} * sum(weights[k] * goodness[k]) "
                             f"+ N(0, {demo_data.Q_NOISE})", "weights": demo_data.WEIGHTS,
                        "raters": demo_data.RATERS, "rater_sd": demo_data.RATER_SD},
        "tags": [[i, name] for i, name in enumerate(demo_data.TAGS, 1)],
        "sources": [{"name": s.name, "category": s.category, "gray": s.gray, "shape": list(s.pixels.shape[:2]),
                     "regions": {split: s.region(split) for split in ("train", "test")}} for s in sources.values()],
        "images": [asdict(s) for s in specs],
    }
    (root / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    sys.exit(main())
