"""Student training on Ray Train: 2 gloo workers on CPU, exactly-once data, S3 checkpoints, recovery."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from image_data import good_images, write_ava

from featurestore.dataset_table import DatasetTable
from featurestore.datasets import load_dataset
from featurestore.partition import World
from featurestore.specs import BackboneSpec, ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import GsfView, import_features
from ray_jobs.config import load_config
from trainers.distiller import DistillerSpec
from trainers.knowledge import distill, knowledge_hashes, knowledge_rows

N_IMAGES = 30
TINY = ["student.backbone=resnet18", "student.weights=random:0", "student.view=resize:64", "global_batch_size=8",
        "num_workers=2", "cpus_per_worker=1", "lr=1e-3", "max_unreadable_fraction=0.1"]  # 1 of 24 never decodes


def knowledge_entry(tmp_path: Path, store_url: str) -> str:
    """A real dataset (generated JPEGs, AVA layout), a GSF entry of random features for it, and a
    knowledge entry fitted on those: all the student needs, without running the backbones."""
    good = list(good_images(N_IMAGES, seed=5).items())
    # row 1 (a train row) never decodes: it must get weight 0, not stall or skew training
    images = dict([good[0], ("broken", b"not a jpeg"), *good[1:]])
    write_ava(tmp_path / "ava", images, test_every=5)  # rows 0, 5, 10, ... are test
    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    store = FeatureStore(store_url)
    extractor = ExtractorSpec(backbones=(BackboneSpec("toy", "random:0", ("stem",), 24),))
    gsf = np.random.default_rng(0).random((len(table), 24)).astype(np.float16)
    view = import_features(store, extractor, table, gsf, shard_rows=8)
    spec = DistillerSpec(backbones=("toy",), hidden=(16, 8), epochs=2, batch_size=8)
    return distill(store, view.key, spec, torch.device("cpu"))["entry"]


def fitted_train_ids(tmp_path: Path) -> list[str]:
    """The ids of the train images a student fits: the train split without the validation set
    (``val_fraction``, default 0.1) that ``featurestore.splits.validation_mask`` carves out."""
    from featurestore.splits import validation_mask

    table = DatasetTable.from_manifest(load_dataset(str(tmp_path / "ava"), "ava"))
    train_ids = table.image_ids[table.splits == "train"]
    return train_ids[~validation_mask(train_ids, 0.1)].tolist()


def train(*overrides: str) -> dict:
    from ray_jobs.train_student import TrainConfig, main

    return main(load_config(TrainConfig, None, list(overrides)))


def image_source(kind: str, store_url: str, data, size=(32, 32)):
    """The stream's images: decoded every epoch, or the stored views (decoded once, on Ray tasks)."""
    from trainers.images import ImageDecoder
    from trainers.student_data import DecodedImages, StoredImages
    from trainers.student_views import ensure_views, pixel_view

    if kind == "decode":
        return DecodedImages(data, ImageDecoder(device="cpu", resize=size), size, locality_rows=8)
    distinct, first = np.unique(data.sha256, return_index=True)
    views = ensure_views(store_url, pixel_view(f"resize:{size[0]}x{size[1]}", use_gpu=False), distinct,
                         [data.uris[i] for i in first])
    return StoredImages(store_url, views, data)


