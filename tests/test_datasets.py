"""Dataset readers: what each format yields, the hash cache, identity under moves, S3 sources.

Images are arbitrary bytes: readers hash files, they never decode them.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from featurestore import sources
from featurestore.datasets import MISSING_SHA256, DatasetError, HashStats, hash_split, index_dataset, load_dataset
from featurestore.sources import MissingSourceError

# id, votes 1..10, tag1, tag2 — deliberately not in sorted id order
AVA_ROWS = [
    ("953417", (0, 1, 5, 17, 38, 36, 15, 6, 5, 1), 1, 22),
    ("12", (3, 3, 10, 28, 40, 20, 9, 4, 1, 0), 21, 0),
    ("500", (1, 0, 2, 9, 30, 41, 20, 10, 2, 3), 0, 0),
    ("77", (0, 0, 1, 4, 12, 30, 28, 16, 6, 2), 14, 15),
]
TAGS = {1: "Abstract", 14: "Landscape", 15: "Nature", 21: "Black and White", 22: "Macro"}


def image_bytes(image_id: str) -> bytes:
    return f"jpeg bytes of {image_id}".encode() * 3


def write_ava(root, rows=AVA_ROWS, image_dir="images", test_ids=(), train_ids=None, lists_dir="",
              skip_images=()):
    """An AVA-layout directory; returns the sha256 written for each image id."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{n} {i} {' '.join(map(str, v))} {t1} {t2} {900 + n}" for n, (i, v, t1, t2) in enumerate(rows, 1)]
    (root / "AVA.txt").write_text("\n".join(lines) + "\n")
    (root / "tags.txt").write_text("".join(f"{k} {v}\n" for k, v in TAGS.items()))
    (root / image_dir).mkdir(exist_ok=True)
    hashes = {}
    for image_id, *_ in rows:
        if image_id not in skip_images:
            (root / image_dir / f"{image_id}.jpg").write_bytes(image_bytes(image_id))
            hashes[image_id] = hashlib.sha256(image_bytes(image_id)).hexdigest()
    (root / lists_dir).mkdir(exist_ok=True)
    if test_ids:
        (root / lists_dir / "generic_test.jpgl").write_text("".join(f"{i}\n" for i in test_ids))
    if train_ids is not None:
        (root / lists_dir / "generic_train.jpgl").write_text("".join(f"{i}\n" for i in train_ids))
    return hashes


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hash-cache"


def test_ava_reads_votes_tags_names_splits_and_hashes(tmp_path, cache):
    hashes = write_ava(tmp_path / "ava", test_ids=["12"], train_ids=["953417", "500"])
    m = load_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache)
    assert m.name == "ava"
    assert m.image_ids == ("953417", "12", "500", "77")  # AVA.txt order
    assert m.votes == tuple(v for _, v, _, _ in AVA_ROWS)
    assert m.tags == ((1, 22), (21, 0), (0, 0), (14, 15))
    assert dict(m.tag_names) == TAGS
    assert m.splits == ("train", "test", "train", "")  # 77 is in neither list
    assert m.uris == tuple(str(tmp_path / "ava" / "images" / f"{i}.jpg") for i in m.image_ids)
    assert m.sha256 == tuple(hashes[i] for i in m.image_ids)
    assert m.mean_scores is None


def test_ava_test_list_alone_makes_the_rest_train_and_images_may_sit_in_the_root(tmp_path, cache):
    write_ava(tmp_path / "ava", image_dir=".", test_ids=["500"], lists_dir="aesthetics_image_lists")
    m = load_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache)
    assert m.splits == ("train", "train", "test", "train")
    assert m.uris[0] == str(tmp_path / "ava" / "953417.jpg")
    assert MISSING_SHA256 not in m.sha256


def test_ava_without_split_lists_is_unsplit_or_split_by_id_hash(tmp_path, cache):
    write_ava(tmp_path / "ava")
    assert load_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache).splits == ("",) * 4
    m = load_dataset(str(tmp_path / "ava"), "ava", test_fraction=0.5, cache_dir=cache)
    assert m.splits == tuple(hash_split(i, 0.5) for i in m.image_ids)
    assert set(m.splits) <= {"train", "test"}


def test_hash_split_is_a_stable_fraction_per_id():
    ids = [str(i) for i in range(4000)]
    splits = [hash_split(i, 0.2) for i in ids]
    assert 0.17 < splits.count("test") / len(ids) < 0.23
    # Growing the fraction only moves images from train to test, never back.
    assert all(hash_split(i, 0.3) == "test" for i, s in zip(ids, splits) if s == "test")


def test_test_fraction_conflicts_with_official_lists(tmp_path, cache):
    write_ava(tmp_path / "ava", test_ids=["12"])
    with pytest.raises(DatasetError, match="defines its own splits"):
        load_dataset(str(tmp_path / "ava"), "ava", test_fraction=0.1, cache_dir=cache)


