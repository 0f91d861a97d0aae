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
    bad.write_text("a.jpg,1\nb.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 'path,label', got 'b.jpg'"):
        ImageFolderIndex(bad)
    bad.write_text("a.gif,1\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: 'a.gif' is not a JPEG or PNG file"):
        ImageFolderIndex(bad)
    bad.write_text("path,label\n")
    with pytest.raises(ValueError, match=r"list file '.*bad.csv' has no rows"):
        ImageFolderIndex(bad)
    bad.write_text("a.jpg,-4\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: label -4 is negative"):
        ImageFolderIndex(bad)
