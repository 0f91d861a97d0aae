"""A run's report from real tiny runs: the mislabeled-sample gallery, the histograms, `fastprune report RUN`,
`fastprune compare`, and one-line errors for bad input."""

import csv
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import run_cli

from fastprune import cli
from fastprune.gallery import CONTRAST_PNG, SUSPECTED_PNG, least_suspected, most_suspected
from fastprune.noise import DOWNWEIGHT, EXCLUDE, KEEP, RELABEL
from fastprune.sample_table import SAMPLES_FILE, SELECTION_FILE, KEPT, PRUNED, SampleTable, SelectionRecord

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
PER_CLASS, FLIPPED = 24, 4  # per class; the last FLIPPED images of each class carry the next class's colour


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three classes of flat-coloured 16x16 images, FLIPPED of each class painted in the next class's colour
    (a planted wrong label), a clean validation split, and CLIP-like tables that know the true colours."""
    from fastprune.data import ImageFolderIndex
    from fastprune.embeddings import Embeddings

    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("val", 6)):
        for c in range(3):
            (root / split / f"colour_{c}").mkdir(parents=True)
            for k in range(count):
                true = (c + 1) % 3 if split == "train" and k >= count - FLIPPED else c
                pixels = np.clip(np.array(COLOURS[true]) + rng.normal(0, 12, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"colour_{c}" / f"img{k:02d}.png")
    index = ImageFolderIndex(root / "train", cache_dir=False)
    true = np.array([(int(y) + 1) % 3 if int(p.split("img")[-1][:2]) >= PER_CLASS - FLIPPED else int(y)
                     for p, y in zip(index.files, index.labels)])
    g = torch.Generator().manual_seed(0)
    text = torch.randn(3, 16, generator=g)
    image = text[torch.from_numpy(true)] + 0.3 * torch.randn(len(index), 16, generator=g)
    Embeddings.from_arrays(image, text, meta={"fingerprint": index.fingerprint}).save(root / "emb")
    return root


def planted_args(root, out, *extra, embeddings=True):
    return [str(root / "train"), "--val", str(root / "val"), "--out", str(out), "--arch", "smallcnn", "--epochs", "5",
            "--batch-size", "8", "--image-size", "16", "--workers", "0", "--lr", "0.05", "--loader", "torch",
            "--no-progress", "--keep-ratio", "0.6", "--anneal", "0.2", "--noise-ratio", "0.3", "--noise-start", "2",
            *(["--embeddings", str(root / "emb")] if embeddings else []), *extra]


def train_quickly(args):
    """``fastprune train`` with the pruner's plain-PyTorch path (the kernels' interpreter is not under test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        assert cli.main(["train", *args]) == 0


@pytest.fixture(scope="module")
def noisy_run(planted, tmp_path_factory):
    """A finished pruned run with noise decisions (the model's and CLIP's evidence)."""
    out = tmp_path_factory.mktemp("runs") / "pruned"
    train_quickly(planted_args(planted, out))
    return out


@pytest.fixture(scope="module")
def full_run(planted, tmp_path_factory):
    """A finished full-data run without noise decisions or embeddings."""
    out = tmp_path_factory.mktemp("runs") / "full"
    train_quickly(planted_args(planted, out, "--policy", "full", "--noise-ratio", "0", embeddings=False))
    return out


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_png(path, min_width=600, min_height=250):
    with Image.open(path) as im:
        im.verify()  # a whole, valid PNG
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_width and im.size[1] >= min_height, (path, im.size)


def table_of(**columns) -> SampleTable:
    n = len(columns["label"])
    base = {"action": np.zeros(n, np.int8), "belief": np.zeros(n, np.float32), "suggested": np.full(n, -1, np.int32),
            "model_margin": np.ones(n, np.float32), "model_pred": np.asarray(columns["label"], np.int32),
            "clip_margin": np.full(n, np.nan, np.float32), "clip_pred": np.full(n, -1, np.int32),
            "score": np.ones(n, np.float32), "consistency": np.zeros(n, np.float32), "visits": np.ones(n, np.int64)}
    base.update({k: np.asarray(v) for k, v in columns.items()})
    return SampleTable(classes=["a", "b", "c"], root="", files=[], noise_decisions=True, **base)


