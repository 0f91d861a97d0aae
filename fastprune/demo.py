"""``fastprune demo``: full training vs. fastprune on real images with planted label noise, on a CPU.

scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with scikit-learn) are rendered as
an image folder; 20% of the training labels are flipped (the test split stays clean).  A small CNN
is trained twice through the real code path (index, loader, pruner): on everything, and with
fastprune (infobatch, keep 0.7, noise filter on).  No pretrained CLIP can be obtained offline, so
unless ``--clip DIR`` gives embeddings from ``fastprune embed``, the semantic consistency uses a
stated proxy: a small network trained on a separate clean held-out split embeds the images, and the
"text" embedding of each class is the mean held-out embedding of that class (its prototype).
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .compare import compare
from .data import ImageFolderIndex, TorchLoader
from .devices import resolve_device
from .embeddings import Embeddings
from .rundir import prepare_dir
from .train import SmallCNN, TrainConfig, train

NOISE = 0.2
NOISE_CAP = 0.5  # the fastprune run's noise_ratio: an upper bound, the decisions find the amount
SIZE = 32


# Pair noise: each digit flips to one fixed, visually close digit.
PAIRS = {0: 6, 1: 7, 2: 3, 3: 8, 4: 9, 5: 6, 6: 5, 7: 1, 8: 3, 9: 4}
NOISE_KINDS = ("symmetric", "pair")


def render_digits(root: Path, noise: float = NOISE, seed: int = 0, kind: str = "symmetric") -> dict:
    """Write train/heldout/test folders of 32x32 PNGs; flip ``noise`` of the training labels, each to a
    uniformly drawn other class (``symmetric``) or to its fixed close class (``pair``, see ``PAIRS``).

    Returns the truth: for each training file, its true and its given label.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}; got {kind!r}")
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    n = len(digits.target)
    perm = rng.permutation(n)
    n_test, n_held = int(0.25 * n), int(0.15 * n)
    splits = {"test": perm[:n_test], "heldout": perm[n_test:n_test + n_held], "train": perm[n_test + n_held:]}
    flip = set(rng.choice(splits["train"], size=int(noise * len(splits["train"])), replace=False).tolist())
    truth = {}
    for split, ids in splits.items():
        for i in ids.tolist():
            y = int(digits.target[i])
            given = y
            if i in flip:
                given = PAIRS[y] if kind == "pair" else (y + int(rng.integers(1, 10))) % 10
            folder = root / split / str(given)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            path = folder / f"digit_{i:04d}.png"
            Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.BILINEAR).save(path)
            if split == "train":
                truth[str(path)] = {"true": y, "given": given}
    (root / "truth.json").write_text(json.dumps(truth))
    return truth


