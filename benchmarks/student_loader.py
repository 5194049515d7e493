"""Does the student's streaming loader keep training fed? Real stream vs in-memory batches, one run.

    python benchmarks/student_loader.py [--n 96] [--backbone tf_efficientnet_lite0] [--view resize:224]

Sets up a demo dataset (real photographs) and a knowledge entry in a temporary store. The GSF
entry holds random features, since only the shapes matter for a loader benchmark. Then, in one
process, on one rank:

(a) training steps/s fed by the real path: StudentStream reads image bytes, decodes them with
    DALI to the view, and reads the aligned knowledge rows from the store, in a prefetch thread;
(b) training steps/s fed by synthetic batches of the same shapes already in memory;
(c) rows/s the loader alone delivers (no training).

Target: (a)/(b) ≥ 0.95, i.e. the loader must not stall training. The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.dataset_table import DatasetTable  # noqa: E402
from featurestore.datasets import load_dataset  # noqa: E402
from featurestore.partition import World  # noqa: E402
from featurestore.specs import BackboneSpec, ExtractorSpec  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from featurestore.views import GsfView, import_features  # noqa: E402
from trainers.distiller import DistillerSpec  # noqa: E402
from trainers.labels import prediction  # noqa: E402
from trainers.knowledge import distill, knowledge_hashes  # noqa: E402
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss  # noqa: E402
from trainers.student import StudentSpec, build_student, decoder_for, view_size  # noqa: E402
from trainers.student_data import StudentBatch, StudentStream, split_rows  # noqa: E402


def knowledge_store(tmp: Path, n: int) -> tuple[str, str]:
    data = tmp / "data"
    subprocess.run([sys.executable, "-m", "ray_jobs.make_demo_data", "--out", str(data), "--n", str(n)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    table = DatasetTable.from_manifest(load_dataset(str(data), "ava"))
    store = FeatureStore(str(tmp / "store"))
    extractor = ExtractorSpec(backbones=(BackboneSpec("random", "random:0", ("stem",), 64),))
    gsf = np.random.default_rng(0).random((n, 64)).astype(np.float16)
    view = import_features(store, extractor, table, gsf, shard_rows=64)
    spec = DistillerSpec(backbones=("random",), hidden=(256, 512), epochs=1, batch_size=64)
    return store.url, distill(store, view.key, spec, torch.device("cpu"))["entry"]


def train_steps(model, optimizer, batches, loss: LossSpec) -> tuple[int, float]:
    steps, start = 0, time.perf_counter()
    for batch in batches:
        f_s, logits = model(batch.images)
        total, _ = student_loss(loss, StudentOutputs(prediction("distribution", logits), f_s),
                                Targets(batch.gt, batch.teacher_prediction, batch.teacher_feature), batch.weight)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        steps += 1
    return steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--view", default="resize:224")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        store_url, key = knowledge_store(Path(tmp), args.n)
        knowledge = FeatureStore(store_url).open(key)
        dataset = GsfView(FeatureStore(store_url), knowledge.attrs["view"]).dataset()
        data = split_rows(dataset, knowledge_hashes(knowledge), "all", "distribution")
        spec = StudentSpec(backbone=args.backbone, weights=args.weights, feature_width=512, view=args.view)
        stream = StudentStream(store_url, key, data, "distribution", World(), args.batch_size,
                               decoder_for(spec, torch.device("cpu")), view_size(spec.view), seed=0,
                               locality_rows=knowledge.layout.shard_rows)
        model = build_student(spec).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        loss = LossSpec("kd")

        start = time.perf_counter()
        loader_rows = sum(len(b.rows) for b in stream.epoch(0))
        loader_rate = loader_rows / (time.perf_counter() - start)

        first = next(iter(stream.epoch(0)))
        synthetic = [StudentBatch(first.rows, torch.randint(0, 256, first.images.shape, dtype=torch.uint8),
                                  first.weight, first.gt, first.teacher_feature, first.teacher_prediction)
                     for _ in range(stream.steps(1))]
        train_steps(model, optimizer, synthetic[:2], loss)  # warm-up
        results = {}
        for round_ in range(2):  # interleaved, best of two
            for name, batches in (("stream", lambda: stream.epoch(1 + round_)), ("memory", lambda: synthetic)):
                steps, seconds = train_steps(model, optimizer, batches(), loss)
                results[name] = max(results.get(name, 0.0), steps / seconds)

    ratio = results["stream"] / results["memory"]
    print(f"training steps/s: stream {results['stream']:.3f}, in-memory {results['memory']:.3f}, ratio {ratio:.3f}; "
          f"loader alone {loader_rate:.1f} rows/s", file=sys.stderr)
    print(json.dumps({"n": args.n, "backbone": args.backbone, "view": args.view, "batch_size": args.batch_size,
                      "stream_steps_per_s": round(results["stream"], 4), "memory_steps_per_s": round(results["memory"], 4),
                      "stream_vs_memory": round(ratio, 3), "loader_rows_per_s": round(loader_rate, 1)}))


if __name__ == "__main__":
    main()
