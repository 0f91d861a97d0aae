"""What a new user's bad input does to the loaders: damaged files, unusual image modes, a path for an index,
a device this machine lacks.  The torch loader's tests run everywhere; DALI's halves skip without DALI."""

import importlib.util
import logging
import os
import re
import warnings

import numpy as np
import pytest
import torch
from imagegen import corrupt, make_tree, write_png16
from PIL import Image

import fastprune as fp
from fastprune import cli
from fastprune.data import ImageFileDataset, ImageFolderIndex, TorchLoader, default_transform, open_rgb

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="DALI is not installed")
SIZE = 16


def make_pruner(index, **kw):
    args = dict(epochs=4, keep_ratio=0.5, warmup=1, anneal=0.0, device="cpu", seed=1)
    args.update(kw)
    return fp.DynamicPruner(len(index), index.num_classes, **args)


def one_line(error: Exception) -> str:
    msg = str(error)
    assert "\n" not in msg and "DataLoader worker" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------ damaged files, torch loader

@pytest.mark.parametrize("how,exc,reason", [("garbage", ValueError, "corrupt or truncated image"),
                                            ("truncated", ValueError, "corrupt or truncated image"),
                                            ("empty", ValueError, "file is empty"),
                                            ("deleted", FileNotFoundError, "file not found")])
def test_torch_loader_bad_file_is_one_line_naming_it(index, how, exc, reason):
    """Raised in the main process, not as a worker's traceback, and it says how to go on."""
    victim = 4
    corrupt(index.files[victim], how)
    loader = TorchLoader(index, None, batch_size=4, image_size=SIZE, num_workers=1)
    with pytest.raises(exc) as info:
        list(loader)
    msg = one_line(info.value)
    assert msg.startswith(f"{index.files[victim]}: {reason}") and f"[sample {victim}]" in msg
    assert "on_error='skip'" in msg and "--skip-bad-files" in msg


def test_torch_loader_skip_leaves_bad_files_out_and_remembers_them(index, caplog):
    pruner = make_pruner(index)
    order = pruner.epoch_indices.tolist()
    victims = [order[1], order[5]]  # in the first two batches of 4
    corrupt(index.files[victims[0]], "garbage")
    corrupt(index.files[victims[1]], "deleted")
    loader = TorchLoader(index, pruner, batch_size=4, image_size=SIZE, num_workers=2, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="fastprune.data"):
        it = iter(loader)
        head = [next(it)[2] for _ in range(2)]
    assert [i.numel() for i in head] == [3, 3]  # each batch one shorter
    sd, psd = loader.state_dict(), pruner.state_dict()
    assert sorted(sd["bad"]) == sorted(victims) and sd["bad"][victims[1]][0] == index.files[victims[1]]
    assert sum("skipping" in r.getMessage() for r in caplog.records) == 2
    with pytest.warns(RuntimeWarning, match=r"TorchLoader skipped 2 unreadable files this epoch"):
        rest = [b[2] for b in it]
    expected = [i for i in order if i not in victims]
    assert torch.cat(head + rest).tolist() == expected
    assert sorted(i for i, _, _ in loader.skipped) == sorted(victims)

    # a resumed run knows them: the rest of the epoch, then the next one, without meeting them again
    caplog.clear()
    fresh_pruner = make_pruner(index)
    fresh_pruner.load_state_dict(psd)
    fresh = TorchLoader(index, fresh_pruner, batch_size=4, image_size=SIZE, num_workers=0, on_error="skip")
    fresh.load_state_dict(sd)
    with caplog.at_level(logging.WARNING, logger="fastprune.data"):
        tail = [b[2] for b in fresh]
        assert torch.cat(head + tail).tolist() == expected
        fresh_pruner.next_epoch()
        later = fresh_pruner.epoch_indices.tolist()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torch.cat([b[2] for b in fresh]).tolist()
    assert got == [i for i in later if i not in victims]
    assert sorted(i for i, _, _ in fresh.skipped) == sorted(set(victims) & set(later))
    assert not any("skipping" in r.getMessage() for r in caplog.records)  # known: left out from the start
    assert bool(set(victims) & set(later)) == any("TorchLoader skipped" in str(w.message) for w in caught)


def test_torch_loader_on_error_must_be_raise_or_skip(index):
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip', got 'ignore'"):
        TorchLoader(index, on_error="ignore")


