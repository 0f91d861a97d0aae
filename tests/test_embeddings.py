"""CLIP embedding tables with a tiny random open_clip model on generated folders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from imagegen import make_tree
from PIL import Image

import fastprune as fp
from fastprune.data import ImageFolderIndex

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed")
from fastprune import embeddings as E  # noqa: E402
from fastprune.embeddings import Embeddings  # noqa: E402

TINY = str(Path(__file__).parent / "assets" / "fp-tiny.json")
open_clip.add_model_config(TINY)
TEMPLATES = ["a photo of a {}.", "a drawing of the {}."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with fixed random weights, saved as a local checkpoint."""
    torch.manual_seed(3)
    net = open_clip.create_model("fp-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def index(tmp_path):
    make_tree(str(tmp_path / "data"), per_class=(4, 3, 3))
    return ImageFolderIndex(tmp_path / "data", cache_dir=False)


def reference_model(checkpoint):
    net, _, preprocess = open_clip.create_model_and_transforms("fp-tiny", pretrained=str(checkpoint))
    return net.eval(), preprocess


def compute(index, checkpoint, **kw):
    args = dict(model="fp-tiny", pretrained=str(checkpoint), device="cpu", batch_size=4, templates=TEMPLATES,
                loader="torch", num_workers=0, progress=False)
    args.update(kw)
    return Embeddings.compute(index, **args)


def test_tables_match_the_model(index, checkpoint):
    emb = compute(index, checkpoint)
    n, c = len(index), index.num_classes
    assert emb.image.shape == (n, 16) and emb.text.shape == (c, 16)
    assert emb.image.dtype == emb.text.dtype == torch.float16
    torch.testing.assert_close(emb.image.float().norm(dim=1), torch.ones(n), atol=2e-3, rtol=0)
    net, preprocess = reference_model(checkpoint)
    with torch.no_grad():
        for i in (0, 5, n - 1):
            x = preprocess(Image.open(index.files[i]).convert("RGB"))[None]
            expected = F.normalize(net.encode_image(x).float(), dim=-1)[0]
            torch.testing.assert_close(emb.image[i].float(), expected, atol=1e-3, rtol=1e-3)
        tok = open_clip.get_tokenizer("fp-tiny")
        for ci, name in enumerate(emb.meta["class_names"]):
            per = F.normalize(net.encode_text(tok([t.format(name) for t in TEMPLATES])).float(), dim=-1)
            torch.testing.assert_close(emb.text[ci].float(), F.normalize(per.mean(0), dim=0), atol=1e-3, rtol=1e-3)
    assert emb.meta["class_names"] == ["class 00", "class 01", "class 02"]
    assert emb.meta["preprocess"]["size"] == 32 and emb.meta["checkpoint_sha256"]


def test_dali_decode_agrees_with_the_pil_path(index, checkpoint):
    pytest.importorskip("nvidia.dali")
    a = compute(index, checkpoint, loader="dali")
    b = compute(index, checkpoint, loader="torch")
    cos = (a.image.float() * b.image.float()).sum(1)
    assert cos.mean() > 0.97, cos  # resize implementations differ slightly; the decode is the same
    assert torch.equal(a.text, b.text)


def test_class_names(tmp_path):
    imagenet = E.class_prompts_names(["n01440764", "n01443537"])
    assert imagenet == ["tench", "goldfish"]
    assert len(E.imagenet_class_names()) == 1000
    mapping = tmp_path / "names.tsv"
    mapping.write_text("a_b\tapple\nc\tcat\n")
    assert E.class_prompts_names(["a_b", "c"], mapping) == ["apple", "cat"]
    with pytest.raises(ValueError, match="class-name mapping has no entry for 1 classes, e.g. \\['d'\\]"):
        E.class_prompts_names(["a_b", "d"], mapping)
    assert E.class_prompts_names(["golden_retriever", "tabby-cat"]) == ["golden retriever", "tabby cat"]
    assert len(E.prompt_templates("openai")) == 80 and len(E.prompt_templates("simple")) >= 1
    with pytest.raises(ValueError, match="each template needs a '\\{\\}'"):
        E.prompt_templates(["no slot"])


def test_save_load_round_trip_and_fingerprint(index, checkpoint, tmp_path):
    emb = compute(index, checkpoint, out=tmp_path / "emb")
    files = sorted(os.listdir(tmp_path / "emb"))
    assert files == ["image.npy", "meta.json", "text.npy"]
    meta = json.loads((tmp_path / "emb" / "meta.json").read_text())
    for key in ("model", "pretrained", "checkpoint_sha256", "D", "N", "C", "classes", "fingerprint",
                "fingerprint_version", "file_times", "fastprune_version", "date"):
        assert key in meta, key
    loaded = Embeddings.load(tmp_path / "emb", index=index)
    assert torch.equal(loaded.image, emb.image) and torch.equal(loaded.text, emb.text)
    assert isinstance(np.load(tmp_path / "emb" / "image.npy", mmap_mode="r"), np.memmap)
    other = ImageFolderIndex.__new__(ImageFolderIndex)
    other.__dict__.update(index.__dict__)
    other._rel = index._rel[:-1] + ["class_02/renamed.jpg"]
    other._files = other._fingerprint = other._stat_cache = None
    with pytest.raises(ValueError, match="were computed for another dataset"):
        Embeddings.load(tmp_path / "emb", index=other)
    with pytest.raises(FileExistsError, match="already holds embeddings"):
        compute(index, checkpoint, out=tmp_path / "emb")
    arrays = Embeddings.from_arrays(np.random.rand(5, 8), torch.rand(3, 8))
    arrays.save(tmp_path / "arr")
    back = Embeddings.load(tmp_path / "arr")
    assert torch.equal(back.image, arrays.image) and back.image.dtype == torch.float16


def test_pruner_takes_the_tables(index, checkpoint):
    emb = compute(index, checkpoint)
    pruner = fp.DynamicPruner(len(index), index.num_classes, epochs=2, image_emb=emb.image, text_emb=emb.text,
                              device="cpu")
    idx = torch.arange(len(index))
    pruner.step(torch.randn(len(idx), index.num_classes), index.labels, idx)
    expected = (emb.image.float() * emb.text.float()[index.labels]).sum(1)
    torch.testing.assert_close(pruner.consistency, expected, atol=2e-3, rtol=0)


def test_offline_tag_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "_reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"not in the local cache .* pass pretrained=/path/to/that/file"):
        E.resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match=r"pretrained='nope' is not an open_clip tag for model 'ViT-B-32'"):
        E.resolve_pretrained("ViT-B-32", "nope")
    with pytest.raises(FileNotFoundError, match=r"pretrained checkpoint '/no/such/file.pt' does not exist"):
        E.resolve_pretrained("ViT-B-32", "/no/such/file.pt")


