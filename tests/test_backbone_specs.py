"""``backbone_specs``: the specs ``build_extractor`` would give, without loading weights twice.

Every expectation is ``build_extractor(...).specs`` itself (real models, real loads), so the
meta-device widths and the cached digests are checked against the path workers take.
"""

from __future__ import annotations

import json
import os

import boto3
import pytest
import torch
from safetensors.torch import save_file

from trainers import backbones as backbones_mod
from trainers import weights as weights_mod
from trainers.backbones import BackboneError, backbone_specs, build_extractor, create_model
from trainers.weights import WeightsError


@pytest.fixture
def reads(monkeypatch):
    """Every weights file read (local or S3, packaged included) goes through ``_read_bytes``:
    count them, and refuse them while ``reads.forbidden`` is set."""
    calls: list[str] = []
    real = weights_mod._read_bytes

    def counting(source):
        if counting.forbidden:
            raise AssertionError(f"weights {source} read although the digest cache is warm")
        calls.append(source)
        return real(source)

    counting.forbidden, counting.calls = False, calls
    monkeypatch.setattr(weights_mod, "_read_bytes", counting)
    return counting


@pytest.fixture(scope="module")
def lite_trio_specs():
    return build_extractor("lite_trio", "packaged", device="cpu").specs


def save_resnet18(path, seed: int, dtype=torch.float32):
    state = create_model("resnet18", f"random:{seed}")[0].state_dict()
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path)


def test_packaged_lite_trio_equals_build_extractor_and_warm_cache_reads_nothing(tmp_path, reads, lite_trio_specs):
    cold = backbone_specs("lite_trio", "packaged", cache_dir=tmp_path)
    assert cold == lite_trio_specs
    assert len(reads.calls) == 3 and all(c.endswith(".pth") for c in reads.calls)
    assert len(json.loads((tmp_path / "digests.json").read_text())["digests"]) == 3

    reads.forbidden = True
    assert backbone_specs("lite_trio", "packaged", cache_dir=tmp_path) == lite_trio_specs
    assert backbone_specs(["tf_efficientnet_lite2"], {"tf_efficientnet_lite2": "packaged"},
                          cache_dir=tmp_path) == lite_trio_specs[2:]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file behind


def test_random_weights_need_no_io_and_match_build_extractor(tmp_path, reads):
    names = ["resnet18", "resnet50", "lite_trio"]
    reads.forbidden = True
    assert backbone_specs(names, "random:5", cache_dir=tmp_path) == build_extractor(names, "random:5", "cpu").specs
    assert not any(tmp_path.iterdir())  # no cache touched either

    specs = backbone_specs("paper_trio", "random:0", cache_dir=tmp_path)  # meta device: well under a second
    assert [s.width for s in specs] == [15616, 3904, 3904] and {s.weights for s in specs} == {"random:0"}
    assert specs[0].layers == ("stem.conv", "stages.0", "stages.1", "stages.2", "stages.3")
    assert specs[1].layers == specs[2].layers == ("act1", "layer1", "layer2", "layer3", "layer4")


def test_mixed_sources_and_errors(tmp_path, lite_trio_specs):
    weights = {"resnet18": "random:1", "tf_efficientnet_lite0": "packaged"}
    names = ["resnet18", "tf_efficientnet_lite0"]
    assert backbone_specs(names, weights, cache_dir=tmp_path) == build_extractor(names, weights, "cpu").specs
    assert backbone_specs(names, weights, cache_dir=tmp_path)[1] == lite_trio_specs[0]

    with pytest.raises(BackboneError, match="explicit seed"):
        backbone_specs("resnet18", "random", cache_dir=tmp_path)
    with pytest.raises(BackboneError, match="no weights given"):
        backbone_specs(names, {"resnet18": "random:0"}, cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="not found"):
        backbone_specs("resnet18", str(tmp_path / "nope.pth"), cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="s3:// URI"):
        backbone_specs("resnet18", str(tmp_path / "w.npz"), cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="no packaged weights"):
        backbone_specs("resnet18", "packaged", cache_dir=tmp_path)
    save_file(create_model("tf_efficientnet_lite0")[0].state_dict(), tmp_path / "lite0.safetensors")
    with pytest.raises(WeightsError, match="missing .*unexpected"):  # wrong architecture: never cached
        backbone_specs("resnet18", str(tmp_path / "lite0.safetensors"), cache_dir=tmp_path)


