"""Keys: same spec ⇒ same key; any change ⇒ a new key. Features are keyed by image content and
extractor; a dataset's view by the extractor and everything in the dataset table."""

from __future__ import annotations

import dataclasses

import pytest

from featurestore.dataset_table import DatasetTable, hashes_from_hex
from featurestore.features import segment_spec
from featurestore.specs import (FORMAT_VERSION, BackboneSpec, DatasetManifest, EntrySpec, ExtractorSpec, SpecError,
                                canonical_json, entry_key)
from featurestore.views import view_spec

H = ["a" * 64, "b" * 64, "c" * 64]


def manifest(**changes) -> DatasetManifest:
    base = dict(name="toy", image_ids=("1", "2", "3"), uris=("/d/1.jpg", "/d/2.jpg", "/d/3.jpg"), sha256=tuple(H),
                splits=("train", "train", "test"), votes=((0,) * 9 + (5,), (1,) * 10, (2,) * 10),
                tags=((1, 0), (0, 0), (2, 3)), tag_names=((1, "Nature"), (2, "Urban"), (3, "Portrait")))
    base.update(changes)
    return DatasetManifest(**base)


def gsf_entry_spec(m: DatasetManifest, e: ExtractorSpec) -> EntrySpec:
    """The view of dataset ``m`` under ``e`` (what extraction reports as its entry)."""
    return view_spec(e, DatasetTable.from_manifest(m))


def segment_of(e: ExtractorSpec, hashes=H) -> EntrySpec:
    return segment_spec(e, hashes_from_hex(sorted(hashes)))


def extractor(**changes) -> ExtractorSpec:
    base = dict(backbones=(BackboneSpec("resnet18", "sha256:" + "0" * 64, ("stem", "s1", "s2", "s3", "s4"), 960),
                           BackboneSpec("efficientnet_lite0", "random:0", ("stem", "s1", "s2", "s3", "s4"), 512)))
    base.update(changes)
    return ExtractorSpec(**base)


def test_same_inputs_same_key_and_json_round_trip():
    a, b = gsf_entry_spec(manifest(), extractor()), gsf_entry_spec(manifest(), extractor())
    assert a.key == b.key and a.key.startswith("gsf-") and len(a.key) == 4 + 24
    assert EntrySpec.from_json(a.to_json()).key == a.key
    assert DatasetManifest.from_json(manifest().to_json()) == manifest()
    assert ExtractorSpec.from_json(extractor().to_json()) == extractor()


@pytest.mark.parametrize("change", [
    dict(sha256=(H[0], H[1], "d" * 64)),
    dict(image_ids=("1", "2", "4")),
    dict(splits=("train", "test", "test")),
    dict(votes=((0,) * 9 + (6,), (1,) * 10, (2,) * 10)),
    dict(tags=((1, 0), (0, 0), (2, 0))),
])
def test_any_dataset_change_makes_a_new_key(change):
    assert gsf_entry_spec(manifest(**change), extractor()).key != gsf_entry_spec(manifest(), extractor()).key


def test_moving_images_keeps_the_dataset_identity_but_makes_a_new_view():
    moved = manifest(uris=("s3://bucket/1.jpg", "s3://bucket/2.jpg", "s3://bucket/3.jpg"))
    assert moved.digest() == manifest().digest()
    assert gsf_entry_spec(moved, extractor()).key != gsf_entry_spec(manifest(), extractor()).key


def test_segment_key_is_the_extractor_and_the_image_hashes_only():
    assert segment_of(extractor()).key == segment_of(extractor()).key
    assert segment_of(extractor(), H[:2]).key != segment_of(extractor()).key
    assert segment_of(extractor(compute_dtype="bfloat16")).key != segment_of(extractor()).key
    assert segment_of(extractor()).key.startswith("gsfseg-")


@pytest.mark.parametrize("change", [
    dict(input_policy="resize:300x300"), dict(compute_dtype="bfloat16"), dict(dtype="float32"),
    dict(backbones=(BackboneSpec("resnet18", "sha256:" + "1" * 64, ("stem", "s1", "s2", "s3", "s4"), 960),)),
])
def test_any_extractor_change_makes_a_new_key(change):
    assert gsf_entry_spec(manifest(), extractor(**change)).key != gsf_entry_spec(manifest(), extractor()).key
    assert segment_of(extractor(**change)).key != segment_of(extractor()).key


def test_backbone_order_and_weights_matter_and_column_ranges_follow_order():
    e = extractor()
    swapped = extractor(backbones=tuple(reversed(e.backbones)))
    assert gsf_entry_spec(manifest(), swapped).key != gsf_entry_spec(manifest(), e).key
    assert e.column_ranges() == {"resnet18": (0, 960), "efficientnet_lite0": (960, 1472)}
    assert e.width == 1472


def test_derived_entries_record_lineage_and_key_on_parent_and_producer():
    parent = gsf_entry_spec(manifest(), extractor()).key
    k1 = EntrySpec("knowledge", {"seed": 0}, parent=parent, producer={"lr": 3e-5})
    assert k1.to_json()["parent"] == parent and k1.to_json()["producer"] == {"lr": 3e-5}
    assert k1.key != EntrySpec("knowledge", {"seed": 0}, parent=parent, producer={"lr": 1e-4}).key
    assert k1.key != EntrySpec("knowledge", {"seed": 0}, parent="gsf-other", producer={"lr": 3e-5}).key
    assert k1.key != EntrySpec("knowledge", {"seed": 1}, parent=parent, producer={"lr": 3e-5}).key


def test_tampered_spec_json_is_refused():
    data = gsf_entry_spec(manifest(), extractor()).to_json()
    data["identity"]["rows"] = 4
    with pytest.raises(SpecError, match="hashes to"):
        EntrySpec.from_json(data)


def test_canonical_json_is_order_independent_and_rejects_nan():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})
    assert entry_key("gsf", {"a": 1}) != entry_key("knowledge", {"a": 1})
    assert FORMAT_VERSION >= 1


@pytest.mark.parametrize("bad, match", [
    (dict(uris=("/d/1.jpg",)), "uris has 1 rows"),
    (dict(image_ids=("1", "1", "3")), "not unique"),
    (dict(splits=("train", "holdout", "test")), "unknown split"),
    (dict(votes=((1,) * 9, (1,) * 10, (1,) * 10)), "10 non-negative"),
    (dict(sha256=("abc", H[1], H[2])), "64 hex"),
])
def test_invalid_manifests_are_refused(bad, match):
    with pytest.raises(SpecError, match=match):
        manifest(**bad)


def test_invalid_extractors_are_refused():
    with pytest.raises(SpecError, match="weights must be"):
        BackboneSpec("resnet18", "latest", ("stem",), 64)
    with pytest.raises(SpecError, match="repeat"):
        b = extractor().backbones[0]
        ExtractorSpec(backbones=(b, dataclasses.replace(b)))