@pytest.mark.parametrize("source", ["decode", "stored"])
def test_stream_partitions_train_rows_exactly_once_with_equal_steps(ray_local, tmp_path, source):
    from trainers.images import ImageDecoder
    from trainers.student_data import StudentStream, split_rows

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    store = FeatureStore(store_url)
    knowledge = store.open(key)
    dataset = GsfView(store, knowledge.attrs["view"]).dataset()
    data = split_rows(dataset, knowledge_hashes(knowledge), "train", "distribution")
    assert len(data) == 24 and all(dataset.splits[r] == "train" for r in data.rows) and 1 in data.rows
    images = image_source(source, store_url, data)
    reference = ImageDecoder(device="cpu", resize=(32, 32))
    for world in (1, 2, 3, 5):
        seen, steps = [], []
        for rank in range(world):
            stream = StudentStream(store_url, key, data, "distribution", World(rank, world), 4, images, seed=3,
                                   window_blocks=2)
            batches = list(stream.epoch(epoch=1))
            steps.append(len(batches))
            for b in batches:
                assert b.images.shape[1:] == (3, 32, 32) and b.teacher_feature.shape[1] == 8
                krows = knowledge_rows(knowledge_hashes(knowledge), dataset.sha256[b.rows])
                np.testing.assert_array_equal(b.teacher_feature.numpy(),
                                              knowledge.read_rows(krows, ["feature"])["feature"])
                used = b.weight.numpy() > 0
                # each used image is its own view, as decoding it now gives (stored or not)
                want = [d.image.permute(2, 0, 1) for d in reference.decode(
                    [Path(dataset.uris[r]).read_bytes() for r in b.rows[used]])]
                assert all(torch.equal(got, w) for got, w in zip(b.images[used], want))
                seen += b.rows[used].tolist()
        assert len(set(steps)) == 1  # DDP needs equal step counts
        assert sorted(seen) == sorted(set(data.rows.tolist()) - {1})


@pytest.mark.parametrize("source", ["decode", "stored"])
def test_a_moved_dataset_streams_every_row_and_changed_images_are_counted(ray_local, tmp_path, source):
    from trainers.student_data import StudentStream, split_rows

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    store = FeatureStore(store_url)
    knowledge = store.open(key)
    (tmp_path / "ava").rename(tmp_path / "moved")
    moved = DatasetTable.from_manifest(load_dataset(str(tmp_path / "moved"), "ava"))
    data = split_rows(moved, knowledge_hashes(knowledge), "train", "distribution")
    assert len(data) == 24 and all(u.startswith(str(tmp_path / "moved")) for u in data.uris)
    changed = data.uris[2]
    Path(changed).write_bytes(Path(data.uris[3]).read_bytes())  # other bytes than were indexed
    stream = StudentStream(store_url, key, data, "distribution", World(0, 1), 4, image_source(source, store_url, data),
                           seed=0)
    used = [r for b in stream.epoch(0) for r in b.rows[b.weight.numpy() > 0].tolist()]
    assert sorted(used) == sorted(set(data.rows.tolist()) - {1, int(data.rows[2])})
    assert stream.unreadable.count == 2  # the undecodable one and the changed one
    assert changed in stream.unreadable.example or "broken" in stream.unreadable.example


def same_epochs(got: list[dict], want: list[dict]) -> None:
    """The same epochs with the same train losses, lr and validation metrics; only timings differ.
    Exact: on the CPU every op of an epoch is deterministic (no dropout, fixed data order)."""
    assert [h["epoch"] for h in got] == [h["epoch"] for h in want]
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "epoch_seconds"} == \
            {k: v for k, v in w.items() if k != "epoch_seconds"}, g["epoch"]


def ray_train_workers(root: psutil.Process) -> dict[int, psutil.Process]:
    """The Ray Train workers among ``root``'s descendants, by pid. A local Ray instance's raylet is
    a child of the process that started it and starts the workers, so these are the workers of
    the instance ``root`` started, never another run's on the same machine."""
    workers = {}
    for child in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                workers[child.pid] = child
        except psutil.Error:
            continue  # ended meanwhile
    return workers


def s3_json(s3, bucket: str, key: str):
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def registered_history(s3, bucket: str, run: str) -> list[dict] | None:
    """The history saved with the latest checkpoint that Ray Train has registered for ``run`` (the
    one a restart resumes from), or None while there is none. Registration follows the upload: a
    worker killed in between restarts from the checkpoint before, so Ray's snapshot decides."""
    from botocore.exceptions import ClientError

    try:
        latest = s3_json(s3, bucket, f"{run}/checkpoint_manager_snapshot.json")["latest_checkpoint_result"]
        return s3_json(s3, bucket, f"{run}/{latest['checkpoint_dir_name']}/history.json")
    except (ClientError, ValueError, KeyError, TypeError):
        return None  # none yet, or being written


