"""Split specs: parsing, and assignments that depend on each image's id alone."""

import dataclasses
import hashlib
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from featurestore.splits import SplitError, SplitSpec, assign_splits, id_hash

IDS = [f"img{i}" for i in range(3000)]
NO_OFFICIAL = [""] * len(IDS)

specs = st.one_of(
    st.just(SplitSpec("official")),
    st.text(st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1)
    .map(lambda p: SplitSpec("file", path=p)),
    st.integers(2, 50).flatmap(lambda k: st.builds(SplitSpec, st.just("cv"), k=st.just(k),
                                                   fold=st.integers(0, k - 1), seed=st.integers(-10**9, 10**9))),
    st.builds(SplitSpec, st.just("random"), fraction=st.floats(0, 1, exclude_min=True, exclude_max=True),
              seed=st.integers(-10**9, 10**9)),
)


@given(specs)
def test_the_text_form_round_trips(spec):
    assert SplitSpec.parse(str(spec)) == spec
    assert SplitSpec.parse(str(spec)).to_json() == spec.to_json()


@pytest.mark.parametrize("text, spec", [
    ("official", SplitSpec("official")),
    (" cv:5:2 ", SplitSpec("cv", k=5, fold=2, seed=0)),
    ("cv:5:2:7", SplitSpec("cv", k=5, fold=2, seed=7)),
    ("random:0.25:3", SplitSpec("random", fraction=0.25, seed=3)),
    ("file:s3://bucket/lists/generic_test.jpgl", SplitSpec("file", path="s3://bucket/lists/generic_test.jpgl")),
])
def test_parse_reads_each_form(text, spec):
    assert SplitSpec.parse(text) == spec


@pytest.mark.parametrize("text", [
    "bogus", "", "official:", "file:", "cv", "cv:3", "cv:a:b", "cv:3:1:x", "cv:3:1:2:3", "cv:1:0", "cv:3:3",
    "cv:3:-1", "random:2:0", "random:0:0", "random:1:0", "random:nan:0", "random:0.5", "random:0.5:0.5",
])
def test_every_bad_spec_is_refused_with_the_accepted_forms(text):
    with pytest.raises(SplitError, match=r"accepted forms are official, file:PATH, cv:K:FOLD\[:SEED\]"):
        SplitSpec.parse(text)


def test_a_fold_out_of_range_names_the_valid_range():
    with pytest.raises(SplitError, match=r"split cv:4:9:0: .*0\.\.3 for K=4"):
        SplitSpec.parse("cv:4:9")


def test_constructing_a_bad_spec_directly_is_refused_too():
    for bad in (dict(kind="halves"), dict(kind="cv", k=3, fold=3), dict(kind="random", fraction=1.5),
                dict(kind="file")):
        with pytest.raises(SplitError):
            SplitSpec(**bad)


def test_official_passes_the_datasets_own_split_through():
    official = ["train", "test", "val", ""]
    got = assign_splits(SplitSpec("official"), ["a", "b", "c", "d"], official)
    assert got.tolist() == official


@pytest.mark.parametrize("k, seed", [(5, 0), (5, 11), (3, 2), (12, 0)])
def test_cv_test_folds_partition_all_rows_and_are_balanced(k, seed):
    tests = [assign_splits(SplitSpec("cv", k=k, fold=f, seed=seed), IDS, NO_OFFICIAL) == "test" for f in range(k)]
    assert all(set(assign_splits(SplitSpec("cv", k=k, fold=f, seed=seed), IDS, NO_OFFICIAL)) == {"train", "test"}
               for f in range(k))
    np.testing.assert_array_equal(np.sum(tests, axis=0), np.ones(len(IDS)))  # each row in exactly one test fold
    expected = len(IDS) / k
    assert all(0.8 * expected <= t.sum() <= 1.2 * expected for t in tests), [int(t.sum()) for t in tests]


def test_the_seed_reshuffles_the_folds():
    a = assign_splits(SplitSpec("cv", k=5, fold=0, seed=0), IDS, NO_OFFICIAL)
    b = assign_splits(SplitSpec("cv", k=5, fold=0, seed=1), IDS, NO_OFFICIAL)
    assert 0.1 < np.mean(a != b) < 0.5  # ≈ 2·(1/5)·(4/5) = 0.32 if independent


@given(st.lists(st.text(min_size=1), min_size=1, max_size=30, unique=True),
       st.lists(st.text(min_size=1), max_size=30, unique=True), st.integers(2, 9), st.integers(0, 10**6))