def proxy_embeddings(root: Path, out: Path, epochs: int = 40, seed: int = 0, log=print) -> Embeddings:
    """The demo's stand-in for CLIP: features of a small network trained on the clean held-out split."""
    held = ImageFolderIndex(root / "heldout", progress=False)
    train_index = ImageFolderIndex(root / "train", progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(10, width=16)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        loader = TorchLoader(held, None, batch_size=64, train=True, num_workers=0, image_size=SIZE,
                             random_area=(0.7, 1.0), hflip=False)
        for _ in range(epochs):
            net.train()
            for x, y, _ in loader:
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()

    def embed(index):
        feats = torch.zeros(len(index), net.head.in_features)
        with torch.no_grad():
            for x, _, idx in TorchLoader(index, None, batch_size=256, train=False, num_workers=0, image_size=SIZE):
                feats[idx] = F.normalize(net.features(x), dim=1)
        return feats

    held_feats = embed(held)
    prototypes = torch.stack([held_feats[held.labels == c].mean(0) for c in range(10)])
    emb = Embeddings.from_arrays(embed(train_index), prototypes,
                                 meta={"model": "demo proxy: SmallCNN trained on the clean held-out split",
                                       "pretrained": None, **train_index.identity(),
                                       "classes": train_index.classes})
    emb.save(out)
    return emb


def run(epochs: int = 15, out: str | None = None, clip: str | None = None, device: str | None = None,
        workers: int = 2, noise: float = NOISE, kind: str = "symmetric", seeds: int = 1, log=print) -> list[dict]:
    """Render the data, build the consistency tables, train twice per seed, print and return the comparison.

    Every argument and the output folder are checked before the first image is rendered.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if clip and seeds > 1:
        raise ValueError("--clip embeds one rendered split; use it with --seeds 1")
    if not 0.0 <= noise < 1.0 or kind not in NOISE_KINDS:
        raise ValueError(f"noise must be in [0, 1) and its kind one of {', '.join(NOISE_KINDS)}; "
                         f"got {noise!r} ({kind!r})")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    resolve_device(device, "device")  # the runs resolve it again; a device this machine lacks fails here
    t_start = time.perf_counter()
    out = prepare_dir(out, "--out") if out else Path(tempfile.mkdtemp(prefix="fastprune-demo-"))
    homes = [out / f"seed{seed}" if seeds > 1 else out for seed in range(seeds)]
    for home in homes:  # every folder is checked before any is replaced
        for name in _OWNED_FOLDERS:
            _check_owned(home / name)
    runs = []
    for seed, home in enumerate(homes):
        runs += _one_seed(home, seed, epochs, clip, device, workers, noise, kind, log)
    log(f"\nResults ({epochs} epochs each, {seeds} seed{'s' if seeds > 1 else ''}, "
        f"{torch.get_num_threads()} CPU threads; {noise:.0%} {kind} label noise; consistency: "
        f"{'CLIP' if clip else 'proxy, see above'})")
    log("| run | test accuracy | wall time | sample visits | suspected noisy (precision / recall vs planted) |")
    log("|---|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        acc = [r["final_top1"] for r in rs]
        spread = f" ± {statistics.stdev(acc):.2%}" if len(acc) > 1 else ""
        noisy = "-" if name == "full data" else (
            f"{statistics.mean(r['flagged'] for r in rs):.0f} ({statistics.mean(r['precision'] for r in rs):.0%} / "
            f"{statistics.mean(r['recall'] for r in rs):.0%})")
        log(f"| {name} | {statistics.mean(acc):.2%}{spread} | {statistics.mean(r['total_seconds'] for r in rs):.1f} s "
            f"| {statistics.mean(r['samples_trained'] for r in rs):.0f} "
            f"({statistics.mean(1 - r['visits_saved'] for r in rs):.0%} of full) | {noisy} |")
    full, pruned = ([statistics.mean(r["final_top1"] for r in runs if r["name"] == n)
                     for n in ("full data", FASTPRUNE)])
    verdict = "above" if pruned > full else ("equal to" if pruned == full else "below")
    log(f"\nfastprune is {verdict} full data ({pruned:.2%} vs {full:.2%}).")
    log(f"plots, the mislabeled-sample gallery and suspected_noisy.csv: {runs[1]['out']}")
    log("the two runs compared (accuracy against sample visits and time; table with speed-up): "
        + ", ".join(str(home / "comparison" / name) for home in homes for name in ("comparison.png", "comparison.md")))
    log(f"total {time.perf_counter() - t_start:.0f} s")
    return runs


FASTPRUNE = "fastprune (infobatch 0.7 + noise decisions)"
_OWNED_FOLDERS = ("digits", "proxy-embeddings", "full", "fastprune", "comparison")  # what the demo writes in its --out
_MARK = ".fastprune-demo"  # in every folder the demo made: the proof that a later demo may replace it


def _check_owned(folder: Path) -> None:
    """Refuse a folder that exists, is not empty and was not made by the demo: it is the user's."""
    if folder.is_dir() and any(folder.iterdir()) and not (folder / _MARK).is_file():
        raise FileExistsError(f"{folder} exists and was not made by fastprune demo; it is left as it is: "
                              "choose another --out, or move the folder away")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder; choose another --out")


def _fresh(folder: Path) -> Path:
    """An empty folder the demo owns: one a previous demo made is replaced; anything else is refused."""
    _check_owned(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / _MARK).write_text("made by fastprune demo: a new demo with the same --out replaces this folder\n")
    return folder


def _one_seed(out: Path, seed: int, epochs: int, clip, device, workers, noise: float, kind: str, log) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    data = _fresh(out / "digits")
    truth = render_digits(data, noise=noise, seed=seed, kind=kind)
    planted = {p for p, t in truth.items() if t["true"] != t["given"]}
    log(f"data (seed {seed}): scikit-learn digits as {SIZE}x{SIZE} PNGs in {data}: {len(truth)} train images "
        f"({len(planted)} labels flipped, {noise:.0%} {kind}), a clean held-out split and a clean test split")
    if clip:
        emb_dir, source = clip, f"CLIP embeddings from {clip}"
    else:
        emb_dir = _fresh(out / "proxy-embeddings")
        proxy_embeddings(data, emb_dir, seed=seed, log=log)
        source = ("proxy (no CLIP weights offline): a small CNN trained on the clean held-out split embeds the "
                  "images; class prototypes (mean held-out embedding per class) stand in for the text side")
    log(f"semantic consistency: {source}")
    runs = []
    for name, kw in (("full data", {"policy": "full", "noise_ratio": 0.0, "embeddings": None}),
                     (FASTPRUNE, {"policy": "infobatch", "keep_ratio": 0.7, "noise_ratio": NOISE_CAP,
                                  "embeddings": str(emb_dir)})):
        log(f"\n== {name} (seed {seed})")
        run_dir = _fresh(out / name.split()[0])
        cfg = TrainConfig(data=str(data / "train"), val=str(data / "test"), out=str(run_dir),
                          arch="smallcnn", epochs=epochs, batch_size=64, lr=0.05, weight_decay=5e-4,
                          schedule="cosine", lr_warmup=0.05, image_size=SIZE, workers=workers, device=device,
                          crop_area=(0.6, 1.0), hflip=False, warmup=1, anneal=0.15, seed=seed, **kw)
        summary = train(cfg, log=log, progress=False)
        with open(Path(cfg.out) / "suspected_noisy.csv") as f:
            flagged = {row["path"] for row in csv.DictReader(f)}
        summary.update(name=name, out=cfg.out, precision=len(flagged & planted) / max(len(flagged), 1),
                       recall=len(flagged & planted) / max(len(planted), 1), flagged=len(flagged))
        runs.append(summary)
    compare([r["out"] for r in runs], out=_fresh(out / "comparison"), names=["full data", "fastprune"],
            log=lambda *_: None)
    return runs