def train_killing_a_worker(checkpointed, *overrides: str) -> tuple[dict, dict]:
    """``train(*overrides)``, killing one of its two Ray Train workers (by pid, and only one that
    this run started in this process's own Ray instance) once ``checkpointed()`` gives the history
    of a registered checkpoint. Returns the result and what was seen: ``before`` (that history),
    ``victim`` (pid) and ``restarted`` (pids of the workers Ray Train started in their place)."""
    me = psutil.Process()
    earlier = set(ray_train_workers(me))  # none expected; never this run's
    seen: dict = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            workers = {pid: p for pid, p in ray_train_workers(me).items() if pid not in earlier}
            if "victim" not in seen:
                if len(workers) == 2 and (history := checkpointed()) is not None:
                    seen.update(before=history, workers=set(workers), victim=min(workers))
                    workers[min(workers)].kill()
            elif restarted := set(workers) - seen["workers"]:
                seen["restarted"] = restarted
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        result = train(*overrides)
    finally:
        done.set()
        thread.join()
    return result, seen


def test_two_gloo_workers_checkpoint_to_s3_and_killed_or_rerun_resume_as_if_never_stopped(ray_local, tmp_path,
                                                                                          s3_bucket):
    import boto3

    from trainers.student import StudentError, StudentSpec, build_student, restore_student

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    # lr ÷ 10 after epochs 1 and 3: a resumed scheduler that restarted its count would miss the first
    run = (f"store={store_url}", f"knowledge_entry={key}", *TINY, "lr_step_epochs=2")
    s3, storage = boto3.client("s3"), f"s3://{s3_bucket}/runs"

    # the reference: 4 epochs without a stop
    straight = train(*run, "epochs=4", f"storage_path={tmp_path / 'runs'}", "name=kd-straight")
    assert [h["lr"] for h in straight["history"]] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])  # after each epoch

    # a worker killed after the first checkpoint: Ray Train restarts the workers from it
    killed, seen = train_killing_a_worker(lambda: registered_history(s3, s3_bucket, "runs/kd-run"), *run,
                                          "epochs=3", f"storage_path={storage}", "name=kd-run", "max_failures=2")
    assert "victim" in seen, "no checkpoint was registered while the run's two workers were up"
    assert seen.get("restarted"), "no new Ray Train worker was started after the kill"
    assert not psutil.pid_exists(seen["victim"]) or psutil.Process(seen["victim"]).status() == psutil.STATUS_ZOMBIE
    assert killed["epochs"] == 3 and killed["checkpoint"].startswith(f"s3://{s3_bucket}/runs/kd-run")
    assert set(killed["metrics"]) >= {"srcc", "plcc", "acc", "emd"}
    fitted = fitted_train_ids(tmp_path)
    assert "broken" in fitted and 0 < len(fitted) < 24  # 24 train rows, some held out for validation
    assert killed["train_rows"] == len(fitted) - 1 and killed["unreadable_rows"] == 1  # one undecodable
    assert {"val_srcc", "val_emd"} <= set(killed["history"][0]) and "test_srcc" not in killed["history"][-1]
    before = seen["before"]
    assert 1 <= len(before) < 3 and killed["history"][:len(before)] == before  # with timings: kept, not retrained
    same_epochs(killed["history"], straight["history"][:3])  # model, Adam moments, schedule all restored
    names = {Path(o["Key"]).name for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/kd-run")["Contents"]}
    assert {"model.safetensors", "student.json", "optimizer.safetensors", "trainer_state.json"} <= names

    # the same name resumes: only the new epoch runs, and it is the uninterrupted run's epoch 3
    more = train(*run, "epochs=4", f"storage_path={storage}", "name=kd-run")
    assert more["history"][:3] == killed["history"]
    same_epochs(more["history"], straight["history"])
    assert more["metrics"] == straight["metrics"]

    # resuming goes through the student's checked loading: a checkpoint holding another save's
    # weights (the older checkpoint's, as a crash while overwriting would leave it) is refused
    snapshot = s3_json(s3, s3_bucket, "runs/kd-run/checkpoint_manager_snapshot.json")
    latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    (older,) = {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]} - {latest}  # num_to_keep=2
    s3.copy_object(Bucket=s3_bucket, Key=f"runs/kd-run/{latest}/model.safetensors",
                   CopySource={"Bucket": s3_bucket, "Key": f"runs/kd-run/{older}/model.safetensors"})
    with pytest.raises(Exception, match="state digest differs"):
        train(*run, "epochs=5", f"storage_path={storage}", "name=kd-run", "max_failures=0")
    # and a checkpoint of another student is not loaded into this one
    other = StudentSpec.from_json({**more["student"], "view": "resize:32"})
    with pytest.raises(StudentError, match="another student.*view: 'resize:64' there, 'resize:32' here"):
        restore_student(build_student(other), straight["checkpoint"])


