"""The student model: shapes, feature range, freezing, checkpoints (local and S3), cost, spec checks,
and the rows it learns from."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import boto3
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featurestore.dataset_table import DatasetTable, hashes_from_hex
from trainers.cost import gflops
from trainers.labels import LabelError, two_hot
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss
from trainers.student import (SEMANTIC_WIDTH, SPEC_FILE, WEIGHTS_FILE, StudentError, StudentSpec, build_student,
                              count_params, decoder_for, load_student, restore_student, save_student, score_images,
                              view_size)
from trainers.student_data import split_rows

TINY = dict(backbone="resnet18", view="resize:64", feature_width=16)


def images(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One Adam step on a loss that touches f_s and the logits, in train mode."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    f_s, logits = model(x)
    (f_s.square().mean() + logits.square().mean()).backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("label, width", [("distribution", 10), ("binary", 1), ("score", 1)])
def test_forward_gives_a_non_negative_feature_and_one_logit_per_output(label, width):
    model = build_student(StudentSpec(**TINY, label=label))
    x = images()
    f_s, logits = model(x)
    assert f_s.shape == (4, 16) and logits.shape == (4, width)
    assert (f_s >= 0).all() and (f_s > 0).any()  # ReLU'd, like the teacher's f_t, but not dead
    f_float, logits_float = model(x.float())  # uint8 and float inputs on 0..255 are the same input
    assert torch.equal(f_s, f_float) and torch.equal(logits, logits_float)


def test_head_initialisation_follows_the_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_student(StudentSpec(**TINY, seed=1))
    assert torch.equal(torch.rand(1), before)
    b, c = build_student(StudentSpec(**TINY, seed=1)), build_student(StudentSpec(**TINY, seed=2))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(a.backbone.conv1.weight, c.backbone.conv1.weight)  # backbone: weights="random:0"


def bn_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}


def test_frozen_backbone_keeps_weights_and_bn_statistics_while_fc_and_head_train():
    model = build_student(StudentSpec(**TINY, freeze_backbone=True))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert count_params(model, trainable=True) == count_params(model.fc) + count_params(model.head)
    backbone_before, stats_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}, bn_buffers(model)
    head_before = model.head.weight.clone()

    model.train()
    assert model.training and model.fc.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    f_s, logits = model(images())
    (f_s.square().mean() + logits.square().mean()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.fc.weight.grad is not None
    train_step(model, images(seed=1))
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(v, stats_before[k]) for k, v in bn_buffers(model).items())
    assert not torch.equal(model.head.weight, head_before)

    trainable = build_student(StudentSpec(**TINY))  # the control: BN statistics do move when not frozen
    stats = bn_buffers(trainable)
    train_step(trainable, images())
    assert any(not torch.equal(v, stats[k]) for k, v in bn_buffers(trainable).items())


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the student under ``module``, keys prefixed ``module.``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    spec = StudentSpec(**TINY, label="distribution", seed=3)
    model = build_student(spec)
    train_step(model, images())  # weights and BN statistics away from their initial values
    extra = {"epoch": 4, "metrics": {"srcc": 0.5, "emd": None}}
    save_student(tmp_path / "ckpt", DDPLike(model), spec, extra=extra)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [WEIGHTS_FILE, SPEC_FILE]

    loaded, loaded_spec, loaded_extra = load_student(tmp_path / "ckpt")
    assert loaded_spec == spec and loaded_extra == extra and not loaded.training
    x = images(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))
    document = json.loads((tmp_path / "ckpt" / SPEC_FILE).read_text())
    assert document["spec"] == spec.to_json() and document["state_digest"].startswith("sha256:")


@pytest.mark.s3
def test_load_from_an_s3_prefix(tmp_path, s3_bucket, s3_endpoint):
    spec = StudentSpec(**TINY, label="score")
    model = build_student(spec)
    save_student(tmp_path / "ckpt", model, spec, extra={"run": "s3"})
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for name in (WEIGHTS_FILE, SPEC_FILE):
        client.upload_file(str(tmp_path / "ckpt" / name), s3_bucket, f"runs/a/checkpoint_000003/{name}")

    loaded, loaded_spec, extra = load_student(f"s3://{s3_bucket}/runs/a/checkpoint_000003/")
    assert loaded_spec == spec and extra == {"run": "s3"}
    x = images()
    assert torch.equal(model(x)[1], loaded(x)[1])
    with pytest.raises(StudentError, match="no student.json"):
        load_student(f"s3://{s3_bucket}/runs/a/nothing")


def test_load_rejects_a_missing_or_mixed_checkpoint(tmp_path):
    with pytest.raises(StudentError, match=f"no {SPEC_FILE}"):
        load_student(tmp_path / "absent")
    spec = StudentSpec(**TINY)
    save_student(tmp_path / "a", build_student(spec), spec)
    save_student(tmp_path / "b", build_student(StudentSpec(**TINY, seed=1)), spec)
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(StudentError, match="state digest differs"):
        load_student(tmp_path / "a")


def test_params_and_flops_scale_with_the_view():
    small, large = StudentSpec(**TINY), StudentSpec(**{**TINY, "view": "resize:128"})
    model = build_student(small)
    assert count_params(model) > 11_000_000  # ResNet-18 without its classifier, plus fc and head
    model.train()
    g_small, g_large = gflops(model, *view_size(small.view)), gflops(model, *view_size(large.view))
    assert model.training  # the mode is restored
    assert 0.1 < g_small < 0.2  # ResNet-18 is 1.8 G multiply-adds at 224², so ~0.15 G at 64²
    assert g_large / g_small == pytest.approx(4, rel=0.02)
    assert view_size("pad_crop:800:640") == (640, 640) and view_size("resize:30x40") == (30, 40)


@pytest.mark.parametrize("fields, message", [
    ({"backbone": "no_such_net"}, "unknown backbone"),
    ({"label": "ranking"}, "label"),
    ({"view": "resize:0"}, "positive"),
    ({"view": "crop:300"}, "view"),
    ({"view": "pad_crop:600:640"}, "crop no larger"),
    ({"feature_width": 0}, "feature_width"),
    ({"weights": "random"}, "explicit seed"),
    ({"weights": "packaged"}, "no packaged weights for 'resnet18'"),
    ({"seed": -1}, "seed"),
])
def test_spec_validation_names_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        StudentSpec(**{**TINY, **fields})


def test_spec_json_round_trip_and_unknown_keys():
    spec = StudentSpec("swsl_resnext101_32x8d", "hub", 512, "binary", "pad_crop:800:640", True, 7)
    assert StudentSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(StudentError, match="unknown keys \\['width'\\]"):
        StudentSpec.from_json({**spec.to_json(), "width": 3})


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("view, shape", [("resize:64", (64, 64)), ("resize:48x32", (48, 32)),
                                         ("pad_crop:800:640", (640, 640))])
def test_decoder_produces_the_view(view, shape):
    decoder = decoder_for(StudentSpec(**{**TINY, "view": view}), "pil")
    (decoded,) = decoder.decode([jpeg(120, 90)])
    assert decoded.image.shape == (*shape, 3) and decoded.image.dtype == torch.uint8


def test_packaged_lite_backbone_uses_tensorflow_normalisation():
    model = build_student(StudentSpec("tf_efficientnet_lite0", "packaged", feature_width=8))
    assert torch.equal(model.mean.flatten(), torch.full((3,), 127.0))
    assert torch.equal(model.std.flatten(), torch.full((3,), 128.0))
    assert model.fc.in_features == 1280 and model(images(2))[1].shape == (2, 10)


def test_split_rows_are_the_labelled_rows_of_the_split_that_have_knowledge():
    n = 9
    votes = np.array([[i % 4] * 10 for i in range(n)])  # rows 0, 4, 8 have no votes
    table = DatasetTable(name="rows", image_ids=np.array([str(i) for i in range(n)], object),
                         uris=np.array([f"/d/{i}.jpg" for i in range(n)], object),
                         sha256=hashes_from_hex([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]),
                         splits=np.array(["train", "train", "test"] * 3, object), votes=votes)
    hashes = np.sort(table.sha256[:7])  # rows 7 and 8 have no knowledge
    position = {h: k for k, h in enumerate(hashes.tolist())}
    for split in ("train", "test", "all"):
        candidates = [i for i in range(n) if (split == "all" or table.splits[i] == split) and votes[i].sum() > 0
                      and i < 7]
        expected = sorted(candidates, key=lambda i: position[table.sha256[i]])
        data = split_rows(table, hashes, split, "distribution")
        assert data.rows.tolist() == expected, split
        assert data.knowledge_rows.tolist() == [position[table.sha256[i]] for i in expected]
        np.testing.assert_allclose(data.targets, np.full((len(expected), 10), 0.1))
        assert data.uris == tuple(f"/d/{i}.jpg" for i in expected)
    # train: rows 1, 3, 6 (0, 4 have no votes; 7 no knowledge); test: rows 2, 5 (8 has neither)
    assert [len(split_rows(table, hashes, split, "score")) for split in ("train", "test")] == [3, 2]
    only_train = dataclasses.replace(table, splits=np.full(n, "train", object))
    assert len(split_rows(only_train, hashes, "test", "distribution")) == 0  # no test split: no validation rows
    with pytest.raises(LabelError, match="dataset 'rows': label=score needs vote counts or mean scores"):
        split_rows(dataclasses.replace(table, votes=None), hashes, "train", "score")


# ---- semantic guidance (Table XII): the multi-modal branch and the multitask tag head ---------

TAGGED = dict(TINY, semantic="multimodal", tag_width=4)


def test_a_multimodal_student_reads_the_tags_and_its_visual_feature_does_not():
    model = build_student(StudentSpec(**TAGGED))
    x = images(3)
    tags_a = torch.from_numpy(two_hot(np.array([[1, 3], [2, 0], [0, 0]]), 4))
    tags_b = torch.from_numpy(two_hot(np.array([[4, 0], [2, 0], [1, 2]]), 4))  # image 1's tags unchanged
    (f_a, logits_a), (f_b, logits_b) = model(x, tags_a), model(x, tags_b)
    assert logits_a.shape == (3, 10) and model.head.in_features == 16 + SEMANTIC_WIDTH
    assert torch.equal(f_a, f_b)  # f_s is the visual feature: the KD term compares it with f_t
    assert not torch.allclose(logits_a[0], logits_b[0]) and not torch.allclose(logits_a[2], logits_b[2])
    assert torch.equal(logits_a[1], logits_b[1])  # same image, same tags: same output
    # the head reads both: its output is head(concat(f_s, the two FC layers' encoding of the tags))
    expected = model.head(torch.cat([f_a, torch.relu(model.semantic[2](torch.relu(model.semantic[0](tags_a))))], 1))
    torch.testing.assert_close(logits_a, expected)
    with pytest.raises(StudentError, match=r"multimodal student needs two-hot tags \[3, 4\].*got none"):
        model(x)
    with pytest.raises(StudentError, match=r"got shape \(3, 5\)"):
        model(x, torch.zeros(3, 5))


def test_a_student_without_semantic_ignores_tags_and_keeps_its_shape():
    plain = build_student(StudentSpec(**TINY))
    x = images(2)
    f_s, logits = plain(x)
    for tags in (torch.zeros(2, 4), torch.ones(2, 4)):
        f_t, logits_t = plain(x, tags)
        assert torch.equal(f_s, f_t) and torch.equal(logits, logits_t)
    assert not hasattr(plain, "semantic") and not hasattr(plain, "tag_head") and plain.head.in_features == 16


def test_the_tag_head_predicts_the_tag_vector_from_the_visual_feature_and_every_weight_learns():
    spec = StudentSpec(**{**TAGGED, "tag_head": True})
    model = build_student(spec)
    x, tags = images(3), torch.from_numpy(two_hot(np.array([[1, 3], [2, 0], [0, 0]]), 4))
    f_s, logits, tag_logits = model(x, tags, predict_tags=True)
    assert tag_logits.shape == (3, 4)
    torch.testing.assert_close(tag_logits, model.tag_head(f_s))
    assert torch.equal(model(x, tags)[1], logits)  # the aesthetic output is the same with or without
    # multitask (eq. 9) reaches every parameter: DDP runs with find_unused_parameters=False
    model.train()
    f_s, logits, tag_logits = model(x, tags, predict_tags=True)
    gt = torch.full((3, 10), 0.1)
    total, _ = student_loss(LossSpec("multitask"), StudentOutputs(logits.softmax(1), f_s, tag_logits),
                            Targets(gt=gt, tags=tags))
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(StudentError, match="predict_tags needs a student with a tag head"):
        build_student(StudentSpec(**TAGGED))(x, tags, predict_tags=True)


@pytest.mark.parametrize("fields, message", [
    ({"semantic": "text", "tag_width": 4}, "semantic 'text' is not one of multimodal"),
    ({"semantic": "multimodal"}, "needs the dataset's tag width"),
    ({"tag_head": True}, "needs the dataset's tag width"),
    ({"tag_width": 4}, "any other has tag_width 0"),
    ({"semantic": "multimodal", "tag_width": -1}, "tag_width must be a non-negative integer"),
])
def test_semantic_spec_validation_names_the_problem(fields, message):
    with pytest.raises(StudentError, match=message):
        StudentSpec(**{**TINY, **fields})


def test_a_multimodal_multitask_checkpoint_round_trips_and_scores_the_same(tmp_path):
    spec = StudentSpec(**{**TAGGED, "tag_head": True, "seed": 2})
    model = build_student(spec)
    tags = torch.from_numpy(two_hot(np.array([[1, 3], [2, 0], [0, 0], [4, 4]]), 4))
    model.train()
    f_s, logits, tag_logits = model(images(), tags, predict_tags=True)
    (f_s.square().mean() + logits.square().mean() + tag_logits.square().mean()).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    save_student(tmp_path / "ckpt", model, spec)
    loaded, loaded_spec, _ = load_student(tmp_path / "ckpt")
    assert loaded_spec == spec and (loaded_spec.semantic, loaded_spec.tag_width, loaded_spec.tag_head) == (
        "multimodal", 4, True)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert {"semantic.0.weight", "semantic.2.weight", "tag_head.weight"} <= set(loaded.state_dict())
    x = images(4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model(x, tags, predict_tags=True), loaded(x, tags, predict_tags=True)))
    # the scoring path (evaluate, predict) reads image files and passes each its tags
    uris = []
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(80 + 10 * i, 60))
        uris.append(str(tmp_path / f"{i}.jpg"))
    scored = score_images(loaded, uris, batch_size=3, tags=tags.numpy())
    again = score_images(model, uris, batch_size=4, tags=tags.numpy())
    assert scored.ok.all() and scored.output.shape == (4, 10)
    np.testing.assert_allclose(scored.output, again.output, rtol=1e-5, atol=1e-6)
    other = score_images(loaded, uris, batch_size=4, tags=np.zeros((4, 4), np.float32))
    assert not np.allclose(other.output, scored.output)  # the tags it was given are the tags it used
    with pytest.raises(StudentError, match=r"this student is multimodal: scoring needs each image's two-hot tags"):
        score_images(loaded, uris)
    # and a checkpoint of a multimodal student is not resumed as an images-only one
    with pytest.raises(StudentError, match="another student.*semantic: 'multimodal' there, None here"):
        restore_student(build_student(StudentSpec(**{**TINY, "seed": 2})), tmp_path / "ckpt")


def test_split_rows_carry_each_rows_tag_ids():
    n = 6
    table = DatasetTable(name="tagged", image_ids=np.array([str(i) for i in range(n)], object),
                         uris=np.array([f"/d/{i}.jpg" for i in range(n)], object),
                         sha256=hashes_from_hex([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]),
                         splits=np.array(["train", "test"] * 3, object), votes=np.ones((n, 10), np.int64),
                         tags=np.array([[i % 3, (i + 1) % 3] for i in range(n)], np.int64))
    hashes = np.sort(table.sha256)
    data = split_rows(table, hashes, "train", "distribution")
    np.testing.assert_array_equal(data.tags, table.tags[data.rows])
    untagged = split_rows(dataclasses.replace(table, tags=None), hashes, "train", "distribution")
    assert untagged.tags.shape == (3, 0)


def test_a_multitask_student_scores_without_tags_and_layercam_refuses_a_multimodal_one(tmp_path):
    from trainers.layercam import student_target

    multitask = build_student(StudentSpec(**{**TINY, "tag_width": 4, "tag_head": True}))
    (tmp_path / "a.jpg").write_bytes(jpeg(70, 50))
    scored = score_images(multitask, [str(tmp_path / "a.jpg")])  # its tag head is only for training
    assert scored.ok.all() and scored.output.shape == (1, 10)
    student_target(multitask)
    with pytest.raises(StudentError, match="LayerCAM explains images-only students; this one is multimodal"):
        student_target(build_student(StudentSpec(**TAGGED)))
