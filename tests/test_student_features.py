"""Frozen-backbone students (Table V) trained from pooled features stored once per image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_student import TINY, knowledge_entry, train

from featurestore.features import FeatureIndex, read_features, table_segments
from featurestore.pixels import PIXELS_ARRAY, PixelViewSpec, pixel_index
from featurestore.specs import ExtractorSpec
from featurestore.store import FeatureStore
from trainers.student import StudentError, StudentSpec, build_student, load_student


def test_a_frozen_student_trains_from_pooled_features_that_equal_its_backbone_on_the_stored_views(ray_local, tmp_path):
    from ray_jobs.stages.evaluate import EvaluateConfig, evaluate
    from trainers.student_features import pooled_extractor

    store_url = str(tmp_path / "store")
    key = knowledge_entry(tmp_path, store_url)
    run = (f"store={store_url}", f"knowledge_entry={key}", *TINY, "student.freeze_backbone=true", "epochs=2",
           f"storage_path={tmp_path / 'runs'}")
    kd = train(*run, "name=frozen-kd")
    assert kd["pooled"]["computed"] == 30  # every image with a stored view (the undecodable one has none)
    assert kd["train_rows"] > 0 and kd["unreadable_rows"] == 1

    # the stored rows are the frozen backbone's pooled feature of each stored view
    store = FeatureStore(store_url, create=False)
    view = PixelViewSpec.from_json({"view": "resize:64", "height": 64, "width": 64, "decoder": "dali-cpu"})
    spec = StudentSpec.from_json(kd["student"])
    extractor = pooled_extractor(spec, view, use_gpu=False)
    assert extractor.to_json() == ExtractorSpec.from_json(extractor.to_json()).to_json()
    index = FeatureIndex.build(store, table_segments(store, extractor))
    views = pixel_index(store, view)
    assert len(index) == 30 and np.array_equal(index.hashes, views.hashes)
    pooled = read_features(store, index, index.hashes[:7])
    pixels = read_features(store, views, index.hashes[:7], array=PIXELS_ARRAY).reshape(7, 64, 64, 3)
    with torch.inference_mode():
        expected = build_student(spec).pool(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    assert pooled.dtype == np.float32 and np.allclose(pooled, expected, rtol=1e-5, atol=1e-6)

    # the checkpoint is a whole student: scored from the images, it gets the run's test metrics,
    # and its backbone is the initial one (only fc and head trained)
    scored = evaluate(EvaluateConfig(checkpoint=kd["checkpoint"], store=store_url, split="test", batch_size=4))
    assert scored.n == kd["metrics"]["n"]
    for name in ("srcc", "plcc", "acc", "emd"):
        assert scored.metrics[name] == pytest.approx(kd["metrics"][name], abs=1e-5), name
    trained, _, _ = load_student(kd["checkpoint"])
    initial = build_student(spec)
    assert all(torch.equal(a, b) for a, b in zip(trained.backbone.state_dict().values(),
                                                 initial.backbone.state_dict().values()))
    assert not torch.equal(trained.head.weight, initial.head.weight)

    # another loss and seed reuse the stored rows: nothing pooled again
    baseline = train(*run, "loss.kind=baseline", "seed=1", "name=frozen-baseline")
    assert baseline["pooled"] == {"table": kd["pooled"]["table"], "computed": 0}
    assert baseline["metrics"]["n"] == kd["metrics"]["n"] and baseline["metrics"] != kd["metrics"]


def test_pooled_inputs_stand_in_for_a_frozen_backbone_only():
    frozen = build_student(StudentSpec("resnet18", view="resize:32", freeze_backbone=True))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        direct = frozen(images)
        from_pooled = frozen(frozen.pool(images), pooled=True)
    assert all(torch.equal(a, b) for a, b in zip(direct, from_pooled))
    trainable = build_student(StudentSpec("resnet18", view="resize:32"))
    with pytest.raises(StudentError, match="only when it is frozen"):
        trainable(trainable.pool(images), pooled=True)
