"""Does the student's loader keep training fed, locally and from S3? Stream vs in-memory batches, one run.

    python benchmarks/student_loader.py [--n 384] [--backbone tf_efficientnet_lite0] [--view resize:160]

Sets up a demo dataset (real photographs), a knowledge entry and the stored student views
(``images: stored``, decoded once) in a local store, and a copy of the store on moto's S3 behind
the fault proxy (tests/fault_proxy.py) adding ``--latency-ms`` (20) to every request. The GSF entry
holds random features: only shapes matter to a loader. Then, in one process, on one rank, the
same training steps (forward, KD loss, backward, Adam) are timed fed by:

* ``memory``: batches of the same shapes already in memory (the ceiling);
* ``local``: ``StudentStream`` over the local store: whole-shard reads of a shuffle window,
  the next window loading in the background;
* ``s3``: the same stream over S3 through the proxy.

Best of three rounds each, interleaved, the order rotated every round. Last stdout line (JSON):

* ``memory_img_s``, ``loader_img_s_local``, ``loader_img_s_s3``: training images/s fed each way;
* ``loader_vs_memory_local`` (goal ≥ 0.9) and ``loader_vs_memory_s3`` (goal ≥ 0.8);
* ``step_stall_ratio``: share of the S3 epoch's wall time the training loop waited for a batch
  (``step_stall_ratio_local`` likewise);
* ``batch_overlap_between_epochs``: share of epoch 1's batches whose row set appears again as a
  batch of epoch 2 (goal ≤ 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.backends import Backend  # noqa: E402
from featurestore.dataset_table import DatasetTable  # noqa: E402
from featurestore.datasets import load_dataset  # noqa: E402
from featurestore.partition import World  # noqa: E402
from featurestore.specs import BackboneSpec, ExtractorSpec  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from featurestore.views import GsfView, import_features  # noqa: E402
from trainers.distiller import DistillerSpec  # noqa: E402
from trainers.knowledge import distill, knowledge_hashes  # noqa: E402
from trainers.labels import prediction  # noqa: E402
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss  # noqa: E402
from trainers.student import StudentSpec, build_student  # noqa: E402
from trainers.student_data import StoredImages, StudentBatch, StudentStream, split_rows  # noqa: E402
from trainers.student_views import ensure_views, pixel_view, stored_views  # noqa: E402

BATCH_SIZE = 16


def knowledge_store(tmp: Path, n: int, view: str) -> tuple[str, str]:
    data = tmp / "data"
    subprocess.run([sys.executable, "-m", "ray_jobs.make_demo_data", "--out", str(data), "--n", str(n)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    table = DatasetTable.from_manifest(load_dataset(str(data), "ava"))
    store = FeatureStore(str(tmp / "store"))
    extractor = ExtractorSpec(backbones=(BackboneSpec("random", "random:0", ("stem",), 64),))
    gsf = np.random.default_rng(0).random((len(table), 64)).astype(np.float16)
    gsf_view = import_features(store, extractor, table, gsf, shard_rows=64)
    spec = DistillerSpec(backbones=("random",), hidden=(256, 512), epochs=1, batch_size=64)
    key = distill(store, gsf_view.key, spec, torch.device("cpu"))["entry"]
    rows = split_rows(table, knowledge_hashes(store.open(key)), "all", "distribution")
    distinct, first = np.unique(rows.sha256, return_index=True)
    ensure_views(store.url, pixel_view(view, use_gpu=False), distinct, [rows.uris[i] for i in first])
    return store.url, key


def copy_store(source: str, target: str) -> None:
    """Every object of the local store ``source`` into ``target`` (an s3:// URL)."""
    import obstore

    src, dst = Backend(source, create=False), Backend(target)
    for batch in obstore.list(src.objects):
        for meta in batch:
            obstore.put(dst.objects, meta["path"], obstore.get(src.objects, meta["path"]).bytes())


def stream_for(store_url: str, key: str, view: str) -> StudentStream:
    knowledge = FeatureStore(store_url, create=False).open(key)
    dataset = GsfView(FeatureStore(store_url, create=False), knowledge.attrs["view"]).dataset()
    data = split_rows(dataset, knowledge_hashes(knowledge), "all", "distribution")
    images = StoredImages(store_url, stored_views(store_url, pixel_view(view, use_gpu=False)), data)
    return StudentStream(store_url, key, data, "distribution", World(), BATCH_SIZE, images, seed=0)


def train_steps(model, optimizer, batches, loss: LossSpec) -> tuple[int, float, float]:
    """Images trained on, wall seconds, and seconds spent waiting for the next batch."""
    images, waited, start = 0, 0.0, time.perf_counter()
    iterator = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        f_s, logits = model(batch.images)
        total, _ = student_loss(loss, StudentOutputs(prediction("distribution", logits), f_s),
                                Targets(batch.gt, batch.teacher_prediction, batch.teacher_feature), batch.weight)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        images += len(batch.rows)
    return images, time.perf_counter() - start, waited


def batch_overlap(stream: StudentStream, epochs: tuple[int, int]) -> float:
    sets = [{frozenset(b.rows[b.weight.numpy() > 0].tolist()) for b in stream.epoch(e)} for e in epochs]
    return len(sets[0] & sets[1]) / max(1, len(sets[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--view", default="resize:160")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from fault_proxy import FaultProxy, aws_endpoint
    from read_checksums import moto_s3

    with tempfile.TemporaryDirectory() as tmp, moto_s3() as s3_store:
        local_store, key = knowledge_store(Path(tmp), args.n, args.view)
        s3_url = s3_store.replace("/store", "/student-loader")
        copy_store(local_store, s3_url)
        with FaultProxy(os.environ["AWS_ENDPOINT_URL"]).start() as proxy, aws_endpoint(proxy.endpoint):
            proxy.set(latency_ms=args.latency_ms)
            streams = {"local": stream_for(local_store, key, args.view), "s3": stream_for(s3_url, key, args.view)}
            spec = StudentSpec(backbone=args.backbone, weights=args.weights, feature_width=512, view=args.view)
            model = build_student(spec).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            loss = LossSpec("kd")
            epoch0 = streams["local"].epoch(0)
            first = next(epoch0)
            epoch0.close()  # stops its loader thread: nothing else may run while steps are timed
            memory = [StudentBatch(first.rows, torch.randint(0, 256, first.images.shape, dtype=torch.uint8),
                                   first.weight, first.gt, first.teacher_feature, first.teacher_prediction)
                      for _ in range(streams["local"].steps(1))]
            train_steps(model, optimizer, memory[:2], loss)  # warm-up
            rate, stall = {}, {}
            for round_ in range(3):  # interleaved, in a rotated order each round; best of three
                feeds = {"memory": lambda: memory, "local": lambda: streams["local"].epoch(1 + round_),
                         "s3": lambda: streams["s3"].epoch(1 + round_)}
                names = list(feeds)[round_:] + list(feeds)[:round_]
                for name, batches in ((n, feeds[n]) for n in names):
                    images, seconds, waited = train_steps(model, optimizer, batches(), loss)
                    if images / seconds > rate.get(name, 0.0):
                        rate[name], stall[name] = images / seconds, waited / seconds
            requests = proxy.stats().get("delayed", 0)
        overlap = batch_overlap(streams["local"], (1, 2))

    result = {"n": args.n, "backbone": args.backbone, "view": args.view, "batch_size": BATCH_SIZE,
              "latency_ms": args.latency_ms, "proxy_delayed_requests": requests,
              "memory_img_s": round(rate["memory"], 2), "loader_img_s_local": round(rate["local"], 2),
              "loader_img_s_s3": round(rate["s3"], 2),
              "loader_vs_memory_local": round(rate["local"] / rate["memory"], 3),
              "loader_vs_memory_s3": round(rate["s3"] / rate["memory"], 3),
              "step_stall_ratio": round(stall["s3"], 4), "step_stall_ratio_local": round(stall["local"], 4),
              "batch_overlap_between_epochs": round(overlap, 4)}
    print(f"training img/s: in-memory {rate['memory']:.1f}, local stream {rate['local']:.1f}, "
          f"S3 (+{args.latency_ms:g} ms) stream {rate['s3']:.1f}; stall {stall['s3']:.3f} (S3)", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
