"""ImageFolderIndex: order and labels as torchvision's ImageFolder, CSV lists, cached scans, errors."""

import os
import shutil

import pytest
from imagegen import make_tree
from PIL import Image

from fastprune.data import ImageFolderIndex


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    samples = make_tree(str(root))
    return root, samples


def test_matches_torchvision_imagefolder(tree, tmp_path):
    root, samples = tree
    index = ImageFolderIndex(root, cache_dir=tmp_path / "cache")
    assert len(index) == len(samples) == 13
    assert index.files == [p for p, _ in samples]
    assert index.labels.tolist() == [y for _, y in samples]
    assert index.classes == ["class_00", "class_01", "class_02"]
    assert any(f.endswith(".PNG") for f in index.files) and any(f.endswith("deep.jpg") for f in index.files)
    assert not any(f.endswith(".txt") for f in index.files)


def test_scan_is_cached_and_rescanned_when_the_folder_changes(tree, tmp_path):
    root, _ = tree
    cache = tmp_path / "cache"
    first = ImageFolderIndex(root, cache_dir=cache)
    assert not first.from_cache
    again = ImageFolderIndex(root, cache_dir=cache)
    assert again.from_cache and again.files == first.files
    Image.new("RGB", (20, 20)).save(root / "class_01" / "new.jpg")
    changed = ImageFolderIndex(root, cache_dir=cache)
    assert not changed.from_cache and len(changed) == len(first) + 1
    os.remove(root / "class_00" / "more" / "deep.jpg")  # a nested folder changes too
    assert len(ImageFolderIndex(root, cache_dir=cache)) == len(first)
    assert len(ImageFolderIndex(root, cache_dir=False)) == len(first)


def test_fingerprint_is_stable_and_content_sensitive(tree, tmp_path):
    root, _ = tree
    a = ImageFolderIndex(root, cache_dir=False)
    moved = tmp_path / "elsewhere"
    shutil.copytree(root, moved)
    assert ImageFolderIndex(moved, cache_dir=False).fingerprint == a.fingerprint
    os.rename(moved / "class_02", moved / "class_03")
    assert ImageFolderIndex(moved, cache_dir=False).fingerprint != a.fingerprint


def test_csv_list_file(tree, tmp_path):
    root, samples = tree
    lst = root / "train.csv"
    with open(lst, "w") as f:
        f.write("path,label\n")
        for p, y in samples[:5]:
            f.write(f"{os.path.relpath(p, root)},{y}\n")
        f.write(f"{samples[-1][0]},2\n")  # absolute path
    gap = r"train.csv: the labels run to 2, but 1 of those classes have no rows \(1\)"
    with pytest.warns(RuntimeWarning, match=gap):
        index = ImageFolderIndex(lst)
    assert index.files == [p for p, _ in samples[:5]] + [samples[-1][0]]
    assert index.labels.tolist() == [y for _, y in samples[:5]] + [2]
    assert index.classes == ["0", "1", "2"]
    named = root / "named.csv"
    named.write_text("a/x.jpg,dog\nb/y.png,cat\n")
    index = ImageFolderIndex(named)
    assert index.classes == ["cat", "dog"] and index.labels.tolist() == [1, 0]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset root '.*nowhere' does not exist"):
        ImageFolderIndex(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no class folders"):
        ImageFolderIndex(tmp_path / "flat", cache_dir=False)
    (tmp_path / "flat" / "cats").mkdir()
    (tmp_path / "flat" / "cats" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"class folder '.*cats' has no JPEG or PNG images"):
        ImageFolderIndex(tmp_path / "flat", cache_dir=False)
    bad = tmp_path / "bad.csv"
    for text, match in [("a.jpg,0\nb.jpg\n", r"bad.csv:2: expected 'path,label', got 'b.jpg'"),
                        ("a.gif,0\n", r"bad.csv:1: 'a.gif' is not a JPEG or PNG file"),
                        ("path,label\n", r"list file '.*bad.csv' has no rows"),
                        ("a.jpg,-4\n", r"bad.csv:1: label -4 is negative")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            ImageFolderIndex(bad)


def test_a_link_loop_or_a_second_link_to_a_folder_is_scanned_once(tree, tmp_path):
    root, samples = tree
    os.symlink(root / "class_00", root / "class_00" / "again")  # a loop: class_00/again/again/...
    os.symlink(root / "class_02", root / "class_01" / "theirs")  # class_02's images under class_01's label
    os.symlink(root / "class_01", root / "alias")  # a class folder that is a link: a class of its own (torchvision)
    with pytest.warns(RuntimeWarning, match=r"left out 3 linked folders that lead back to a folder already scanned"):
        index = ImageFolderIndex(root, cache_dir=tmp_path / "cache")
    names = [os.path.basename(f) for f in index.files]
    labels = [index.classes[y] for y in index.labels.tolist()]
    by_class = {c: sorted(n for n, label in zip(names, labels) if label == c) for c in index.classes}
    assert len(index) == len(samples) + len(by_class["alias"])
    assert by_class["alias"] == by_class["class_01"]  # the linked class folder is read, once
    assert not any("again" in f or "theirs" in f for f in index.files)
    with pytest.warns(RuntimeWarning, match=r"left out 3 linked folders"):  # the cached scan says it again
        assert ImageFolderIndex(root, cache_dir=tmp_path / "cache").from_cache


def test_an_image_or_binary_file_is_not_a_list(tree, tmp_path):
    root, samples = tree
    with pytest.raises(ValueError, match=r"dataset '.*' is an image file; give a folder root/<class>/<image> or a"):
        ImageFolderIndex(samples[0][0])
    blob = tmp_path / "data.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"data.bin is not a path,label CSV list \(a text file\) nor a folder"):
        ImageFolderIndex(blob)


def test_fingerprint_covers_sizes_and_times_apart(tree, tmp_path):
    root, samples = tree
    a = ImageFolderIndex(root, cache_dir=False)
    record = a.identity()
    assert record["fingerprint_version"] == 2 and a.compare(record) == (None, None)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # a copy without the times
    same, caution = ImageFolderIndex(copy, cache_dir=False).compare(record)
    assert same is None and "other modification times" in caution
    victim = copy / os.path.relpath(samples[3][0], root)
    Image.new("RGB", (31, 17), (200, 10, 10)).save(victim)  # overwritten in place: another size
    assert os.path.getsize(victim) != os.path.getsize(samples[3][0])
    why, _ = ImageFolderIndex(copy, cache_dir=False).compare(record)
    assert why == "the file names, classes, labels or file sizes differ"
    older = {"fingerprint": a.names_fingerprint}  # written by an earlier version: names and labels only
    assert ImageFolderIndex(copy, cache_dir=False).compare(older)[1].startswith("it was recorded by an older")
    assert a.compare({}) == (None, None)
    scanned = ImageFolderIndex(root, cache_dir=False)
    os.remove(samples[0][0])  # gone after the scan: the fingerprint still computes (the loaders name the file)
    assert scanned.fingerprint != a.fingerprint