def test_missing_image_stays_a_row_with_the_sentinel(tmp_path, cache):
    hashes = write_ava(tmp_path / "ava", skip_images=["500"])
    stats = HashStats()
    with pytest.warns(UserWarning, match="1 of 4 images are missing"):
        m = load_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache, stats=stats)
    assert len(m) == len(AVA_ROWS)
    assert m.sha256[2] == MISSING_SHA256
    assert [h for h in m.sha256 if h != MISSING_SHA256] == [hashes[i] for i in ("953417", "12", "77")]
    assert (stats.missing, stats.hashed) == (1, 3)


def test_hash_cache_rehashes_only_changed_files(tmp_path, cache):
    root = tmp_path / "ava"
    write_ava(root)
    first, second, third, fourth = HashStats(), HashStats(), HashStats(), HashStats()
    m1 = load_dataset(str(root), "ava", cache_dir=cache, stats=first)
    m2 = load_dataset(str(root), "ava", cache_dir=cache, stats=second)
    assert (first.hashed, first.cached) == (4, 0)
    assert (second.hashed, second.cached) == (0, 4)
    assert m2 == m1

    changed = root / "images" / "500.jpg"
    mtime = changed.stat().st_mtime_ns
    changed.write_bytes(b"X" + image_bytes("500")[1:])  # same size, different bytes
    os.utime(changed, ns=(mtime + 10**9, mtime + 10**9))
    m3 = load_dataset(str(root), "ava", cache_dir=cache, stats=third)
    assert (third.hashed, third.cached) == (1, 3)
    assert m3.sha256[2] == hashlib.sha256(changed.read_bytes()).hexdigest() != m1.sha256[2]
    assert m3.sha256[:2] + m3.sha256[3:] == m1.sha256[:2] + m1.sha256[3:]

    os.utime(changed, ns=(mtime + 2 * 10**9, mtime + 2 * 10**9))  # touched, bytes unchanged
    m4 = load_dataset(str(root), "ava", cache_dir=cache, stats=fourth)
    assert (fourth.hashed, fourth.cached) == (1, 3)
    assert m4.sha256 == m3.sha256


def test_an_index_completed_with_reported_hashes_is_the_loaded_dataset_and_warms_the_cache(tmp_path, cache):
    """What a first extraction does: index without reading images, then complete the dataset
    with the hashes its workers computed while reading them."""
    hashes = write_ava(tmp_path / "ava", skip_images=["500"])
    indexed = index_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache)
    assert indexed.unhashed == [0, 1, 3]  # the absent image needs no read: it is settled as missing
    assert indexed.sha256[2] == MISSING_SHA256 and len(set(indexed.fingerprints(indexed.unhashed))) == 3
    with pytest.raises(ValueError, match="1 unhashed row"):
        indexed.complete({0: hashes["953417"], 1: hashes["12"]})
    reported = {0: hashes["953417"], 1: hashes["12"], 3: hashes["77"]}
    with pytest.warns(UserWarning, match="1 of 4 images are missing"):
        completed = indexed.complete(reported)
    stats = HashStats()
    with pytest.warns(UserWarning):
        loaded = load_dataset(str(tmp_path / "ava"), "ava", cache_dir=cache, stats=stats)
    assert completed == loaded and (stats.hashed, stats.cached, stats.missing) == (0, 3, 1)  # read nothing


def test_default_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    write_ava(tmp_path / "ava")
    monkeypatch.setenv("AKD_CACHE_DIR", str(tmp_path / "env-cache"))
    load_dataset(str(tmp_path / "ava"), "ava")
    stats = HashStats()
    load_dataset(str(tmp_path / "ava"), "ava", stats=stats)
    assert len(list((tmp_path / "env-cache").glob("ava-*.json"))) == 1
    assert stats.hashed == 0


def test_digest_ignores_location_but_not_bytes(tmp_path, cache):
    write_ava(tmp_path / "a" / "ava", test_ids=["12"])
    shutil.copytree(tmp_path / "a" / "ava", tmp_path / "b" / "elsewhere")
    here = load_dataset(str(tmp_path / "a" / "ava"), "ava", cache_dir=cache)
    there = load_dataset(str(tmp_path / "b" / "elsewhere"), "ava", cache_dir=cache)
    assert here.uris != there.uris
    assert here.digest() == there.digest()

    (tmp_path / "b" / "elsewhere" / "images" / "77.jpg").write_bytes(image_bytes("77") + b"!")
    assert load_dataset(str(tmp_path / "b" / "elsewhere"), "ava", cache_dir=cache).digest() != here.digest()


def test_csv_with_votes_tags_splits_and_mixed_paths(tmp_path, cache):
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.jpg").write_bytes(b"aaa")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.png").write_bytes(b"bbb")
    votes = ",".join(f"votes_{i}" for i in range(1, 11))
    (tmp_path / "data" / "scores.csv").write_text(
        f"image,{votes},tag1,tag2,split,image_id\n"
        f"img/a.jpg,{','.join(['1'] * 10)},5,,train,\n"
        f"{tmp_path / 'other' / 'b.png'},{','.join(map(str, range(10)))},,,test,bee\n")
    m = load_dataset(str(tmp_path / "data" / "scores.csv"), "csv", cache_dir=cache)
    assert m.name == "scores"
    assert m.image_ids == ("a", "bee")
    assert m.uris == (str(tmp_path / "data" / "img" / "a.jpg"), str(tmp_path / "other" / "b.png"))
    assert m.votes == ((1,) * 10, tuple(range(10)))
    assert m.tags == ((5, 0), (0, 0))
    assert m.splits == ("train", "test")
    assert m.sha256 == (hashlib.sha256(b"aaa").hexdigest(), hashlib.sha256(b"bbb").hexdigest())
    assert m.mean_scores is None


