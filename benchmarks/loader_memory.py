"""The student loader's and the knowledge writer's peak memory do not grow with N.

    python benchmarks/loader_memory.py [--small 20000] [--large 80000] [--gsf-width 1024]

For each N, a fresh local store gets N distinct 64×64 JPEGs (written by this script), their
labelled dataset table and a GSF view of ``--gsf-width`` random float16 columns
(``featurestore.views.import_features``). Then two separate processes, one after the other:

* **writer**: ``trainers.knowledge.distill`` with the paper's distiller widths (hidden 2048, 512:
  f_t is 512-d, D_t 10 bins), one epoch. The fit is covered by ``distill_memory.py``; here the
  peak of the knowledge write alone is taken by resetting the kernel's high-water mark
  (``/proc/self/clear_refs``) when ``write_knowledge`` starts and reading ``VmHWM`` when it
  returns. The GSF is narrow on purpose: the write reads GSF block by block, so a narrow GSF
  makes the knowledge rows (2 KB each) the largest thing that could pile up with N.
* **loader**: what one training worker does (``trainers/train_loop.py``): the train split's
  ``StudentStream`` over the entry the writer wrote, one epoch at batch 16, read, SHA-256
  checked, DALI-decoded to 64×64 (``images: decode``, the source whose work grows per image)
  and joined with its f_t and D_t rows, a shuffle window at a time. Its peak is the
  process's ``ru_maxrss``, set-up included, as a worker would hold it.

Each process also reports its growth during the measured phase (peak minus RSS when the phase
began), which shows leaks that a few hundred MB of torch and DALI start-up would hide in a ratio.
Goal: ``loader_rss_ratio`` and ``knowledge_write_rss_ratio`` (large / small) ≤ 1.25.
Last stdout line: JSON with those ratios, the peaks, N values and seconds.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.dataset_table import DatasetTable, hashes_from_hex  # noqa: E402
from featurestore.specs import BackboneSpec, ExtractorSpec  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from featurestore.views import import_features  # noqa: E402

IMAGE_SIZE = 64
BATCH_SIZE = 16  # the paper's student batch


def rss_mb() -> dict[str, float]:
    """This process's current RSS and high-water mark since the last reset, in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


