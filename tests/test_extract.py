"""The extraction job end to end: real Ray, real DALI decoding, real timm models, local and S3 stores."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import good_images, jpeg_bytes, write_ava
from PIL import Image

from featurestore.features import GSF_ARRAY, HASH_ARRAY, SEGMENT_KIND
from featurestore.layout import STATUS_FAILED, STATUS_OK, ArraySpec, EntryLayout
from featurestore.specs import EntrySpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView
from ray_jobs.config import load_config
from ray_jobs.extract import ExtractConfig, main
from trainers.backbones import build_extractor
from trainers.extraction import ShardExtractor, ShardTask, ShardWorker, SpecMismatch, input_policy, shard_batches
from trainers.images import ImageDecoder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["backbones=[resnet18]", "weights=random:0", "workers=1", "cpus_per_worker=2"]


def view_rows(store: str, key: str) -> tuple[list[str], np.ndarray, dict[int, str], np.ndarray]:
    """A view's image ids, per-row status, failures, and GSF rows by dataset row (zeros where failed)."""
    view = GsfView(FeatureStore(store), key)
    table, status = view.dataset(), view.status()
    ok = np.flatnonzero(status == STATUS_OK)
    gsf = np.zeros((len(table), view.extractor.width), np.float16)
    gsf[ok] = view.features(table.sha256[ok])
    return list(table.image_ids), status, view.failures(), gsf


def extract(*overrides: str) -> dict:
    return main(load_config(ExtractConfig, None, list(overrides)))