def test_csv_with_mean_score_only(tmp_path, cache):
    for name in ("x", "y"):
        (tmp_path / f"{name}.jpg").write_bytes(name.encode())
    (tmp_path / "koniq.csv").write_text("image,mean_score\ny.jpg,3.25\nx.jpg,4.5\n")
    stats = HashStats()
    m = load_dataset(str(tmp_path / "koniq.csv"), "csv", name="koniq10k", cache_dir=cache, stats=stats)
    assert m.name == "koniq10k"
    assert m.image_ids == ("y", "x")  # file order
    assert m.mean_scores == (3.25, 4.5)
    assert m.votes is None and m.tags is None
    assert m.splits == ("", "")
    assert stats.hashed == 2


def test_csv_with_some_vote_columns_is_rejected(tmp_path, cache):
    (tmp_path / "t.csv").write_text("image,votes_1,votes_2\na.jpg,1,2\n")
    with pytest.raises(DatasetError, match="votes_3"):
        load_dataset(str(tmp_path / "t.csv"), "csv", cache_dir=cache)


def test_folder_lists_images_sorted_with_relative_ids(tmp_path, cache):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for rel in ("sub/z.PNG", "b.jpeg", "a.JPG", "sub/c.webp", "notes.txt", "sub/d.bmp"):
        (root / rel).write_bytes(rel.encode())
    m = load_dataset(str(root), "folder", cache_dir=cache)
    assert m.name == "folder"
    assert m.image_ids == ("a", "b", "sub/c", "sub/d", "sub/z")
    assert m.uris[2] == str(root / "sub" / "c.webp")
    assert m.sha256[0] == hashlib.sha256(b"a.JPG").hexdigest()
    assert m.splits == ("",) * 5
    assert m.votes is None and m.mean_scores is None and m.tags is None


def test_errors_name_the_problem(tmp_path, cache):
    with pytest.raises(DatasetError, match="unknown dataset format 'parquet'.*ava, csv, folder"):
        load_dataset(str(tmp_path), "parquet", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingSourceError, match=r"has no AVA\.txt.*empty[/\\]AVA\.txt"):
        load_dataset(str(tmp_path / "empty"), "ava", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_dataset(str(tmp_path / "nope.csv"), "csv", cache_dir=cache)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "AVA.txt").write_text("1 42 1 2 3\n")
    with pytest.raises(DatasetError, match="line 1: expected 15 fields"):
        load_dataset(str(tmp_path / "bad"), "ava", cache_dir=cache)


def upload(bucket: str, local_root, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_root).as_posix()}")


def test_ava_and_csv_from_s3(tmp_path, cache, s3_bucket):
    local = tmp_path / "ava"
    write_ava(local, test_ids=["12", "77"], skip_images=["500"])
    (local / "scores.csv").write_text("image,mean_score\nimages/12.jpg,5.5\nimages/77.jpg,6.0\n")
    upload(s3_bucket, local, "datasets/ava")
    url = f"s3://{s3_bucket}/datasets/ava/"

    stats = HashStats()
    with pytest.warns(UserWarning, match="missing"):
        from_s3 = load_dataset(url, "ava", cache_dir=cache, stats=stats)
    with pytest.warns(UserWarning, match="missing"):
        from_disk = load_dataset(str(local), "ava", cache_dir=cache)
    assert from_s3.uris[1] == f"s3://{s3_bucket}/datasets/ava/images/12.jpg"
    assert from_s3.splits == ("train", "test", "train", "test")
    assert dict(from_s3.tag_names) == TAGS
    assert from_s3.sha256[2] == MISSING_SHA256
    assert from_s3.digest() == from_disk.digest()
    assert (stats.hashed, stats.missing) == (3, 1)

    again = HashStats()
    with pytest.warns(UserWarning, match="missing"):
        load_dataset(url, "ava", cache_dir=cache, stats=again)
    assert (again.hashed, again.cached) == (0, 3)  # ETags from the listing matched the cache

    table = load_dataset(f"s3://{s3_bucket}/datasets/ava/scores.csv", "csv", cache_dir=cache)
    assert table.uris == tuple(f"s3://{s3_bucket}/datasets/ava/images/{i}.jpg" for i in ("12", "77"))
    assert table.sha256 == (from_s3.sha256[1], from_s3.sha256[3])
    assert table.mean_scores == (5.5, 6.0)


def test_s3_sources_report_missing_objects_by_uri(s3_bucket):
    uri = f"s3://{s3_bucket}/no/such.jpg"
    with pytest.raises(MissingSourceError, match=uri):
        sources.read_bytes(uri)
    assert not sources.exists(uri)
    assert sources.list_files(f"s3://{s3_bucket}/no") == {}