def test_gallery_picks_the_flagged_with_the_highest_beliefs_and_unflagged_of_their_classes():
    t = table_of(label=[0, 0, 1, 1, 2, 0, 1, 0, 1, 2],
                 action=[KEEP, EXCLUDE, DOWNWEIGHT, KEEP, RELABEL, KEEP, KEEP, KEEP, EXCLUDE, KEEP],
                 belief=[0.7, 0.95, 0.6, 0.0, 0.95, 0.0, 0.2, 0.0, 0.99, 0.0],  # 0: above 0.5 but kept (a cap)
                 model_margin=[-1, -0.5, -0.2, 2.0, -3.0, 0.5, 1.0, 3.0, -1.0, 0.1])
    assert most_suspected(t, 10).tolist() == [8, 4, 1, 2]  # flagged only; equal beliefs: the margin further away
    assert most_suspected(t, 2).tolist() == [8, 4]
    assert most_suspected(t, 0).tolist() == []
    chosen = most_suspected(t, 10)
    # per suspect, an unflagged sample of its class: lowest belief, then the highest margin; each once
    assert least_suspected(t, chosen).tolist() == [3, 9, 7, 6]
    assert least_suspected(t, np.array([1, 1, 1, 1])).tolist() == [7, 5, 0, -1]  # class 0 runs out


