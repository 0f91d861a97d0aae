"""`fastprune train` and `fastprune demo`: end to end, resume after a kill, outputs, error messages."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from imagegen import make_tree
from PIL import Image

from fastprune import cli

USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    make_tree(str(root / "train"), per_class=(16, 15, 14))
    make_tree(str(root / "val"), per_class=(4, 4, 4), seed=1)
    return root


def train_args(folders, out, *extra):
    return [str(folders / "train"), "--val", str(folders / "val"), "--out", str(out), "--arch", "smallcnn",
            "--epochs", "3", "--batch-size", "8", "--image-size", "32", "--workers", "0", "--lr", "0.05",
            "--loader", "torch", "--no-progress", "--keep-ratio", "0.6", *extra]


KILL_AFTER_FIRST_EPOCH = textwrap.dedent("""
    import os, signal, sys
    from fastprune import cli
    from fastprune.train import TrainConfig, train
    args = cli.build_parser().parse_args(["train", *sys.argv[1:]])
    fields = {f for f in TrainConfig.__dataclass_fields__ if f != "extra"}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    train(cfg, progress=False, on_epoch_end=lambda e, r: os.kill(os.getpid(), signal.SIGKILL))
""")


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_kill_and_resume_continues_exactly(folders, tmp_path):
    straight = tmp_path / "straight"  # in a process of its own too: the same kernels as the resumed run
    subprocess.run([sys.executable, "-m", "fastprune", "train", *train_args(folders, straight)], env=USER_ENV,
                   check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_FIRST_EPOCH)
    proc = subprocess.run([sys.executable, str(script), *train_args(folders, killed)], env=USER_ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(read_log(killed)) == 1 and (killed / "checkpoint.pt").exists()
    resumed = subprocess.run([sys.executable, "-m", "fastprune", "train", *train_args(folders, killed, "--resume")],
                             env=USER_ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    a, b = read_log(straight), read_log(killed)
    assert [r["epoch"] for r in b] == [0, 1, 2]  # the log continues
    assert [r["selection"] for r in a] == [r["selection"] for r in b]  # same selections
    assert [r["samples_trained"] for r in a] == [r["samples_trained"] for r in b]
    assert a[1]["samples_trained"] < a[0]["samples_trained"]  # pruned after the warm-up epoch
    for key in ("val_top1", "val_top5", "images_per_s", "kept_fraction", "visits_saved", "epoch_seconds"):
        assert key in b[-1]


QUIET = {"progress": False, "log": lambda *_: None}


class Interrupted(Exception):
    """Stands for a kill at a chosen point of a run."""


def _small_config(folders, out, resume=False, **kw):
    from fastprune.train import TrainConfig

    return TrainConfig(data=str(folders / "train"), out=str(out), arch="smallcnn", epochs=3, batch_size=8,
                       image_size=32, workers=0, loader="torch", keep_ratio=0.6, resume=resume, **kw)


def test_mid_epoch_checkpoint_resumes_at_the_next_batch(folders, tmp_path, monkeypatch):
    """Interrupted right after a mid-epoch checkpoint, the run resumes at the next batch and ends
    exactly where an uninterrupted run ends."""
    import fastprune.train as T

    def cfg(out, resume=False):
        return _small_config(folders, out, resume, checkpoint_every=4)

    T.train(cfg(tmp_path / "straight"), **QUIET)
    real_save = T._atomic_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["step"] == 8:  # inside epoch 1 (epoch 0 has 6 steps)
            raise Interrupted

    monkeypatch.setattr(T, "_atomic_save", save_then_die)
    with pytest.raises(Interrupted):
        T.train(cfg(tmp_path / "cut"), **QUIET)
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["loader"]["epoch"] == 1 and ck["loader"]["position"] == 16
    monkeypatch.setattr(T, "_atomic_save", real_save)
    T.train(cfg(tmp_path / "cut", resume=True), **QUIET)
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "cut")
    assert [r["selection"] for r in a] == [r["selection"] for r in b]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


@pytest.mark.parametrize("crash", ["before the epoch's checkpoint", "after it, before the log"])
def test_crash_at_an_epoch_end_neither_repeats_nor_loses_the_epoch(folders, tmp_path, monkeypatch, crash):
    """The checkpoint is the epoch's commit point and the log follows it: a run stopped on either side of it
    resumes to the same log (each epoch once), selections and weights as an uninterrupted run, and the
    temporaries a killed write leaves in the run directory are removed (a user's own files stay)."""
    import fastprune.train as T

    def cfg(out, resume=False):
        return _small_config(folders, out, resume)

    T.train(cfg(tmp_path / "straight"), **QUIET)
    real_save = T._atomic_save

    def stop_at_epoch_two(obj, path):
        if obj["epoch"] == 2 and crash.startswith("before"):
            raise Interrupted
        real_save(obj, path)
        if obj["epoch"] == 2:
            raise Interrupted

    monkeypatch.setattr(T, "_atomic_save", stop_at_epoch_two)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        T.train(cfg(cut), **QUIET)
    monkeypatch.setattr(T, "_atomic_save", real_save)
    for name in (".fastprune-k1ll3d00.tmp", "tmpab_cd123.tmp", "notes.tmp"):  # two killed writes, a user's file
        (cut / name).write_bytes(b"x" * 1000)
    T.train(cfg(cut, resume=True), **QUIET)
    a, b = read_log(tmp_path / "straight"), read_log(cut)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    assert [r["selection"] for r in a] == [r["selection"] for r in b]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert sorted(f.name for f in cut.glob("*.tmp")) == ["notes.tmp"]
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(cut / "checkpoint.pt", weights_only=False)
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def test_a_fresh_run_leaves_a_users_tmp_files_alone(folders, tmp_path, capsys):
    """Only a resumed run directory is known to be fastprune's: a fresh --out keeps files that merely look like
    an older version's temporaries."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tmpab_cd123.tmp").write_text("my notes")
    (out / ".fastprune-k1ll3d00.tmp").write_text("x")
    assert cli.main(["train", *train_args(folders, out, "--epochs", "1")]) == 0
    assert sorted(f.name for f in out.glob("*.tmp")) == ["tmpab_cd123.tmp"]


def test_a_full_disk_is_reported_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    import fastprune.train as T

    def full(obj, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4096 vs 2048")

    monkeypatch.setattr(T.torch, "save", full)
    with pytest.raises(OSError, match="no space left on the device writing .*checkpoint.pt") as e:
        T._atomic_save({"x": 1}, tmp_path / "checkpoint.pt")
    assert e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_out_inside_the_data_is_refused(folders, tmp_path, capsys):
    for out in (folders / "train" / "runs" / "r1", folders / "val", folders / "train"):
        rc, err = run_cli(["train", *train_args(folders, out)], capsys)
        assert rc == 2
        err = err.strip()
        assert "is inside the" in err and "would become training data" in err and "\n" not in err
        assert not (out / "log.jsonl").exists()
    assert not (folders / "train" / "runs").exists()


def _lock(out, pid, host=None):
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / ".fastprune.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_a_run_directory_in_use_is_refused(folders, tmp_path, capsys):
    """A live holder (this very process) or one on another host: a one-line error naming it; the lock stays."""
    for out, host in ((tmp_path / "live", None), (tmp_path / "remote", "gpu-node-7")):
        _lock(out, os.getpid(), host)
        rc, err = run_cli(["train", *train_args(folders, out)], capsys)
        assert rc == 2
        err = err.strip()
        assert f"is in use by process {os.getpid()} on {host or ''}" in err and "\n" not in err
        assert (out / ".fastprune.lock").exists() and not (out / "log.jsonl").exists()


def test_a_stale_lock_is_replaced_and_said(folders, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    _lock(out, int(dead.stdout))
    rc = cli.main(["train", *train_args(folders, out, "--epochs", "1")])
    assert rc == 0
    assert f"replaced the stale lock of process {int(dead.stdout)}" in capsys.readouterr().out
    assert not (out / ".fastprune.lock").exists() and len(read_log(out)) == 1


def test_resume_refuses_other_settings_or_data_and_lists_them(folders, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["train", *train_args(folders, out, "--epochs", "1")], capsys)[0] == 0
    changed = train_args(folders, out, "--epochs", "1", "--resume", "--keep-ratio", "0.5", "--arch", "resnet18",
                         "--policy", "topk")
    rc, err = run_cli(["train", *changed], capsys)
    assert rc == 2 and "\n" not in err.strip()
    for what in ("--keep-ratio 0.6 in the run, 0.5 now", "--arch 'smallcnn' in the run, 'resnet18' now",
                 "--policy 'infobatch' in the run, 'topk' now"):
        assert what in err, err
    other = tmp_path / "other"  # the same number of images and classes, other files
    make_tree(str(other), per_class=(16, 15, 14), seed=5)
    for i, f in enumerate(sorted(f for f in other.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))):
        f.rename(f.with_name(f"renamed_{i}{f.suffix}"))
    args = train_args(folders, out, "--epochs", "1", "--resume")
    args[0] = str(other)
    rc, err = run_cli(["train", *args], capsys)
    assert rc == 2 and "is not the data the run trained on" in err
    assert len(read_log(out)) == 1
    # what may change: the epoch count (the run goes on to the new count), workers, device, loader
    rc, err = run_cli(["train", *train_args(folders, out, "--epochs", "2", "--resume", "--workers", "1")], capsys)
    assert rc == 0, err
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_resume_compares_file_sizes_and_notes_a_copy(folders, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folders / "train", data)
    out = tmp_path / "run"
    args = train_args(folders, out, "--epochs", "1")
    args[0] = str(data)
    assert run_cli(["train", *args], capsys)[0] == 0
    copy = tmp_path / "copy"  # the data copied elsewhere without its times: the run goes on, and says why
    shutil.copytree(data, copy, copy_function=shutil.copy)
    resumed = train_args(folders, out, "--epochs", "2", "--resume")
    resumed[0] = str(copy)
    rc = cli.main(["train", *resumed])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "note: resuming on" in captured.out and "other modification times" in captured.out
    victim = sorted(f for f in copy.rglob("*") if f.suffix.lower() in (".jpg", ".png"))[0]  # overwritten
    Image.new("RGB", (40, 40), (250, 0, 0)).save(victim)
    resumed[resumed.index("--epochs") + 1] = "3"
    rc, err = run_cli(["train", *resumed], capsys)
    assert rc == 2 and "is not the data the run trained on (the file names, classes, labels or file sizes differ)" \
        in err, err
    assert [r["epoch"] for r in read_log(out)] == [0, 1]


def test_a_broken_val_image_stops_the_run_before_training(folders, tmp_path, capsys):
    import shutil

    val = tmp_path / "val"
    shutil.copytree(folders / "val", val)
    victim = sorted(f for f in val.rglob("*") if f.suffix.lower() in (".jpg", ".png"))[1]
    victim.write_bytes(b"")
    out = tmp_path / "run"
    args = train_args(folders, out, "--epochs", "1", "--checkpoint-every", "1")
    args[args.index("--val") + 1] = str(val)
    rc = cli.main(["train", *args])
    captured = capsys.readouterr()
    assert rc == 2 and "--val has 1 unreadable image (first: " in captured.err and "file is empty" in captured.err
    assert "\n" not in captured.err.strip() and not (out / "checkpoint.pt").exists()  # no step was trained
    rc = cli.main(["train", *args, "--skip-bad-files"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "note: --val: 1 unreadable image will be left out of evaluation" in captured.out


def test_one_class_is_refused(tmp_path, capsys):
    make_tree(str(tmp_path / "one"), per_class=(5,))
    rc, err = run_cli(["train", str(tmp_path / "one"), "--out", str(tmp_path / "o"), "--loader", "torch"], capsys)
    assert rc == 2 and "has one class ('class_00'): there is nothing to tell apart" in err, err


def test_train_flags_take_their_defaults_from_one_place():
    """The train sub-command's flags are TrainConfig's fields with its defaults, and its pruning fields have
    DynamicPruner's defaults."""
    import dataclasses
    import inspect

    from fastprune import DynamicPruner
    from fastprune.train import TrainConfig

    args, cfg = cli.build_parser().parse_args(["train", "data"]), TrainConfig("data")
    flags = [f.name for f in dataclasses.fields(TrainConfig) if "group" in f.metadata]
    assert {name: getattr(args, name) for name in flags} == {name: getattr(cfg, name) for name in flags}
    assert {"keep_ratio", "policy", "noise_ratio", "seed", "out", "workers", "channels_last"} <= set(flags)
    params = inspect.signature(DynamicPruner).parameters
    kwargs = cfg.pruner_kwargs()
    assert kwargs.pop("epochs") == 90 and {k: params[k].default for k in kwargs} == kwargs


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "nan", "--lr must be a finite number in (0, inf), got nan"),
    ("--lr", "0", "--lr must be a finite number in (0, inf)"),
    ("--momentum", "1.5", "--momentum must be a finite number in [0, 1)"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number"),
    ("--image-size", "0", "--image-size must be an integer in [1, inf)"),
    ("--checkpoint-every", "-1", "--checkpoint-every must be an integer in [0, inf)"),
    ("--label-smoothing", "1", "--label-smoothing must be a finite number in [0, 1)"),
])
def test_settings_no_run_can_use_are_refused_at_the_door(folders, tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    rc, err = run_cli(["train", *train_args(folders, out, flag, value)], capsys)
    assert rc == 2 and message in err and "\n" not in err.strip()
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:logits.*non-finite loss:RuntimeWarning")  # the pruner's own warning
def test_a_loss_that_stays_non_finite_stops_the_run(folders, tmp_path, capsys, monkeypatch):
    import fastprune.pruner as P

    real_step = P.DynamicPruner.step
    monkeypatch.setattr(P.DynamicPruner, "step", lambda self, *a, **k: real_step(self, *a, **k) * float("nan"))
    out = tmp_path / "run"
    rc, err = run_cli(["train", *train_args(folders, out, "--max-nonfinite-steps", "4")], capsys)
    assert rc == 2 and "non-finite (NaN or inf) for the last 6 steps, up to step 6" in err, err
    assert "Lower --lr" in err and not (out / "log.jsonl").exists()


def test_outputs_exist_and_parse(folders, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", *train_args(folders, out)]) == 0
    for png in ("kept_and_accuracy.png", "score_consistency_hist.png", "suspected_noisy.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    with open(out / "suspected_noisy.csv") as f:
        assert next(csv.reader(f)) == ["index", "path", "given_label", "action", "suggested_label", "model_label",
                                       "model_margin", "clip_label", "clip_margin", "belief", "consistency",
                                       "score"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and 0 < summary["visits_saved"] < 1


def run_cli(args, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err
    return rc, err


def test_error_messages_are_one_line(folders, tmp_path, capsys):
    cases = [
        (["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "dataset root '.*missing' does not exist"),
        (["train", str(folders / "train"), "--arch", "resnet5O", "--out", str(tmp_path / "o2"), "--loader", "torch"],
         "unknown architecture 'resnet5O'"),
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jpg").write_bytes(b"")
    cases.append((["train", str(flat), "--out", str(tmp_path / "o3")], "has no class folders"))
    other = tmp_path / "other_val"
    make_tree(str(other), per_class=(2, 2))
    os.rename(other / "class_01", other / "zebra")
    cases.append((["train", str(folders / "train"), "--val", str(other), "--out", str(tmp_path / "o4")],
                  "--val has other classes than the training data"))
    from fastprune.embeddings import Embeddings

    Embeddings.from_arrays(torch.rand(5, 8), torch.rand(3, 8), meta={"fingerprint": "abc", "N": 5}).save(tmp_path / "e")
    cases.append((["train", str(folders / "train"), "--embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "o5")],
                  "were computed for another dataset"))
    import re

    for args, pattern in cases:
        rc, err = run_cli(args, capsys)
        assert rc == 2, args
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("scanning")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), err
        assert "Traceback" not in err


def test_demo_fast_mode(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastprune", "demo", "--epochs", "2", "--out", str(tmp_path)],
                          env=USER_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "semantic consistency: proxy (no CLIP weights offline)" in out
    assert "| full data |" in out and "| fastprune (infobatch 0.7 + noise decisions) |" in out
    assert re.search(r"fastprune is (above|equal to|below) full data", out)
    assert (tmp_path / "fastprune" / "kept_and_accuracy.png").exists()
    for name in ("comparison.png", "comparison.md", "comparison.csv"):  # the two runs compared
        assert (tmp_path / "comparison" / name).is_file()
        assert name == "comparison.csv" or str(tmp_path / "comparison" / name) in out
    with open(tmp_path / "comparison" / "comparison.csv") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["full data", "fastprune"]
    truth = json.loads((tmp_path / "digits" / "truth.json").read_text())
    assert sum(t["true"] != t["given"] for t in truth.values()) == int(0.2 * len(truth))


def test_demo_pair_noise_and_seeds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastprune", "demo", "--epochs", "1", "--noise", "0.3:pair",
                           "--seeds", "2", "--out", str(tmp_path)], env=USER_ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 seeds" in proc.stdout and "30% pair label noise" in proc.stdout
    assert re.search(r"\| full data \| [0-9.]+% ± [0-9.]+% \|", proc.stdout)
    from fastprune.demo import PAIRS

    for seed in (0, 1):
        truth = json.loads((tmp_path / f"seed{seed}" / "digits" / "truth.json").read_text())
        flipped = [t for t in truth.values() if t["true"] != t["given"]]
        assert len(flipped) == int(0.3 * len(truth)) and all(PAIRS[t["true"]] == t["given"] for t in flipped)


@pytest.mark.parametrize("args,pattern", [(["--noise", "lots"], "--noise takes FRACTION"),
                                          (["--noise", "0.2:diagonal"], "its kind one of symmetric, pair"),
                                          (["--seeds", "0"], "seeds must be an integer >= 1"),
                                          (["--noise", "1.5"], r"noise must be in \[0, 1\)")])
def test_demo_bad_noise_arguments(tmp_path, capsys, args, pattern):
    rc, err = run_cli(["demo", "--out", str(tmp_path), *args], capsys)
    assert rc == 2 and re.search(pattern, err) and "Traceback" not in err


@pytest.mark.parametrize("args,pattern", [(["--epochs", "0"], "epochs must be an integer >= 1"),
                                          (["--workers", "-1"], "workers must be an integer >= 0"),
                                          (["--epochs", "1"], "was not made by fastprune demo")])
def test_demo_never_deletes_what_it_did_not_make(tmp_path, capsys, args, pattern):
    """A user's folder under --out that happens to share a name with the demo's survives, whatever the
    arguments: bad ones are refused before anything is touched, good ones meet a clear refusal."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("x")
    rc, err = run_cli(["demo", "--out", str(tmp_path), *args], capsys)
    assert rc == 2 and re.search(pattern, err) and "Traceback" not in err, err
    assert (tmp_path / "full" / "thesis.tex").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_demo_replaces_only_its_own_folders(tmp_path):
    from fastprune.demo import _fresh

    made = _fresh(tmp_path / "digits")
    (made / "old.png").write_text("from the last demo")
    _fresh(tmp_path / "digits")
    assert [p.name for p in made.iterdir()] == [".fastprune-demo"]
    (tmp_path / "empty").mkdir()
    _fresh(tmp_path / "empty")  # an empty folder loses nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a folder"):
        _fresh(tmp_path / "file")


@pytest.mark.parametrize("script", ["plain_pytorch.py", "dali_loop.py"])
def test_examples_run(folders, script):
    if script == "dali_loop.py":
        pytest.importorskip("nvidia.dali")
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / script
    extra = ["--workers", "0"] if script == "plain_pytorch.py" else []
    proc = subprocess.run([sys.executable, str(path), str(folders / "train"), "--epochs", "2", "--batch-size", "16",
                           "--image-size", "64", "--arch", "resnet18", *extra], env=USER_ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1: trained" in proc.stdout


def test_demo_with_clip_tables(tmp_path):
    """--clip DIR uses given embedding tables (here stand-ins built for the rendered folder) and says so."""
    from fastprune.data import ImageFolderIndex
    from fastprune.demo import render_digits
    from fastprune.embeddings import Embeddings

    render_digits(tmp_path / "ref")  # the same split the demo renders (seed 0), outside its --out
    index = ImageFolderIndex(tmp_path / "ref" / "train", cache_dir=False)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(10, 12, generator=g)
    image = text[index.labels] + 0.3 * torch.randn(len(index), 12, generator=g)
    Embeddings.from_arrays(image, text, meta={"fingerprint": index.fingerprint}).save(tmp_path / "clip")
    proc = subprocess.run([sys.executable, "-m", "fastprune", "demo", "--epochs", "2", "--out", str(tmp_path / "run"),
                           "--clip", str(tmp_path / "clip")], env=USER_ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"semantic consistency: CLIP embeddings from {tmp_path / 'clip'}" in proc.stdout