def test_adding_images_never_moves_another_images_fold_or_random_side(old, added, k, seed):
    added = [i for i in added if i not in old]
    grown = added[: len(added) // 2] + old + added[len(added) // 2:]
    for spec in [SplitSpec("cv", k=k, fold=seed % k, seed=seed), SplitSpec("random", fraction=0.3, seed=seed)]:
        before = dict(zip(old, assign_splits(spec, old, [""] * len(old))))
        after = dict(zip(grown, assign_splits(spec, grown, [""] * len(grown))))
        assert {i: after[i] for i in old} == before


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_random_puts_about_fraction_of_rows_in_test(fraction):
    ids = [f"p{i}" for i in range(20000)]
    test = assign_splits(SplitSpec("random", fraction=fraction, seed=4), ids, [""] * len(ids)) == "test"
    assert abs(test.mean() - fraction) < 0.015


def test_random_test_sets_nest_as_the_fraction_grows():
    small = assign_splits(SplitSpec("random", fraction=0.1, seed=2), IDS, NO_OFFICIAL) == "test"
    large = assign_splits(SplitSpec("random", fraction=0.3, seed=2), IDS, NO_OFFICIAL) == "test"
    assert small.any() and not (small & ~large).any()


def test_id_hash_is_fixed_by_seed_and_id():
    assert id_hash(0, ["a"])[0] == int.from_bytes(hashlib.sha256(b"0:a").digest()[:8], "big")
    assert id_hash(0, ["a", "b"])[0] == id_hash(0, ["b", "a"])[1] != id_hash(1, ["a"])[0]


def test_a_file_split_marks_listed_ids_test_and_the_rest_train(tmp_path):
    listing = tmp_path / "generic_test.jpgl"
    listing.write_text("\ufeffb\n  d\r\n\n")
    got = assign_splits(SplitSpec.parse(f"file:{listing}"), ["a", "b", "c", "d"], ["", "", "", ""])
    assert got.tolist() == ["train", "test", "train", "test"]


def test_a_file_split_uses_the_given_reader():
    read = {"s3://b/test.txt": "c a"}.__getitem__
    got = assign_splits(SplitSpec.parse("file:s3://b/test.txt"), np.array(["a", "b", "c"]), [""] * 3, read_text=read)
    assert got.tolist() == ["test", "train", "test"]


def test_a_file_listing_unknown_ids_names_them_and_what_to_do(tmp_path):
    listing = tmp_path / "test.txt"
    listing.write_text("a " + " ".join(f"ghost{i}" for i in range(7)))
    with pytest.raises(SplitError, match=r"7 id\(s\) are not in the dataset.*ghost0.*fix the list") as info:
        assign_splits(SplitSpec.parse(f"file:{listing}"), ["a", "b"], ["", ""])
    assert str(info.value).count("ghost") == 5 and str(listing) in str(info.value)


def test_a_missing_or_empty_file_is_refused_by_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(SplitError, match=re.escape(f"{missing} does not exist")):
        assign_splits(SplitSpec.parse(f"file:{missing}"), ["a"], [""])
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    with pytest.raises(SplitError, match=re.escape(f"{empty} lists no image ids")):
        assign_splits(SplitSpec.parse(f"file:{empty}"), ["a"], [""])


def test_validation_mask_is_a_salted_hash_threshold_independent_of_the_test_folds():
    from featurestore.splits import validation_mask

    held = validation_mask(IDS, 0.1)
    expected = [int.from_bytes(hashlib.sha256(f"validation:{i}".encode()).digest()[:8], "big") < int(0.1 * 2**64)
                for i in IDS]
    assert held.tolist() == expected
    assert abs(held.mean() - 0.1) < 0.02
    assert validation_mask(IDS[::-1], 0.1).tolist() == held[::-1].tolist()  # each id alone decides
    assert not validation_mask(IDS, 0.0).any()
    for spec in (SplitSpec("random", fraction=0.1, seed=0), SplitSpec("cv", k=10, fold=0, seed=0)):
        test = assign_splits(spec, IDS, NO_OFFICIAL) == "test"
        # salted apart: the held-out share of a split's train images is the overall share
        assert abs(held[~test].mean() - held.mean()) < 0.02 and (held & test).any() and (held & ~test).any()
    with pytest.raises(SplitError, match=r"validation fraction must be in \[0, 1\), got 1.5"):
        validation_mask(IDS, 1.5)


def test_student_splits_carve_validation_from_train_or_take_the_datasets_val_split():
    from featurestore.dataset_table import DatasetTable
    from featurestore.dataset_table import hashes_from_hex
    from featurestore.splits import validation_mask
    from trainers.student_data import student_splits

    n = 400
    ids = np.array([f"im{i}" for i in range(n)], object)
    table = DatasetTable(name="carve", image_ids=ids, uris=np.array([f"/d/{i}.jpg" for i in ids], object),
                         sha256=hashes_from_hex([hashlib.sha256(i.encode()).hexdigest() for i in ids]),
                         splits=np.array(["train", "train", "train", "test"] * (n // 4), object),
                         votes=np.ones((n, 10), np.int64))
    hashes = np.sort(table.sha256)
    sets = student_splits(table, hashes, "distribution", 0.2)
    train_rows = np.flatnonzero(table.splits == "train")
    held = validation_mask(ids[train_rows], 0.2)
    assert sorted(sets["val"].rows.tolist()) == train_rows[held].tolist()
    assert sorted(sets["train"].rows.tolist()) == train_rows[~held].tolist()
    assert sorted(sets["test"].rows.tolist()) == np.flatnonzero(table.splits == "test").tolist()
    for part in sets.values():  # every field follows its rows
        assert part.uris == tuple(table.uris[part.rows]) and (part.sha256 == table.sha256[part.rows]).all()
        assert (hashes[part.knowledge_rows] == part.sha256).all() and len(part.targets) == len(part)
    assert len(student_splits(table, hashes, "distribution", 0.0)["val"]) == 0
    official = table.splits.copy()
    official[:40] = "val"
    given_val = student_splits(dataclasses.replace(table, splits=official), hashes, "distribution", 0.2)
    assert sorted(given_val["val"].rows.tolist()) == list(range(40))  # the dataset's own val split wins
    assert not set(given_val["train"].rows.tolist()) & set(range(40))
