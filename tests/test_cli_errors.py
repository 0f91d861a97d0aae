"""What a new user meets with bad input on the command line: damaged files, devices this machine lacks, outputs
that cannot be written, numbers no run can use.  Each is a one-line `fastprune CMD: error: ...` (exit status 2)
that names the argument or the file, raised before any long work; the library functions behind the commands
raise the same errors."""

import dataclasses
import errno
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fake_bench
from imagegen import make_tree

from fastprune import cli

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
LONG = "x" * 300  # one path component longer than any common file system allows (255 bytes)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors") / "data"
    make_tree(str(root), per_class=(3, 2, 2))
    return root


def run_cli(args, capsys):
    """(exit status, the error line); asserts that the error is one line of the form ``fastprune CMD: error:``."""
    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("scanning")]
    if rc == 0:
        return rc, ""
    assert len(lines) == 1 and lines[0].startswith(f"fastprune {args[0]}: error: "), err
    return rc, lines[0]


def train_args(data, out, *extra):
    return [str(a) for a in ["train", data, "--out", out, "--arch", "smallcnn", "--epochs", "1", "--batch-size", "4",
                             "--image-size", "32", "--workers", "0", "--loader", "torch", "--no-progress", *extra]]


def damaged(kind: str, path):
    """Write a damaged or foreign file of ``kind`` at ``path``; returns the words the error must hold."""
    if kind == "empty":
        path.write_bytes(b"")
        return "the file is empty"
    if kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 4)
        return "the file is corrupt or of another kind"
    if kind == "truncated":
        torch.save({"model": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
        return "the file is truncated or corrupt"
    raise ValueError(kind)


# ----------------------------------------------------------------------------- damaged files

@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_resume_from_a_damaged_checkpoint_names_it(data, tmp_path, capsys, kind):
    out = tmp_path / "run"
    out.mkdir()
    words = damaged(kind, out / "checkpoint.pt")
    rc, err = run_cli(train_args(data, out, "--resume"), capsys)
    assert rc == 2 and f"the checkpoint '{out / 'checkpoint.pt'}' cannot be read: {words}" in err, err


@pytest.mark.parametrize("content,words", [(torch.zeros(3), "it holds a Tensor, not a dict"),
                                           ({"weights": [1, 2]}, "it lacks 'config', 'model'")])
def test_resume_from_a_file_train_did_not_write_names_it(data, tmp_path, capsys, content, words):
    out = tmp_path / "run"
    out.mkdir()
    torch.save(content, out / "checkpoint.pt")
    rc, err = run_cli(train_args(data, out, "--resume"), capsys)
    assert rc == 2 and f"'{out / 'checkpoint.pt'}' is not a checkpoint of fastprune train ({words}" in err, err


def test_resume_from_a_checkpoint_whose_state_cannot_be_restored_names_it(data, tmp_path, capsys):
    """All the keys, the run's own settings, but a model state that fits no model: damaged, and said so."""
    from fastprune.train import CHECKPOINT_KEYS, TrainConfig

    out = tmp_path / "run"
    out.mkdir()
    args = cli.build_parser().parse_args(train_args(data, out, "--resume"))
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    ck = {k: {} for k in CHECKPOINT_KEYS}
    ck.update(config=dataclasses.asdict(cfg), history=[], epoch=0, step=0, model={"nonsense": torch.zeros(2)})
    torch.save(ck, out / "checkpoint.pt")
    rc, err = run_cli(train_args(data, out, "--resume"), capsys)
    assert rc == 2 and f"the state saved in '{out / 'checkpoint.pt'}' cannot be restored (RuntimeError" in err, err


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
@pytest.mark.parametrize("where", ["file", "run directory"])
def test_prune_static_model_from_a_damaged_checkpoint_names_it(data, tmp_path, capsys, kind, where):
    (tmp_path / "run").mkdir()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    words = damaged(kind, ckpt)
    rc, err = run_cli(["prune-static", data, "--out", tmp_path / "s.json", "--prune-ratio", "0.3", "--model",
                       ckpt if where == "file" else ckpt.parent, "--workers", "0", "--no-progress"], capsys)
    assert rc == 2 and f"'{ckpt}' is not a fastprune checkpoint: {words}" in err, err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("name,write,words", [
    ("empty.npy", lambda p: p.write_bytes(b""), "cannot be read: the file is empty"),
    ("cut.npy", lambda p: (np.save(p, np.zeros((7, 4), np.float32)), p.write_bytes(p.read_bytes()[:90])),
     "cannot be read: the file is corrupt or of another kind (ValueError"),
    ("garbage.npy", lambda p: p.write_bytes(b"not numpy at all"), "cannot be read: the file is corrupt"),
    ("words.npy", lambda p: np.save(p, np.array(["a"] * 7)), "must be numbers, got an array of <U1"),
    ("empty.pt", lambda p: p.write_bytes(b""), "cannot be read: the file is empty"),
    ("garbage.pt", lambda p: p.write_bytes(b"not torch at all"), "cannot be read: the file is corrupt"),
    ("cut.pt", lambda p: damaged("truncated", p), "cannot be read: the file is truncated or corrupt"),
])
def test_prune_static_features_from_a_damaged_file_names_it(data, tmp_path, capsys, name, write, words):
    path = tmp_path / name
    write(path)
    rc, err = run_cli(["prune-static", data, "--out", tmp_path / "s.json", "--prune-ratio", "0.3", "--features",
                       path], capsys)
    assert rc == 2 and str(path) in err and words in err, err


# ----------------------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["gpu0", pytest.param("cuda", marks=NO_CUDA)])
@pytest.mark.parametrize("command", ["train", "demo", "embed", "prune-static"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(data, tmp_path, capsys, command, device):
    out = tmp_path / "out"
    args = {"train": train_args(data, out),
            "demo": ["demo", "--out", out, "--epochs", "1"],
            "embed": ["embed", data, "--out", out, "--pretrained", "none"],
            "prune-static": ["prune-static", data, "--out", out / "s.json", "--prune-ratio", "0.3", "--model",
                             tmp_path / "none.pt"]}[command]
    rc, err = run_cli([*args, "--device", device], capsys)
    expect = ("must be cpu, cuda or cuda:N, got 'gpu0'" if device == "gpu0"
              else "='cuda' but CUDA is not available here")
    assert rc == 2 and "device" in err and expect in err, err
    assert not out.exists()  # nothing written, nothing computed


@pytest.mark.parametrize("device", ["gpu0", pytest.param("cuda", marks=NO_CUDA)])
@pytest.mark.parametrize("call", ["init_from_env", "Embeddings.compute", "extract_features", "load_checkpoint_model",
                                  "model_features", "demo.run"])
def test_the_library_refuses_the_same_devices(data, tmp_path, call, device):
    from fastprune.data import ImageFolderIndex

    index = ImageFolderIndex(data, cache_dir=False, progress=False)
    if call == "init_from_env":
        from fastprune.distributed import init_from_env as fn
        run = lambda: fn(device)  # noqa: E731
    elif call == "Embeddings.compute":
        from fastprune.embeddings import Embeddings
        run = lambda: Embeddings.compute(index, pretrained=None, device=device)  # noqa: E731
    elif call == "extract_features":
        from fastprune.static.features import extract_features
        run = lambda: extract_features(index, torch.nn.Linear(2, 3), device=device)  # noqa: E731
    elif call == "load_checkpoint_model":
        from fastprune.static.features import load_checkpoint_model
        run = lambda: load_checkpoint_model(tmp_path / "none.pt", device=device)  # noqa: E731
    elif call == "model_features":
        from fastprune.static.cli import model_features
        run = lambda: model_features(index, tmp_path / "none.pt", device=device)  # noqa: E731
    else:
        from fastprune.demo import run as demo
        run = lambda: demo(out=str(tmp_path / "demo"), device=device)  # noqa: E731
    with pytest.raises(ValueError, match=r"device.*(must be cpu, cuda or cuda:N|CUDA is not available)"):
        run()
    assert not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------- outputs that cannot be written

OUT_COMMANDS = ["train", "demo", "embed", "prune-static", "bench"]


def out_args(command: str, data, out, monkeypatch) -> list:
    """``command``'s arguments with ``--out`` at ``out`` (prune-static: a file in it); bench measures nothing."""
    if command == "bench":
        _fake_benchmarks(monkeypatch, {"n": 0})
    return {"train": train_args(data, out), "demo": ["demo", "--out", out, "--epochs", "1"],
            "embed": ["embed", data, "--out", out, "--pretrained", "none"],
            "prune-static": ["prune-static", data, "--out", out / "s.json", "--method", "random", "--prune-ratio",
                             "0.3"],
            "bench": ["bench", "--out", out, "--only", "step"]}[command]


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_over_long_out_name_is_one_line(data, tmp_path, capsys, command, monkeypatch):
    out = tmp_path / LONG
    args = out_args(command, data, out, monkeypatch)
    rc, err = run_cli(args, capsys)
    assert rc == 2 and f"--out '{out}" in err and "File name too long" in err, err
    if command == "prune-static":  # the file's own name too long
        rc, err = run_cli([*args[:3], tmp_path / f"{LONG}.json", *args[4:]], capsys)
        assert rc == 2 and "the file name is longer than this file system allows (305 > " in err, err


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_an_out_that_is_a_file_is_one_line(data, tmp_path, capsys, command, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    rc, err = run_cli(out_args(command, data, taken, monkeypatch), capsys)
    assert rc == 2 and f"'{taken}'" in err and " is a file" in err, err
    assert taken.read_text() == "a user's file"


def writable_anyway(folder) -> bool:
    """Whether this user writes in a read-only ``folder`` all the same (root, as a rule)."""
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return False
    (folder / "probe").rmdir()
    return True


@pytest.mark.parametrize("command", ["train", "demo", "embed", "prune-static", "bench"])
def test_an_out_in_a_read_only_folder_is_one_line(data, tmp_path, capsys, command, monkeypatch):
    if command == "bench":
        _fake_benchmarks(monkeypatch, {"n": 0})
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "out"
    args = {"train": train_args(data, out), "demo": ["demo", "--out", out, "--epochs", "1"],
            "embed": ["embed", data, "--out", out, "--pretrained", "none"],
            "prune-static": ["prune-static", data, "--out", locked / "s.json", "--method", "random",
                             "--prune-ratio", "0.3"],
            "bench": ["bench", "--out", out, "--only", "step"]}[command]
    locked.chmod(0o555)
    try:
        if writable_anyway(locked):
            pytest.skip("this user writes in read-only folders (root)")
        rc, err = run_cli(args, capsys)
    finally:
        locked.chmod(0o755)
    assert rc == 2 and "Permission denied" in err and "--out '" in err, err


def test_a_folder_that_refuses_writes_is_found_before_the_work(data, tmp_path, capsys, monkeypatch):
    """Writing is tried in the output folder before anything is computed (here the folder refuses it as a
    read-only or foreign folder would, whoever runs the test)."""
    import fastprune.rundir as R
    import fastprune.static.cli as S

    def refuse(*args, dir=None, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(R.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(S, "random_subset", lambda *a: pytest.fail("computed before checking --out"))
    rc, err = run_cli(["prune-static", data, "--out", tmp_path / "s.json", "--method", "random", "--prune-ratio",
                       "0.3"], capsys)
    assert rc == 2 and f"--out '{tmp_path / 's.json'}': cannot write in its folder '{tmp_path}': " \
                       "Permission denied" in err, err


def test_any_os_error_is_one_line_and_the_traceback_is_there_on_request(data, tmp_path, capsys, monkeypatch):
    import fastprune.static.cli as S

    def disk_gone(*a, **k):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "s.json"))

    monkeypatch.setattr(S, "save_subset", disk_gone)
    args = ["prune-static", data, "--out", tmp_path / "s.json", "--method", "random", "--prune-ratio", "0.3"]
    rc, err = run_cli(args, capsys)
    assert rc == 2 and f"[Errno 5] Input/output error: '{tmp_path / 's.json'}'" in err
    monkeypatch.setenv("FASTPRUNE_TRACEBACK", "1")
    with pytest.raises(OSError, match="Input/output error"):
        cli.main([str(a) for a in args])
    assert "FASTPRUNE_TRACEBACK=1" in " ".join(cli.build_parser().format_help().split())


# ----------------------------------------------------------------------------- prune-static --out

def test_prune_static_out_that_is_a_folder_is_refused_before_computing(data, tmp_path, capsys, monkeypatch):
    import fastprune.static.cli as S

    feats = tmp_path / "f.npy"
    np.save(feats, np.zeros((8, 3), np.float32))
    monkeypatch.setattr(S, "load_features", lambda *a: pytest.fail("computed before checking --out"))
    folder = tmp_path / "subsets"
    folder.mkdir()
    rc, err = run_cli(["prune-static", data, "--out", folder, "--prune-ratio", "0.3", "--features", feats], capsys)
    assert rc == 2 and f"--out '{folder}' is a folder; give the path of the file to write, e.g. " \
                       f"'{folder / 'subset.json'}'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy", "subsets"] and not any(folder.iterdir())


def test_prune_static_makes_the_folders_of_its_outputs(data, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "s.json"
    rc, _ = run_cli(["prune-static", data, "--out", out, "--method", "random", "--prune-ratio", "0.3"], capsys)
    assert rc == 0 and json.loads(out.read_text())["method"] == "random"


def test_save_subset_leaves_no_temporary_behind(tmp_path):
    from fastprune.static import save_subset

    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_subset(tmp_path, torch.tensor([1, 2]), 5, "random")
    with pytest.raises(TypeError):  # a write that fails half-way
        save_subset(tmp_path / "s.json", torch.tensor([1, 2]), 5, "random", params={"x": object()})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fastprune bench outputs

def _fake_benchmarks(monkeypatch, calls: dict):
    """``python -m benchmarks`` with one benchmark that measures nothing (counted in ``calls``)."""
    import fastprune.benchmarks.__main__ as M  # the module `fastprune bench` runs

    monkeypatch.setattr(M, "BENCHES", {"step": fake_bench("step", calls)})
    monkeypatch.setattr(M, "machine", lambda: {"device": "Dev X", "date": "2026-01-02"})


def test_bench_out_file_folder_and_missing_parent(tmp_path, capsys, monkeypatch):
    """--out is a folder: one that exists or is made (with its parents) works; a file, or a results file that
    is a folder, is refused before anything is measured."""
    calls = {"n": 0}
    _fake_benchmarks(monkeypatch, calls)
    for out in (tmp_path / "res", tmp_path / "res", tmp_path / "a" / "b" / "res"):  # new, existing, deep
        rc, _ = run_cli(["bench", "--out", out, "--only", "step"], capsys)
        assert rc == 0 and [p.name for p in out.iterdir()] == ["Dev-X-2026-01-02.json"]
        assert json.loads((out / "Dev-X-2026-01-02.json").read_text())["records"][0]["bench"] == "step"
    assert calls["n"] == 3
    (tmp_path / "file").write_text("x")
    rc, err = run_cli(["bench", "--out", tmp_path / "file", "--only", "step"], capsys)
    assert rc == 2 and f"--out '{tmp_path / 'file'}' is a file, not a folder" in err
    (tmp_path / "odd" / "Dev-X-2026-01-02.json").mkdir(parents=True)
    rc, err = run_cli(["bench", "--out", tmp_path / "odd", "--only", "step"], capsys)
    assert rc == 2 and "the results file" in err and "is a folder" in err
    assert calls["n"] == 3 and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("module,flag", [("bench_loader", "--out"), ("bench_noise", "--json")])
def test_benchmark_json_outputs_are_checked_before_measuring(tmp_path, capsys, module, flag):
    import importlib

    parse_args = importlib.import_module(f"benchmarks.{module}").parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(["--smoke", flag, str(tmp_path)])
    assert e.value.code == 2 and f"{flag} '{tmp_path}' is a folder" in capsys.readouterr().err
    args = parse_args(["--smoke", flag, str(tmp_path / "new" / "r.json")])
    assert (tmp_path / "new").is_dir() and not (tmp_path / "new" / "r.json").exists()
    assert getattr(args, flag[2:]) == str(tmp_path / "new" / "r.json")


# ----------------------------------------------------------------------------- numbers no run can use

@pytest.mark.parametrize("command,flag,value,message", [
    ("prune-static", "--image-size", "0", "--image-size must be an integer >= 1, got 0"),
    ("prune-static", "--image-size", "-3", "--image-size must be an integer >= 1, got -3"),
    ("prune-static", "--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("prune-static", "--workers", "-1", "--workers must be an integer >= 0, got -1"),
    ("embed", "--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("embed", "--workers", "-2", "--workers must be an integer >= 0, got -2"),
    ("demo", "--epochs", "0", "epochs must be an integer >= 1, got 0"),
    ("demo", "--workers", "-1", "workers must be an integer >= 0, got -1"),
    ("demo", "--seeds", "0", "seeds must be an integer >= 1, got 0"),
    ("demo", "--seeds", "-2", "seeds must be an integer >= 1, got -2"),
    ("train", "--epochs", "0", "--epochs must be an integer in [1, inf), got 0"),
    ("train", "--batch-size", "0", "--batch-size must be an integer in [1, inf), got 0"),
    ("train", "--workers", "-1", "--workers must be an integer in [0, inf), got -1"),
    ("train", "--image-size", "0", "--image-size must be an integer in [1, inf), got 0"),
    ("train", "--checkpoint-every", "-1", "--checkpoint-every must be an integer in [0, inf), got -1"),
])
def test_numbers_no_run_can_use_are_one_line(data, tmp_path, capsys, command, flag, value, message):
    out = tmp_path / "out"
    feats = tmp_path / "f.npy"
    np.save(feats, np.zeros((8, 3), np.float32))
    args = {"train": train_args(data, out), "demo": ["demo", "--out", out, "--epochs", "1"],
            "embed": ["embed", data, "--out", out, "--pretrained", "none"],
            "prune-static": ["prune-static", data, "--out", out / "s.json", "--prune-ratio", "0.3", "--features",
                             feats]}[command]
    rc, err = run_cli([*args, flag, value], capsys)
    assert rc == 2 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("kw,message", [(dict(image_size=0), "--image-size must be an integer >= 1, got 0"),
                                        (dict(batch_size=0), "--batch-size must be an integer >= 1, got 0"),
                                        (dict(num_workers=-1), "--workers must be an integer >= 0, got -1"),
                                        (dict(device="gpu0"), "--device must be cpu, cuda or cuda:N, got 'gpu0'")])
def test_prune_static_refuses_the_same_arguments_from_python(data, tmp_path, kw, message):
    from fastprune.data import ImageFolderIndex
    from fastprune.static.cli import prune_static

    index = ImageFolderIndex(data, cache_dir=False, progress=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        prune_static(index, method="random", prune_ratio=0.3, out=tmp_path / "new" / "s.json", **kw)
    assert not (tmp_path / "new").exists()


def test_atomic_writes_get_a_plain_files_permissions(tmp_path):
    from fastprune.rundir import atomic_write

    (tmp_path / "plain").write_text("x")
    atomic_write(tmp_path / "atomic", lambda tmp: Path(tmp).write_text("y"))
    assert (tmp_path / "atomic").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