def reset_peak() -> float:
    """Restart the kernel's peak-RSS count from the current RSS (Linux ≥ 4.0); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb()["VmRSS"]


def jpeg(rng: np.random.Generator) -> bytes:
    """A distinct small photo-like JPEG: random 8×8 colours upsampled smoothly (≈1–2 KB)."""
    colours = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    out = io.BytesIO()
    colours.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_dataset(root: Path, n: int, gsf_width: int) -> tuple[str, str]:
    """``n`` JPEGs on disk, their table (every 10th row test) and a GSF view. Returns (store URL, view key)."""
    rng = np.random.default_rng(n)
    images = root / "images"
    images.mkdir()
    uris, digests = [], []
    for i in range(n):
        data = jpeg(rng)
        path = images / f"{i}.jpg"
        path.write_bytes(data)
        uris.append(str(path))
        digests.append(hashlib.sha256(data).hexdigest())
    if len(set(digests)) != n:
        raise RuntimeError("synthetic images collided; the benchmark needs n distinct images")
    table = DatasetTable(name="loader-memory", image_ids=np.array([str(i) for i in range(n)], object),
                         uris=np.array(uris, object), sha256=hashes_from_hex(digests),
                         splits=np.array(["test" if i % 10 == 0 else "train" for i in range(n)], object),
                         votes=rng.integers(0, 20, (n, 10)))
    extractor = ExtractorSpec(backbones=(BackboneSpec("synthetic", "random:0", ("stem",), gsf_width),))
    gsf = rng.random((n, gsf_width), np.float32).astype(np.float16)
    store = FeatureStore(str(root / "store"))
    return store.url, import_features(store, extractor, table, gsf).key


def writer_child(store_url: str, view_key: str) -> None:
    """In its own process: distill, measuring the knowledge write's own peak; print JSON."""
    import torch

    from trainers import knowledge
    from trainers.distiller import DistillerSpec

    torch.set_num_threads(2)
    phase: dict[str, float] = {}
    write_knowledge = knowledge.write_knowledge

    @functools.wraps(write_knowledge)
    def measured_write(*args, **kwargs):
        phase["start_mb"] = reset_peak()
        started = time.perf_counter()
        write_knowledge(*args, **kwargs)
        phase["seconds"] = time.perf_counter() - started
        phase["peak_mb"] = rss_mb()["VmHWM"]

    knowledge.write_knowledge = measured_write  # distill looks the writer up in its module at call time
    result = knowledge.distill(FeatureStore(store_url), view_key,
                               DistillerSpec(backbones=(), hidden=(2048, 512), epochs=1, batch_size=512, lr=1e-3),
                               torch.device("cpu"))
    print(json.dumps({"entry": result["entry"], "write_peak_rss_mb": round(phase["peak_mb"], 1),
                      "write_growth_mb": round(phase["peak_mb"] - phase["start_mb"], 1),
                      "write_seconds": round(phase["seconds"], 1),
                      "distill_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def loader_child(store_url: str, knowledge_key: str) -> None:
    """In its own process: one train epoch of the student stream, as a training worker runs it; print JSON."""
    import torch

    from featurestore.partition import World
    from featurestore.views import GsfView
    from trainers.knowledge import knowledge_hashes
    from trainers.student import StudentSpec, decoder_for, view_size
    from trainers.student_data import DecodedImages, StudentStream, split_rows

    torch.set_num_threads(2)
    started = time.perf_counter()
    store = FeatureStore(store_url, create=False)
    knowledge = store.open(knowledge_key)
    table = GsfView(store, knowledge.attrs["view"]).dataset()
    spec = StudentSpec(backbone="resnet18", view=f"resize:{IMAGE_SIZE}")
    train = split_rows(table, knowledge_hashes(knowledge), "train", spec.label)
    images = DecodedImages(train, decoder_for(spec, torch.device("cpu")), view_size(spec.view),
                           locality_rows=knowledge.layout.shard_rows)
    stream = StudentStream(store_url, knowledge_key, train, spec.label, World(), BATCH_SIZE, images, seed=0)
    epoch_start_mb = reset_peak()
    epoch_started = time.perf_counter()
    rows = sum(float(batch.weight.sum()) for batch in stream.epoch(0))  # batches arrive materialised
    epoch_seconds = time.perf_counter() - epoch_started
    epoch_peak_mb = rss_mb()["VmHWM"]
    print(json.dumps({"rows": int(rows), "unreadable": stream.unreadable.count,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "epoch_growth_mb": round(epoch_peak_mb - epoch_start_mb, 1),
                      "rows_per_s": round(rows / epoch_seconds, 1), "seconds": round(time.perf_counter() - started, 1)}))


def child(role: str, store_url: str, key: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", role, store_url, key],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{role} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(n: int, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        started = time.perf_counter()
        store_url, view_key = write_dataset(Path(tmp), n, args.gsf_width)
        written = time.perf_counter() - started
        writer = child("writer", store_url, view_key)
        loader = child("loader", store_url, writer["entry"])
    train_rows = n - len(range(0, n, 10))
    if loader["unreadable"] or loader["rows"] != train_rows:
        raise RuntimeError(f"the loader delivered {loader['rows']} usable rows of {train_rows} "
                           f"({loader['unreadable']} unreadable): the measurement is not of a full epoch")
    print(f"N={n}: dataset written in {written:.0f} s; knowledge write peak {writer['write_peak_rss_mb']:.0f} MB "
          f"(+{writer['write_growth_mb']:.0f} MB in {writer['write_seconds']:.0f} s; whole distill "
          f"{writer['distill_peak_rss_mb']:.0f} MB); loader peak {loader['peak_rss_mb']:.0f} MB "
          f"(+{loader['epoch_growth_mb']:.0f} MB over the epoch, {loader['rows']} rows at "
          f"{loader['rows_per_s']:.0f} rows/s)", file=sys.stderr)
    return {"writer": writer, "loader": loader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--large", type=int, default=80000)
    parser.add_argument("--gsf-width", type=int, default=1024)
    parser.add_argument("--tmp", default=None, help="where the synthetic images and stores go")
    parser.add_argument("--child", nargs=3, metavar=("ROLE", "STORE", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, store_url, key = args.child
        (writer_child if role == "writer" else loader_child)(store_url, key)
        return
    small, large = measure(args.small, args), measure(args.large, args)

    def ratio(role: str, field: str) -> float:
        return round(large[role][field] / small[role][field], 3)

    print(json.dumps({
        "n_small": args.small, "n_large": args.large, "gsf_width": args.gsf_width, "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE, "knowledge_width": 512,
        "loader_peak_rss_mb_small": small["loader"]["peak_rss_mb"],
        "loader_peak_rss_mb_large": large["loader"]["peak_rss_mb"],
        "loader_rss_ratio": ratio("loader", "peak_rss_mb"),
        "loader_epoch_growth_mb_small": small["loader"]["epoch_growth_mb"],
        "loader_epoch_growth_mb_large": large["loader"]["epoch_growth_mb"],
        "loader_rows_per_s_small": small["loader"]["rows_per_s"], "loader_rows_per_s_large": large["loader"]["rows_per_s"],
        "loader_seconds_small": small["loader"]["seconds"], "loader_seconds_large": large["loader"]["seconds"],
        "knowledge_write_peak_rss_mb_small": small["writer"]["write_peak_rss_mb"],
        "knowledge_write_peak_rss_mb_large": large["writer"]["write_peak_rss_mb"],
        "knowledge_write_rss_ratio": ratio("writer", "write_peak_rss_mb"),
        "knowledge_write_growth_mb_small": small["writer"]["write_growth_mb"],
        "knowledge_write_growth_mb_large": large["writer"]["write_growth_mb"],
        "knowledge_write_seconds_small": small["writer"]["write_seconds"],
        "knowledge_write_seconds_large": large["writer"]["write_seconds"],
        "distill_peak_rss_mb_small": small["writer"]["distill_peak_rss_mb"],
        "distill_peak_rss_mb_large": large["writer"]["distill_peak_rss_mb"]}))


if __name__ == "__main__":
    main()