def test_unreachable_host_is_detected_within_seconds():
    t0 = time.perf_counter()
    assert not E._reachable("10.255.255.1", 443, timeout=1.0)
    assert time.perf_counter() - t0 < 3


KILLER = textwrap.dedent("""
    import os, signal, sys
    import open_clip
    from fastprune.data import ImageFolderIndex
    from fastprune.embeddings import Embeddings
    open_clip.add_model_config(sys.argv[1])
    index = ImageFolderIndex(sys.argv[2], cache_dir=False)

    def on_chunk(rows):
        if rows >= 8:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after a chunk was committed

    Embeddings.compute(index, model="fp-tiny", pretrained=sys.argv[3], device="cpu", batch_size=4,
                       templates=["a photo of a {}."], out=sys.argv[4], loader="torch", num_workers=0,
                       progress=False, on_chunk=on_chunk, chunk_rows=4)
""")


def test_kill_and_resume_gives_the_same_file(index, checkpoint, tmp_path):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), TINY, str(index.root), str(checkpoint), str(out)],
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    progress = json.loads((out / "progress.json").read_text())
    assert progress["rows_done"] == 8 and not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="are incomplete"):
        (out / "meta.json").write_text(json.dumps({"complete": False}))
        Embeddings.load(out)
    (out / "meta.json").unlink()
    resumed = compute(index, checkpoint, out=out, resume=True, templates=["a photo of a {}."], chunk_rows=4)
    straight = compute(index, checkpoint, out=tmp_path / "straight", templates=["a photo of a {}."], chunk_rows=4)
    assert (out / "image.npy").read_bytes() == (tmp_path / "straight" / "image.npy").read_bytes()
    assert torch.equal(resumed.text, straight.text)
    with pytest.raises(ValueError, match="cannot resume .* differs in"):
        (out / "progress.json").write_text(json.dumps({"key": {"model": "other"}, "rows_done": 0}))
        compute(index, checkpoint, out=out, resume=True)