def test_too_many_unreadable_images_fail_the_run_naming_them(ray_local, tmp_path):
    from trainers.train_loop import UnreadableImages

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    fitted = len(fitted_train_ids(tmp_path))
    (tmp_path / "ava").rename(tmp_path / "moved")  # moved after extraction, and dataset.path not given
    with pytest.raises(UnreadableImages, match=rf"{fitted} of {fitted} train images could not be used in epoch 0.*/ava/.*dataset\.path"):
        train(f"store={store_url}", f"knowledge_entry={key}", *TINY, "epochs=1", "max_failures=0",
              f"storage_path={tmp_path / 'runs'}", "name=unreadable")


def registered_state(s3, bucket: str, run: str) -> dict | None:
    """Where the latest checkpoint Ray Train registered for ``run`` stands (trainer_state.json's
    ``state``: epoch, step, ...), or None while there is none."""
    from botocore.exceptions import ClientError

    try:
        latest = s3_json(s3, bucket, f"{run}/checkpoint_manager_snapshot.json")["latest_checkpoint_result"]
        return s3_json(s3, bucket, f"{run}/{latest['checkpoint_dir_name']}/trainer_state.json")["state"]
    except (ClientError, ValueError, KeyError, TypeError):
        return None


@pytest.mark.slow  # four training runs; CI runs it (.ci/run), make test stays near its budget
def test_a_worker_killed_mid_epoch_resumes_at_the_next_batch_with_the_uninterrupted_losses(ray_local, tmp_path,
                                                                                          s3_bucket):
    """Gradient accumulation (2 micro-batches of 2 rows per worker and step, 2 workers: 8 rows a
    step) and a checkpoint every step: a worker killed after a mid-epoch checkpoint resumes at the
    next batch, and every epoch's losses and metrics equal those of a run never stopped."""
    import boto3

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    run = (f"store={store_url}", f"knowledge_entry={key}", *TINY, "micro_batch_size=2", "checkpoint_every_steps=1",
           "epochs=3")
    straight = train(*run, f"storage_path={tmp_path / 'runs'}", "name=straight")
    assert straight["steps"] == [3, 3, 3] and straight["global_batch_size"] == 8 and straight["world_sizes"] == [2]
    # determinism: a second fresh run of the same config and seed (2 DDP workers, CPU) is
    # bit-identical: every epoch's losses and metrics, and the weights
    again = train(*run, f"storage_path={tmp_path / 'runs'}", "name=again")
    same_epochs(again["history"], straight["history"])
    digests = [json.loads((Path(r["checkpoint"]) / "student.json").read_text())["state_digest"] for r in (straight, again)]
    assert digests[0] == digests[1]
    s3 = boto3.client("s3")

    def mid_epoch() -> list | None:
        state = registered_state(s3, s3_bucket, "runs/mid")
        return [state] if state and state["step"] > 0 else None

    killed, seen = train_killing_a_worker(mid_epoch, *run, f"storage_path=s3://{s3_bucket}/runs", "name=mid",
                                          "max_failures=2")
    assert "victim" in seen and seen.get("restarted"), "no worker was killed after a mid-epoch checkpoint"
    (state,) = seen["before"]
    # the epoch's sums so far, over both workers: 8 rows a step (less the undecodable one, if seen)
    assert 0 < state["step"] < 3 and state["rows_seen"] in (8 * state["step"], 8 * state["step"] - 1)
    same_epochs(killed["history"], straight["history"])
    assert killed["metrics"] == straight["metrics"]