def test_file_digest_is_cached_by_identity_and_follows_a_rewrite(tmp_path, reads, monkeypatch):
    path = tmp_path / "r18.safetensors"
    save_resnet18(path, seed=1, dtype=torch.float16)  # loaded into float32 parameters: digest of the cast
    expected = build_extractor("resnet18", str(path), "cpu").specs
    reads.calls.clear()
    first = backbone_specs("resnet18", str(path), cache_dir=tmp_path / "cache")
    assert first == expected and len(reads.calls) == 1

    reads.forbidden = True
    assert backbone_specs("resnet18", str(path), cache_dir=tmp_path / "cache") == expected
    monkeypatch.chdir(tmp_path)  # a relative spelling of the same file is the same cache entry
    assert backbone_specs("resnet18", "r18.safetensors", cache_dir=tmp_path / "cache") == expected
    reads.forbidden = False

    mtime = path.stat().st_mtime_ns
    save_resnet18(path, seed=2, dtype=torch.float16)  # same size, other values
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    second = backbone_specs("resnet18", str(path), cache_dir=tmp_path / "cache")
    assert len(reads.calls) == 2 and second[0].weights != first[0].weights
    assert second == build_extractor("resnet18", str(path), "cpu").specs

    # a nested DataParallel checkpoint of the same parameters has the same digest
    state = create_model("resnet18", "random:2")[0].state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v.half() if v.is_floating_point() else v
                                           for k, v in state.items()}}, tmp_path / "r18.pth")
    assert backbone_specs("resnet18", str(tmp_path / "r18.pth"), cache_dir=tmp_path / "cache") == second


@pytest.mark.parametrize("corruption", [b"{not json", b"\xff\xfe\x00", b"[1, 2]",
                                        b'{"format": 1, "digests": {"x": "sha256:nothex"}}',
                                        b'{"format": 99, "digests": {}}'])
def test_corrupt_cache_is_recomputed(tmp_path, reads, corruption):
    path = tmp_path / "r18.safetensors"
    save_resnet18(path, seed=3)
    backbone_specs("resnet18", str(path), cache_dir=tmp_path)
    cache = tmp_path / "digests.json"
    good = json.loads(cache.read_text())
    cache.write_bytes(corruption)
    reads.calls.clear()
    assert backbone_specs("resnet18", str(path), cache_dir=tmp_path) == build_extractor("resnet18", str(path), "cpu").specs
    assert len(reads.calls) == 2  # backbone_specs recomputed (and build_extractor loaded)
    assert json.loads(cache.read_text()) == good  # and rewrote a valid cache


def test_cache_location_follows_akd_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path))
    backbone_specs("tf_efficientnet_lite0", "packaged")
    assert (tmp_path / "weights" / "digests.json").is_file()
    monkeypatch.delenv("AKD_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_mod.digest_cache_file() == tmp_path / "home/.cache/aesthetic-kd/weights/digests.json"


def test_unwritable_cache_is_a_warning(tmp_path, reads):
    (tmp_path / "file").write_text("")  # a cache_dir below a file cannot be created
    with pytest.warns(UserWarning, match="digest cache"):
        specs = backbone_specs("tf_efficientnet_lite0", "packaged", cache_dir=tmp_path / "file" / "cache")
    assert specs == build_extractor("tf_efficientnet_lite0", "packaged", "cpu").specs


def test_tied_tensors_take_the_real_load(tmp_path, monkeypatch):
    """Loading a model whose parameters are tied keeps one of the two tensors; only a real load says
    which, so backbone_specs falls back to it (forced here on a plain model)."""
    path = tmp_path / "r18.safetensors"
    save_resnet18(path, seed=4)
    expected = build_extractor("resnet18", str(path), "cpu").specs
    real = []
    monkeypatch.setattr(backbones_mod, "_has_tied_tensors", lambda model: True)
    monkeypatch.setattr(backbones_mod, "create_model", lambda *a: real.append(a) or create_model(*a))
    assert backbone_specs("resnet18", str(path), cache_dir=tmp_path) == expected
    assert real == [("resnet18", str(path))]


@pytest.mark.s3
def test_s3_digest_is_cached_by_etag(s3_bucket, tmp_path, reads):
    uri = f"s3://{s3_bucket}/weights/r18.safetensors"
    s3 = boto3.client("s3")
    save_resnet18(tmp_path / "a.safetensors", seed=5)
    s3.upload_file(str(tmp_path / "a.safetensors"), s3_bucket, "weights/r18.safetensors")
    first = backbone_specs("resnet18", uri, cache_dir=tmp_path)
    assert first == build_extractor("resnet18", uri, "cpu").specs

    reads.forbidden = True
    assert backbone_specs("resnet18", uri, cache_dir=tmp_path) == first
    reads.forbidden = False

    save_resnet18(tmp_path / "b.safetensors", seed=6)
    s3.upload_file(str(tmp_path / "b.safetensors"), s3_bucket, "weights/r18.safetensors")
    second = backbone_specs("resnet18", uri, cache_dir=tmp_path)
    assert second[0].weights != first[0].weights and second == build_extractor("resnet18", uri, "cpu").specs
    with pytest.raises(WeightsError, match="missing.safetensors"):
        backbone_specs("resnet18", f"s3://{s3_bucket}/weights/missing.safetensors", cache_dir=tmp_path)