def test_a_run_writes_the_gallery_histograms_and_what_report_needs(noisy_run, capsys):
    table = SampleTable.load(noisy_run / SAMPLES_FILE)
    with open(noisy_run / "suspected_noisy.csv") as f:
        rows = list(csv.DictReader(f))
    flagged = np.flatnonzero(table.flagged)
    assert len(flagged) >= 6, "the planted labels are found"
    assert sorted(int(r["index"]) for r in rows) == flagged.tolist()
    assert table.classes == ["colour_0", "colour_1", "colour_2"]
    assert not any(os.path.isabs(f) for f in table.files) and all(os.path.isfile(p) for p in table.paths())
    shown = most_suspected(table, 5)
    assert len(shown) == 5 and table.flagged[shown].all()
    rest = np.setdiff1d(flagged, shown)
    assert table.belief[shown].min() >= table.belief[rest].max()  # exactly the highest beliefs
    assert np.all(np.diff(table.belief[shown]) <= 0)  # most suspected first
    contrast = least_suspected(table, shown)
    assert (table.label[contrast] == table.label[shown]).all() and not table.flagged[contrast].any()
    for png in (SUSPECTED_PNG, CONTRAST_PNG, "score_consistency_hist.png", "suspected_noisy.png",
                "kept_and_accuracy.png"):
        assert_png(noisy_run / png)
    rows = -(-min(24, len(flagged)) // 6)  # 24 cells at most, 6 a row
    with Image.open(noisy_run / SUSPECTED_PNG) as im:  # each cell large enough to read
        assert im.size[0] > 1400 and rows * 250 < im.size[1] < rows * 300 + 150
    # the histograms show the last selection that pruned, with its threshold
    sel = SelectionRecord.load(noisy_run / SELECTION_FILE)
    log = read_log(noisy_run)
    assert sel.policy == "infobatch" and sel.epoch == max(r["epoch"] for r in log if r["policy"] == "infobatch")
    assert int(sel.kept.sum()) == log[sel.epoch]["samples_trained"]
    eligible = sel.seen & (sel.action != EXCLUDE)
    assert sel.threshold == pytest.approx(float(sel.priority[eligible].mean()), rel=1e-5)
    status = sel.status
    assert (status == PRUNED).sum() == (~sel.kept & (sel.action == KEEP)).sum() > 0
    assert (status == KEPT).sum() > 0


def test_report_remakes_the_report_from_the_run_folder(noisy_run, tmp_path, capsys):
    out = tmp_path / "again"
    assert cli.main(["report", str(noisy_run), "--out", str(out), "--count", "4"]) == 0
    printed = capsys.readouterr().out
    for png in (SUSPECTED_PNG, CONTRAST_PNG, "score_consistency_hist.png", "suspected_noisy.png",
                "kept_and_accuracy.png"):
        assert_png(out / png, min_width=500)
        assert str(out / png) in printed
    with Image.open(out / SUSPECTED_PNG) as im:  # 4 cells: one row
        assert im.size[1] < 600
    # the images have moved: --data points at them; a wrong place gives blank cells and a note, not a crash
    assert cli.main(["report", str(noisy_run), "--out", str(out), "--data", str(tmp_path)]) == 0
    assert f"could not be read under {str(tmp_path)!r} (shown blank)" in capsys.readouterr().out


def test_a_run_without_noise_decisions_skips_the_gallery_with_a_note(full_run, tmp_path, capsys):
    assert not (full_run / SUSPECTED_PNG).exists()
    assert cli.main(["report", str(full_run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "gallery skipped: the run made no noise decisions (--noise-ratio 0)" in printed
    assert not (tmp_path / SUSPECTED_PNG).exists()
    for png in ("score_consistency_hist.png", "suspected_noisy.png", "kept_and_accuracy.png"):
        assert_png(tmp_path / png)
    assert SelectionRecord.load(full_run / SELECTION_FILE).policy == "full"  # nothing pruned: its last epoch


def test_compare_reads_the_runs_records(noisy_run, full_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", str(full_run), str(noisy_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert_png(out / "comparison.png")
    with open(out / "comparison.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"full", "pruned"}
    seconds = {}
    for name, run in (("full", full_run), ("pruned", noisy_run)):
        log, summary, row = read_log(run), json.loads((run / "summary.json").read_text()), rows[name]
        seconds[name] = sum(r["epoch_seconds"] + r["select_seconds"] for r in log)
        assert float(row["final_top1"]) == pytest.approx(log[-1]["val_top1"])
        assert int(row["sample_visits"]) == sum(r["samples_trained"] for r in log)
        assert float(row["seconds"]) == pytest.approx(seconds[name], abs=1e-3)
        assert int(row["suspected_noisy"]) == summary["suspected_noisy"]
        assert int(row["epochs"]) == 5
    assert rows["full"]["reference"] == "True" and rows["full"]["setting"] == "full data"
    assert rows["pruned"]["setting"] == "infobatch keep 0.6, noise decisions ≤ 0.3"
    assert float(rows["pruned"]["speedup_vs_reference"]) == pytest.approx(seconds["full"] / seconds["pruned"],
                                                                          rel=1e-6)
    assert float(rows["pruned"]["visits_vs_reference"]) < 1.0
    assert rows["full"]["final_top5"] == ""  # three classes: no top-5
    md = (out / "comparison.md").read_text()
    assert md.splitlines()[0].startswith("| run | setting |") and "speed-up vs full" in md
    assert md.strip() in printed


def test_bad_input_gives_one_line_errors(noisy_run, planted, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "log.jsonl").write_text((noisy_run / "log.jsonl").read_text())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("log.jsonl", "summary.json"):
        (damaged / name).write_text((noisy_run / name).read_text())
    (damaged / SAMPLES_FILE).write_bytes(b"not a table")
    taken = tmp_path / "taken"
    taken.write_text("a user's file")
    broken_log = tmp_path / "broken_log"
    broken_log.mkdir()
    (broken_log / "log.jsonl").write_text('{"epoch": 0, "samples_trained": 3}\n{"epoch": 1, "samp')
    cases = [(["report", str(tmp_path / "missing")], r"run folder '.*missing' does not exist"),
             (["report", str(planted)], r"is not a fastprune run folder: it has no log.jsonl"),
             (["report", str(unfinished)], r"has no samples.npz: the run has not finished"),
             (["report", str(damaged)], r"cannot read '.*samples.npz' \(the run's per-sample table\)"),
             (["report", str(noisy_run), "--count", "0"], r"--count must be an integer >= 1, got 0"),
             (["report", str(noisy_run), "--data", str(tmp_path / "nowhere")], r"--data '.*nowhere' is not a folder"),
             (["compare", str(noisy_run), str(tmp_path / "empty")], r"'.*empty' is not a fastprune run folder"),
             (["compare", str(noisy_run), str(broken_log)], r"log.jsonl' line 2 is not JSON: the file is damaged"),
             (["compare", str(noisy_run), "--names", "a", "b"], r"--names gives 2 names for 1 runs"),
             (["compare", str(noisy_run), "--out", str(taken)], r"--out '.*taken' is a file, not a folder"),
             (["report", str(noisy_run), "--out", str(taken)], r"--out '.*taken' is a file, not a folder")]
    for args, pattern in cases:
        rc, err = run_cli(args, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and re.search(pattern, lines[0]), (args, err)
    assert not (tmp_path / "comparison.png").exists() and taken.read_text() == "a user's file"


def test_the_pruner_keeps_its_latest_priorities_and_beliefs_for_reports(reference_path):
    from fastprune import DynamicPruner

    def make():
        return DynamicPruner(40, 3, epochs=4, noise_ratio=0.3, noise_start=1, seed=0)

    p = make()
    assert p.decision_belief is None  # no decision before noise_start
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 3
    logits = torch.randn(40, 3, generator=g) + 4 * torch.nn.functional.one_hot(labels, 3)
    logits[:6] = 4 * torch.nn.functional.one_hot((labels[:6] + 1) % 3, 3).float()  # six prefer another class
    p.step(logits, labels, torch.arange(40))
    p.next_epoch()
    assert torch.equal(p.selection_priority, p.scores)  # no embeddings: the priority is the score
    acted = p.noise_actions != KEEP
    assert p.decision_belief.shape == (40,) and torch.equal(p.decision_belief[acted], p.noise_belief[acted])
    q = make()
    q.load_state_dict(p.state_dict())
    assert q.selection_priority is None and q.decision_belief is None  # known again at the next selection
    table = SampleTable.from_pruner(p)
    assert np.array_equal(table.belief, p.decision_belief.numpy()) and table.noise_decisions