def test_batch_plan_splits_the_global_batch_over_any_world_size():
    from trainers.student_data import BatchPlanError, batch_plan

    assert batch_plan(16, 1, None).micro_sizes(0) == (16,)
    assert batch_plan(16, 2, None).micro_sizes(1) == (8,)
    assert batch_plan(16, 1, 4).micro_sizes(0) == (4, 4, 4, 4)
    assert batch_plan(16, 2, 3).micro_sizes(0) == (3, 3, 2)  # 8 per worker, at most 3 at once
    plan = batch_plan(16, 3, None)  # an elastic resize to 3 workers keeps 16 rows a step
    assert plan.quotas == (6, 5, 5) and plan.accumulation == 1
    # DDP averages the ranks: the scaled means weigh each rank by its share of the global batch
    assert sum(plan.loss_scale(q) for q in plan.quotas) / plan.world_size == pytest.approx(1.0)
    assert plan.shares(100) == [42, 35, 35]  # 7 steps: every rank the same number
    with pytest.raises(BatchPlanError, match=r"global_batch_size=4 is smaller than the 8 workers"):
        batch_plan(4, 8, None)
    with pytest.raises(BatchPlanError, match="empty"):
        batch_plan(5, 2, 1)  # quotas 3 and 2 in micro-batches of 1: three micro-batches, one empty


def test_a_multimodal_student_trains_with_the_multitask_loss_and_its_metrics_are_recomputed(ray_local, tmp_path):
    """Table XII's options together on 2 gloo workers: the two-hot tags stream with the images (as
    input and as the tag head's target), the history's loss is eq. 9's sum of its terms, and the
    evaluation stage, scoring the checkpoint with each image's tags, gets the run's test metrics."""
    from ray_jobs.stages.evaluate import EvaluateConfig, evaluate

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    result = train(f"store={store_url}", f"knowledge_entry={key}", *TINY, "epochs=1", "images=decode",
                   "student.semantic=multimodal", "loss.kind=multitask", f"storage_path={tmp_path / 'runs'}",
                   "name=multimodal-multitask")
    student = result["student"]
    assert (student["semantic"], student["tag_width"], student["tag_head"]) == ("multimodal", 3, True)  # tags.txt: 3
    (epoch,) = result["history"]
    assert all(np.isfinite(epoch[k]) for k in ("loss", "emd_gt", "tag_bce"))
    # eq. 9, both weights 1 (the total is summed in float32, its terms logged apart)
    assert epoch["loss"] == pytest.approx(epoch["emd_gt"] + epoch["tag_bce"], rel=1e-6)
    assert 0 < epoch["tag_bce"] < 2 and epoch["train_rows_seen"] > 0
    metrics = result["metrics"]
    assert set(metrics) >= {"srcc", "plcc", "acc", "emd"} and all(np.isfinite(metrics[k]) for k in ("acc", "emd"))
    scored = evaluate(EvaluateConfig(checkpoint=result["checkpoint"], store=store_url, split="test", batch_size=4))
    assert scored.n == metrics["n"] == 7  # rows 0, 5, ..., 30 of the 31
    for name in ("srcc", "plcc", "acc", "emd"):
        if metrics[name] is None:
            assert scored.metrics[name] is None
        else:
            assert scored.metrics[name] == pytest.approx(metrics[name], abs=1e-5), name


def test_semantic_options_on_a_dataset_without_tags_fail_before_any_worker_starts(tmp_path):
    from trainers.labels import LabelError

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    lines = (tmp_path / "ava" / "AVA.txt").read_text().split("\n")
    rows = [line.split() for line in lines if line]
    header = "image," + ",".join(f"votes_{k}" for k in range(1, 11)) + ",split"
    test_ids = set((tmp_path / "ava" / "generic_test.jpgl").read_text().split())
    (tmp_path / "plain.csv").write_text(header + "\n" + "\n".join(
        f"ava/{r[1]}.jpg," + ",".join(r[2:12]) + f",{'test' if r[1] in test_ids else 'train'}" for r in rows) + "\n")
    common = (f"store={store_url}", f"knowledge_entry={key}", *TINY, f"dataset.path={tmp_path / 'plain.csv'}",
              "dataset.format=csv", f"storage_path={tmp_path / 'runs'}")
    with pytest.raises(LabelError, match=r"dataset '.*' has no semantic tags, which student.semantic=multimodal needs"):
        train(*common, "student.semantic=multimodal", "loss.kind=baseline")
    with pytest.raises(LabelError, match=r"has no semantic tags, which loss 'multitask' needs"):
        train(*common, "loss.kind=multitask")