def test_embed_cli_end_to_end(index, checkpoint, tmp_path):
    out = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastprune", "embed", str(index.root), "--model", "fp-tiny", "--model-config", TINY,
           "--pretrained", str(checkpoint), "--out", str(out), "--batch-size", "4", "--device", "cpu",
           "--templates", "simple", "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    emb = Embeddings.load(out, index=index)
    assert emb.image.shape == (len(index), 16)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 2 and "already holds embeddings" in again.stderr and "Traceback" not in again.stderr


def test_damaged_files_are_errors_that_name_them(tmp_path):
    good = tmp_path / "good"
    Embeddings.from_arrays(torch.rand(6, 8), torch.rand(3, 8)).save(good)

    def damaged(name, write):
        d = tmp_path / name
        shutil.copytree(good, d)
        write(d)
        return d

    cases = [
        (lambda d: (d / "meta.json").write_text("{not json"), r"meta.json: not readable JSON"),
        (lambda d: (d / "meta.json").write_text("[1, 2]"), r"meta.json: not the metadata of fastprune embeddings"),
        (lambda d: (d / "image.npy").write_bytes(b"garbage" * 10), r"image.npy: not a readable .npy table"),
        (lambda d: (d / "text.npy").write_bytes((d / "text.npy").read_bytes()[:90]),
         r"text.npy: not a readable .npy table"),
        (lambda d: np.save(d / "image.npy", np.zeros((5, 8), np.float16)), r"image.npy has 5 rows but its meta.json"),
        (lambda d: np.save(d / "text.npy", np.zeros((3, 7), np.float16)), r"image.npy has width 8 but .*text.npy"),
        (lambda d: np.save(d / "text.npy", np.zeros(24, np.float16)), r"text.npy: expected a 2-D float16"),
        (lambda d: (d / "image.npy").unlink(), r"image.npy is missing"),
        (lambda d: np.save(d / "image.npy", np.full((6, 8), np.nan, np.float16)),
         r"image.npy: 6 of 6 rows hold NaN or inf \(first: row 0\)"),
    ]
    for k, (write, match) in enumerate(cases):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            Embeddings.load(damaged(f"case{k}", write))
    with pytest.raises(ValueError, match=r"a directory written by `fastprune embed`; '.*meta.json' is a file"):
        Embeddings.load(good / "meta.json")
    assert Embeddings.load(good).image.shape == (6, 8)


def test_the_pruner_refuses_non_finite_tables():
    image, text = torch.rand(6, 8), torch.rand(3, 8)
    image[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"image_emb: 1 of 6 rows hold NaN or inf \(first: row 4\)"):
        fp.DynamicPruner(6, 3, epochs=2, image_emb=image, text_emb=text, device="cpu")
    text[1] = float("inf")
    with pytest.raises(ValueError, match=r"text_emb: 1 of 3 rows hold NaN or inf \(first: row 1\)"):
        fp.DynamicPruner(6, 3, epochs=2, text_emb=text, device="cpu")


def test_a_copy_of_the_data_still_matches_with_a_caution(index, tmp_path):
    Embeddings.from_arrays(torch.rand(len(index), 8), torch.rand(index.num_classes, 8),
                           meta=index.identity()).save(tmp_path / "emb")
    Embeddings.load(tmp_path / "emb", index=index)  # same data: silent
    copy = tmp_path / "copy"
    shutil.copytree(index.root, copy, copy_function=shutil.copy)
    with pytest.warns(RuntimeWarning, match=r"some files have other modification times"):
        Embeddings.load(tmp_path / "emb", index=ImageFolderIndex(copy, cache_dir=False))
    victim = copy / index.relative_files[1]
    victim.write_bytes(victim.read_bytes() + b"\0" * 7)  # the same name, other content
    with pytest.raises(ValueError, match=r"computed for another dataset .*: the file names, classes, labels or file"):
        Embeddings.load(tmp_path / "emb", index=ImageFolderIndex(copy, cache_dir=False))