# ------------------------------------------------------------ the CLI, with the torch loader

def train_argv(data, out, *extra):
    return ["train", str(data), "--out", str(out), "--arch", "smallcnn", "--epochs", "2", "--batch-size", "4",
            "--image-size", str(SIZE), "--workers", "1", "--loader", "torch", "--device", "cpu", "--no-progress",
            "--keep-ratio", "0.5", *extra]


def test_cli_train_torch_loader_bad_file(tmp_path, capsys):
    data = tmp_path / "data"
    make_tree(str(data))
    index = ImageFolderIndex(data, cache_dir=False)
    victim = index.files[6]
    corrupt(victim, "garbage")
    assert cli.main(train_argv(data, tmp_path / "run")) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("scanning")]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fastprune train: error: {victim}: corrupt or truncated image")
    assert "--skip-bad-files" in lines[0]

    with pytest.warns(RuntimeWarning, match="TorchLoader skipped 1 unreadable files"):
        assert cli.main(train_argv(data, tmp_path / "skipping", "--skip-bad-files")) == 0
    ck = torch.load(tmp_path / "skipping" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["loader"]["bad"] == {6: [victim, ck["loader"]["bad"][6][1]]}
    assert ck["loader"]["bad"][6][1].startswith("corrupt or truncated image")
    assert ck["pruner"]["visits"][6] == 0 and ck["pruner"]["visits"].sum() > 0


# ------------------------------------------------------------ the siblings: embeddings, static features

def test_embedding_batches_bad_file_is_one_line(index):
    from fastprune.embeddings import _batches

    corrupt(index.files[3], "truncated")
    with pytest.raises(ValueError) as info:
        list(_batches(index, "torch", default_transform(False, SIZE), None, 4, 0, "cpu", 1))
    msg = one_line(info.value)
    assert msg.startswith(f"{index.files[3]}: corrupt or truncated image") and "every image needs an embedding" in msg
    assert "on_error" not in msg  # nothing to skip with: every row is needed


@needs_dali
def test_embedding_batches_bad_file_is_one_line_with_dali(index):
    from fastprune.data.loader import IMAGENET_MEAN, IMAGENET_STD
    from fastprune.embeddings import _batches

    corrupt(index.files[3], "deleted")
    pcfg = {"size": SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bicubic",
            "resize_mode": "shortest"}
    with pytest.raises(FileNotFoundError) as info:
        list(_batches(index, "dali", None, pcfg, 4, 0, "cpu", 1))
    msg = one_line(info.value)
    assert msg.startswith(f"{index.files[3]}: file not found") and "every image needs an embedding" in msg


def test_static_features_bad_file_is_one_line(index):
    from fastprune.static.features import extract_features
    from fastprune.train import SmallCNN

    corrupt(index.files[7], "empty")
    with pytest.raises(ValueError) as info:
        extract_features(index, SmallCNN(index.num_classes), batch_size=4, device="cpu", num_workers=1,
                         image_size=SIZE, progress=False)
    msg = one_line(info.value)
    assert msg.startswith(f"{index.files[7]}: file is empty") and "every image needs its features" in msg


# ------------------------------------------------------------ unusual image modes: the pixels DALI gives

def unusual_images(folder, flat: bool = False, tiff: bool = True) -> dict:
    """name -> (path, the 8-bit RGB DALI decodes it to, or None where only a comparison tells): 16-bit grey and
    RGB, grey+alpha (8 and 16 bits), RGBA, palette with transparency, 1-bit, CMYK JPEG, an EXIF-rotated PNG;
    with ``tiff``, 32-bit int and float grey TIFFs (PIL's modes I and F).  ``flat``: one colour each."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(3)
    h, w = 6, 10

    def draw(high, *shape, dtype=np.uint8):
        a = rng.integers(0, high, (h, w, *shape)).astype(dtype)
        return np.broadcast_to(a[:1, :1], a.shape).copy() if flat else a

    def to8(v):
        return ((v.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)

    def grey(a):
        return np.repeat(a[..., None], 3, axis=2)

    out = {}

    def put(name, expected, save):
        path = os.path.join(folder, name)
        save(path)
        out[name.split(".")[0]] = (path, expected)

    g16 = draw(65536, dtype=np.uint16)
    if not flat:
        g16.flat[:3] = (0, 65535, 30000)  # the ends, and a mid grey that clipping would turn white
    put("grey16.png", grey(to8(g16)), lambda p: Image.fromarray(g16).save(p))
    rgb16 = draw(65536, 3, dtype=np.uint16)
    put("rgb16.png", to8(rgb16), lambda p: write_png16(p, rgb16))
    ga16 = draw(65536, 2, dtype=np.uint16)
    put("greyalpha16.png", grey(to8(ga16[..., 0])), lambda p: write_png16(p, ga16))
    la = draw(256, 2)
    put("greyalpha.png", grey(la[..., 0]), lambda p: Image.fromarray(la, "LA").save(p))
    rgba = draw(256, 4)
    rgba[..., 3] = rng.integers(0, 256, (h, w))  # alpha varies even in a flat image: it is dropped
    put("rgba.png", rgba[..., :3], lambda p: Image.fromarray(rgba, "RGBA").save(p))
    palette = rng.integers(0, 256, (16, 3)).astype(np.uint8)
    which = draw(16)
    pal = Image.fromarray(which, "P")
    pal.putpalette(palette.ravel().tolist())
    put("palette.png", palette[which], lambda p: pal.save(p, transparency=int(which.flat[0])))
    bits = draw(2).astype(bool)
    put("bilevel.png", grey(np.where(bits, 255, 0).astype(np.uint8)), lambda p: Image.fromarray(bits).save(p))
    cmyk = draw(256, 3)
    put("cmyk.jpg", None, lambda p: Image.fromarray(cmyk).convert("CMYK").save(p, quality=95))
    if not flat:
        src = draw(256, 3)
        rotated = Image.fromarray(src)
        exif = rotated.getexif()
        exif[0x0112] = 6  # shown turned 90 degrees clockwise
        put("rotated.png", np.rot90(src, -1), lambda p: rotated.save(p, exif=exif.tobytes()))
    if tiff:
        i32 = g16.astype(np.int32)
        put("int32.tif", grey(to8(g16)), lambda p: Image.fromarray(i32, "I").save(p))
        f = rng.random((h, w)).astype(np.float32) * 1.2 - 0.1  # a little outside 0..1: clipped
        put("float.tif", grey(np.floor(np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8)),
            lambda p: Image.fromarray(f, "F").save(p))
    return out


def test_torch_path_decodes_unusual_modes_as_dali_does(tmp_path):
    images = unusual_images(tmp_path)
    assert Image.open(images["grey16"][0]).mode == "I;16" and Image.open(images["float"][0]).mode == "F"
    for name, (path, expected) in images.items():
        got = np.asarray(open_rgb(path))
        assert got.dtype == np.uint8 and got.ndim == 3 and got.shape[2] == 3, name
        if expected is not None:
            assert got.shape == expected.shape, name
            tol = 1 if name in ("rgb16", "greyalpha16") else 0  # PIL keeps the high byte of 16-bit RGB(A)
            assert np.abs(got.astype(int) - expected).max() <= tol, name


def dali_decode(paths: list[str]) -> list[np.ndarray]:
    """What DaliLoader's decoder (``fn.decoders.image``, RGB, on the CPU) makes of each file."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None)
    def pipe():
        names = fn.external_source(source=lambda: [np.frombuffer(p.encode(), np.uint8) for p in paths],
                                   batch=True, dtype=types.UINT8)
        return fn.decoders.image(fn.io.file.read(names), device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    out = p.run()[0]
    return [np.array(out.at(i)) for i in range(len(paths))]


@needs_dali
def test_dali_decodes_unusual_modes_as_the_torch_path_does(tmp_path):
    images = unusual_images(tmp_path)
    del images["int32"]  # DALI refuses 32-bit integer TIFFs
    names = list(images)
    for name, got in zip(names, dali_decode([images[n][0] for n in names]), strict=True):
        path, expected = images[name]
        ours = np.asarray(open_rgb(path)).astype(int)
        assert got.shape == ours.shape, name
        assert np.abs(got.astype(int) - ours).max() <= (2 if path.endswith(".jpg") else 1), name
        if expected is not None:
            assert np.array_equal(got, expected), name


@needs_dali
def test_both_loaders_give_the_same_images(tmp_path):
    """End to end (eval transform): flat images, so that the two resize filters cannot differ."""
    from fastprune.data import DaliLoader

    root = tmp_path / "data"
    images = unusual_images(root / "a", flat=True, tiff=False)
    Image.new("RGB", (12, 8), (10, 200, 30)).save(root / "b.png")
    os.makedirs(root / "b")
    os.rename(root / "b.png", root / "b" / "plain.png")
    index = ImageFolderIndex(root, cache_dir=False)
    assert len(index) == len(images) + 1
    n = len(index)
    x_torch = next(iter(TorchLoader(index, batch_size=n, train=False, image_size=SIZE, num_workers=0)))[0]
    x_dali = next(iter(DaliLoader(index, batch_size=n, train=False, image_size=SIZE, num_threads=1, device="cpu")))[0]
    level = 1 / 255 / 0.224  # one 8-bit level, normalised
    for k, path in enumerate(index.files):
        diff = (x_torch[k] - x_dali[k]).abs().max().item()
        assert diff <= 2.5 * level, f"{os.path.basename(path)}: the loaders differ by {diff / level:.1f} levels"


# ------------------------------------------------------------ a path for an index; devices

def test_a_path_is_as_good_as_an_index(index, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = str(index.root)
    pruner = make_pruner(index)
    for given in (root, index.root):  # str and os.PathLike
        loader = TorchLoader(given, pruner, batch_size=5, image_size=SIZE, num_workers=0)
        assert loader.index.files == index.files
        assert torch.cat([b[2] for b in loader]).tolist() == pruner.epoch_indices.tolist()
        assert len(ImageFileDataset(given, image_size=SIZE)) == len(index)


@pytest.mark.parametrize("bad", [[1, 2, 3], 13, None, b"/bytes/path"])
def test_an_index_of_another_type_is_a_clear_error(index, bad):
    pruner = make_pruner(index)
    pattern = (r"^index must be a fastprune.data.ImageFolderIndex or a dataset path \(folder or CSV list\), "
               rf"got {type(bad).__name__}$")
    with pytest.raises(ValueError, match=pattern):
        TorchLoader(bad, pruner)
    with pytest.raises(ValueError, match=pattern):
        ImageFileDataset(bad)


@needs_dali
def test_dali_loader_takes_a_path(index, monkeypatch, tmp_path):
    from fastprune.data import DaliLoader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    pruner = make_pruner(index)
    loader = DaliLoader(str(index.root), pruner, batch_size=5, image_size=SIZE, num_threads=1, device="cpu")
    assert torch.cat([b[2] for b in loader]).tolist() == pruner.epoch_indices.tolist()
    with pytest.raises(ValueError, match=r"index must be a fastprune.data.ImageFolderIndex or a dataset path"):
        DaliLoader(42, pruner)


def loaders():
    yield "torch", lambda index, **kw: TorchLoader(index, num_workers=0, **kw)
    if HAS_DALI:
        from fastprune.data import DaliLoader

        yield "dali", lambda index, **kw: DaliLoader(index, num_threads=1, **kw)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_device_is_checked(index, kind):
    make = dict(loaders()).get(kind)
    if make is None:
        pytest.skip("DALI is not installed")
    with pytest.raises(ValueError, match=re.escape("device must be cpu, cuda or cuda:N, got 'gpu0'")):
        make(index, device="gpu0")
    with pytest.raises(ValueError, match=re.escape("device must be cpu, cuda or cuda:N, got 'mps'")):
        make(index, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=re.escape("device='cuda' but CUDA is not available here")):
            make(index, device="cuda")
    assert make(index, device="cpu").device == torch.device("cpu")


def test_dali_with_no_worker_count_still_decodes(tmp_path):
    """--workers 0 (no decoding processes for the torch loader) gives DALI one thread, not an error."""
    pytest.importorskip("nvidia.dali")
    from fastprune.train import TrainConfig, make_loader

    make_tree(str(tmp_path / "d"), per_class=(3, 3))
    index = ImageFolderIndex(tmp_path / "d", cache_dir=False)
    cfg = TrainConfig(data=str(tmp_path / "d"), workers=0, image_size=32, batch_size=4)
    loader, _ = make_loader("dali", index, None, cfg, False, torch.device("cpu"))
    assert sum(x.shape[0] for x, _, _ in loader) == len(index)