def extract_cli(*overrides: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_jobs.extract", *overrides], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=os.environ.copy(), **popen)


def test_mlsp_rows_match_a_direct_forward_and_rerun_reuses(ray_local, tmp_path):
    images = good_images(12)
    write_ava(tmp_path / "ava", images)
    store = str(tmp_path / "store")
    first = extract(f"dataset.path={tmp_path / 'ava'}", f"store={store}", *SMALL, "shard_rows=32")
    assert (first["rows"], first["ok"], first["failed"], first["reused"]) == (12, 12, 0, False)
    assert first["width"] == 64 + 64 + 128 + 256 + 512 and first["columns"] == {"resnet18": [0, 1024]}
    assert first["forward_passes"] > 0 and first["computed_rows"] == 12
    ids, _, _, stored = view_rows(store, first["entry"])
    extractor = build_extractor(["resnet18"], "random:0", device="cpu")
    decoder = ImageDecoder(device="cpu")
    for row in (0, 1, 2, 7):  # one image of each size, and a repeat
        image = decoder.decode([images[ids[row]]])[0].image
        direct = extractor(image.permute(2, 0, 1)[None]).numpy()[0].astype(np.float16)
        np.testing.assert_allclose(stored[row].astype(np.float32), direct.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored[0], stored[1])  # rows belong to different images

    again = extract(f"dataset.path={tmp_path / 'ava'}", f"store={store}", *SMALL)
    assert again["entry"] == first["entry"]
    assert (again["reused"], again["forward_passes"], again["computed_rows"], again["reused_rows"]) == (True, 0, 0, 12)


def bad_input_zoo(rng) -> dict[str, bytes | None]:
    def encode(image: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    photo = Image.open(io.BytesIO(jpeg_bytes(rng, 72, 56)))
    good = jpeg_bytes(rng, 64, 48)
    huge = Image.fromarray(np.tile(np.linspace(0, 255, 10000, dtype=np.uint8)[None, :, None], (10000, 1, 3)))
    return {
        "ok1": good, "ok2": jpeg_bytes(rng, 64, 48),
        "missing": None,
        "truncated": good[: len(good) // 2],
        "garbage": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "png_rgba": encode(photo.convert("RGBA"), "PNG"),
        "webp": encode(photo, "WEBP", quality=90),
        "cmyk": encode(photo.convert("CMYK"), "JPEG"),
        "gray": encode(photo.convert("L"), "JPEG"),
        "huge": encode(huge, "JPEG", quality=50),
    }


def test_bad_input_zoo_completes_with_per_row_failures(ray_local, tmp_path):
    write_ava(tmp_path / "ava", bad_input_zoo(np.random.default_rng(1)))
    store = str(tmp_path / "store")
    result = extract(f"dataset.path={tmp_path / 'ava'}", f"store={store}", *SMALL, f"max_pixels={256 * 256}")
    assert result["ok"] + result["failed"] == result["rows"] == 11
    ids, status, failures, gsf = view_rows(store, result["entry"])
    status = dict(zip(ids, status))
    reasons = {ids[row]: reason for row, reason in failures.items()}
    assert set(reasons) == {"missing", "truncated", "garbage", "empty"}
    assert "missing file" in reasons["missing"]
    assert all(status[i] == STATUS_FAILED for i in reasons)
    for name in ("ok1", "ok2", "png_rgba", "webp", "cmyk", "gray", "huge"):
        assert status[name] == STATUS_OK, name
    assert np.all(gsf[[ids.index(i) for i in reasons]] == 0)
    assert np.all(np.abs(gsf[ids.index("huge")]).sum() > 0)


def test_csv_dataset_on_s3_with_unreadable_object_into_s3_store(ray_local, tmp_path, s3_bucket):
    import boto3

    s3 = boto3.client("s3")
    images = good_images(5, seed=3)
    lines = ["image,mean_score,split"]
    for i, (image_id, data) in enumerate(images.items()):
        s3.put_object(Bucket=s3_bucket, Key=f"imgs/{image_id}.jpg", Body=data)
        lines.append(f"s3://{s3_bucket}/imgs/{image_id}.jpg,{4 + i * 0.5},{'test' if i == 0 else 'train'}")
    lines.append(f"s3://{s3_bucket}/imgs/not-there.jpg,5.0,train")
    s3.put_object(Bucket=s3_bucket, Key="data.csv", Body="\n".join(lines).encode())
    store = f"s3://{s3_bucket}/features"
    result = extract(f"dataset.path=s3://{s3_bucket}/data.csv", "dataset.format=csv", f"store={store}", *SMALL)
    assert (result["rows"], result["ok"], result["failed"]) == (6, 5, 1)
    reader = FeatureStore(store).open(result["entry"])
    assert list(reader.failures().values())[0].startswith("missing file s3://")
    for key in (result["entry"], result["segment"]):
        verify = subprocess.run([sys.executable, "-m", "featurestore", "verify", store, key],
                                capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=120)
        assert verify.returncode == 0, verify.stderr


def test_bad_config_fails_fast_naming_the_problem(tmp_path):
    write_ava(tmp_path / "ava", good_images(2))
    unknown = extract_cli(f"dataset.path={tmp_path / 'ava'}", "backbones=[resnet_9000]", f"store={tmp_path / 's'}")
    assert unknown.returncode == 2 and "resnet_9000" in unknown.stderr and "Traceback" not in unknown.stderr
    typo = extract_cli(f"dataset.path={tmp_path / 'ava'}", "weigths=random:0")
    assert typo.returncode == 2 and "unknown config key 'weigths'" in typo.stderr
    missing = extract_cli(f"dataset.path={tmp_path / 'nope'}", *SMALL, f"store={tmp_path / 's'}")
    assert missing.returncode == 2 and "AVA.txt" in missing.stderr


def test_help_lists_the_keys():
    result = extract_cli("--help")
    assert result.returncode == 0
    for key in ("dataset.path", "dataset.format", "store", "backbones", "weights", "workers"):
        assert key in result.stdout


def test_cli_result_is_the_last_stdout_line(tmp_path):
    write_ava(tmp_path / "ava", good_images(3))
    result = extract_cli(f"dataset.path={tmp_path / 'ava'}", *SMALL, f"store={tmp_path / 'store'}")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["rows"] == out["ok"] == 3 and out["entry"].startswith("gsf-")
    assert "images/s" in result.stderr  # progress on stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_extraction_uses_bf16_and_mixed_decode(ray_local, tmp_path):
    write_ava(tmp_path / "ava", good_images(6))
    result = extract(f"dataset.path={tmp_path / 'ava'}", f"store={tmp_path / 'store'}", "backbones=[resnet18]",
                     "weights=random:0", "device=cuda")
    spec = FeatureStore(str(tmp_path / "store")).open(result["segment"]).spec
    assert spec.identity["extractor"]["compute_dtype"] == "bfloat16" and result["ok"] == 6


def shard_tasks(tmp_path, images: dict[str, bytes], shard_rows: int) -> tuple[dict, list[ShardTask]]:
    """ShardExtractor arguments for a resnet18 segment of ``images`` written to files, and its tasks."""
    uris, digests = [], []
    for name, data in images.items():
        (tmp_path / f"{name}.jpg").write_bytes(data)
        uris.append(str(tmp_path / f"{name}.jpg"))
        digests.append(hashlib.sha256(data).hexdigest())
    extractor = build_extractor(["resnet18"], "random:0", device="cpu").extractor_spec(
        input_policy=input_policy(4096 ** 2))
    spec = EntrySpec(kind=SEGMENT_KIND,
                     identity={"extractor": extractor.to_json(), "images": "test", "rows": len(uris)})
    layout = EntryLayout(rows=len(uris), shard_rows=shard_rows, chunk_rows=shard_rows,
                         arrays=(ArraySpec(GSF_ARRAY, extractor.width, "float16"), ArraySpec(HASH_ARRAY, 32, "uint8")))
    kwargs = {"store": str(tmp_path / "store"), "spec": spec.to_json(), "layout": layout.to_json(),
              "backbones": ["resnet18"], "weights": "random:0", "max_pixels": 4096 ** 2, "batch_size": 2,
              "device": "cpu"}
    tasks = [ShardTask(shard, start, tuple(uris[start:start + shard_rows]), tuple(digests[start:start + shard_rows]))
             for shard, start in enumerate(range(0, len(uris), shard_rows))]
    return kwargs, tasks


def test_pipelined_shards_are_bit_equal_to_a_sequential_forward(tmp_path):
    """run_all overlaps loading, forwarding and writing across shards; the bytes must be those of
    forwarding the same batches one after another. (At these tiny sizes a row's bytes depend on
    its batch companions, so this checks that every row's batch is the planned one.)"""
    images = good_images(10)
    kwargs, tasks = shard_tasks(tmp_path, images, shard_rows=4)
    extractor = ShardExtractor(**kwargs)
    results = extractor.run_all(tasks)
    assert [(r.shard, r.rows, r.ok, r.failed) for r in results] == [(0, 4, 4, 0), (1, 4, 4, 0), (2, 2, 2, 0)]
    stored = FeatureStore(kwargs["store"]).open(EntrySpec.from_json(kwargs["spec"]).key, require_complete=False)

    reference = build_extractor(["resnet18"], "random:0", device="cpu")  # shard by shard, nothing overlapped
    decoded = [d.image for d in ImageDecoder(device="cpu").decode(list(images.values()))]
    sizes = {r: tuple(image.shape[:2]) for r, image in enumerate(decoded)}
    expected = np.zeros((len(images), reference.width), np.float16)
    done: set[int] = set()
    for i, task in enumerate(tasks):
        own = {r: sizes[r] for r in range(task.start, task.start + len(task.uris)) if r not in done}
        following = {r: sizes[r] for r in range(task.start + len(task.uris), min(task.start + 2 * len(task.uris),
                                                                                  len(images)))}
        plan = shard_batches(own, following if i + 1 < len(tasks) else {}, 2, 4 * 1024 * 1024)
        for batch in plan.full + plan.topped_up:
            x = torch.stack([decoded[r] for r in batch]).permute(0, 3, 1, 2)
            expected[list(batch)] = reference(x).numpy().astype(np.float16)
            done.update(batch)
    assert done == set(range(len(images)))
    got = stored.read_range(0, len(images), [GSF_ARRAY])[GSF_ARRAY]
    assert got.tobytes() == expected.tobytes()

    assert [r.forward_passes for r in extractor.run_all(tasks)] == [0, 0, 0]  # committed: resumed, not redone


def test_a_failed_background_write_surfaces_and_leaves_only_its_shard_uncommitted(tmp_path, monkeypatch):
    kwargs, tasks = shard_tasks(tmp_path, good_images(6), shard_rows=2)
    actor = ShardWorker(**kwargs, threads=torch.get_num_threads())  # leaves the setting as is
    writer = actor.extractor.writer
    write_shard = writer.write_shard

    def failing(shard, *args, **kw):
        if shard == 1:
            raise OSError("disk full")
        return write_shard(shard, *args, **kw)

    monkeypatch.setattr(writer, "write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        actor.run(tasks)  # the call fails, so the driver retries it and the job reports what stays missing
    assert writer.missing_shards() == [1]  # the other shards of the call still committed

    monkeypatch.setattr(writer, "write_shard", write_shard)  # the retry: committed shards are skipped
    results = actor.run(tasks)
    assert [(r.shard, r.ok, r.forward_passes > 0) for r in results] == [(0, 0, False), (1, 2, True), (2, 0, False)]
    assert writer.missing_shards() == []


def test_a_worker_built_with_other_weights_reports_the_mismatch(tmp_path):
    kwargs, tasks = shard_tasks(tmp_path, good_images(2), shard_rows=2)
    actor = ShardWorker(**{**kwargs, "weights": "random:1"}, threads=torch.get_num_threads())
    with pytest.raises(SpecMismatch, match="differ from the entry spec"):
        actor.ready()
    with pytest.raises(SpecMismatch):
        actor.run(tasks)
