"""Loader throughput: DaliLoader vs. torchvision ImageFolder + DataLoader (PIL) over the same selection.

    python -m benchmarks.bench_loader [--smoke] [--size N] [--workers W] [--write] [--max-seconds S]

Generates an ImageNet-like JPEG folder (about 500x375, quality 90) once, then for keep ratios
1.0, 0.7 and 0.5 measures one training epoch of each loader over the same random selection
(a real DynamicPruner with policy="random"): images/s, epoch time, and the stall at the epoch
boundary (time from starting the epoch to its first batch).  Epoch time should follow the kept
fraction: only selected files are read and decoded.  Without DALI installed, the torchvision DataLoader
is measured alone and the table says so.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import fastprune as fp
from fastprune.data import DaliLoader, ImageFileDataset, ImageFolderIndex, IndexedDataset

from .goals import prose
from .report import (TimeBudget, add_max_seconds, add_write_flags, check_output_file, describe, machine, publishing,
                     table, write_json, write_section)

IMAGES_PER_PROCESS = 200  # below this, another process costs more than it saves


def make_dataset(root: Path, size: int, classes: int = 10, seed: int = 0) -> Path:
    """ImageNet-like JPEGs (smooth content, ~500x375, quality 90); reused when already there.

    Written by up to one process per core (about 7 ms an image on one); image i depends only on (seed, i).
    """
    done = root / f".complete-{size}"
    if done.exists():
        return root
    for c in range(min(classes, size)):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    procs = max(1, min(os.cpu_count() or 1, size // IMAGES_PER_PROCESS))
    if procs == 1:
        _write_images(root, range(size), classes, seed)
    else:  # fork: the children need only numpy and PIL, and start at once
        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_images, [root] * procs, [range(k, size, procs) for k in range(procs)],
                          [classes] * procs, [seed] * procs))
    done.touch()
    return root


def _write_images(root: Path, ids: range, classes: int, seed: int) -> None:
    from PIL import Image

    for i in ids:
        rng = np.random.default_rng([seed, i])
        w, h = (500, 375) if i % 3 else (375, 500)
        low = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)  # smooth, photo-like
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 12, (h, w, 3), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        img.save(root / f"n{i % classes:08d}" / f"img_{i:07d}.JPEG", quality=90)


def have_dali() -> bool:
    try:
        from fastprune.data.dali import require_dali

        require_dali()
    except ImportError:
        return False
    return True


def selection(n: int, num_classes: int, keep: float, seed: int = 0) -> fp.DynamicPruner:
    """A pruner whose current epoch is a random subset of ``keep * n`` samples."""
    pruner = fp.DynamicPruner(n, num_classes, epochs=3, keep_ratio=keep, policy="random" if keep < 1 else "full",
                              warmup=1, anneal=0.0, seed=seed, device="cpu")
    with torch.no_grad():
        idx = torch.arange(n)
        pruner.step(torch.zeros(n, num_classes), idx % num_classes, idx)  # every sample seen once
    pruner.next_epoch()
    return pruner


def time_epoch(loader, device) -> tuple[float, float, int]:
    """(epoch seconds, seconds to the first batch, images)."""
    t0 = time.perf_counter()
    first = None
    count = 0
    for x, _y, _idx in loader:
        if first is None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, first or 0.0, count


def run(args, budget: TimeBudget) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    root = make_dataset(Path(args.data), args.size)
    index = ImageFolderIndex(root, progress=False)
    dali = have_dali()
    rows = []
    for keep in (1.0, 0.7, 0.5):
        pruner = selection(len(index), index.num_classes, keep)
        kept = pruner.epoch_indices.numel()
        loaders = {
            "DaliLoader": lambda p=pruner: DaliLoader(index, p, batch_size=args.batch_size, device=device,
                                                      num_threads=args.workers, image_size=args.image_size),
            "torchvision DataLoader (PIL)": lambda p=pruner: torch.utils.data.DataLoader(
                IndexedDataset(ImageFileDataset(index, train=True, image_size=args.image_size)),
                batch_size=args.batch_size, sampler=p.sampler(), num_workers=args.workers,
                persistent_workers=args.workers > 0),
        }
        if not dali:
            del loaders["DaliLoader"]
        for name, make in loaders.items():
            if not budget.allows(f"{name} keep {keep}"):
                continue
            loader = make()
            times, stalls = [], []
            for r in range(args.repeats + 1):  # the first epoch warms caches and workers
                sec, stall, count = time_epoch(loader, device)
                assert count == kept, (name, count, kept)
                if r:
                    times.append(sec)
                    stalls.append(stall)
            med = statistics.median(times)
            rows.append({"loader": name, "keep": keep, "images": kept, "epoch_s": med,
                         "images_per_s": kept / med, "first_batch_s": statistics.median(stalls)})
            print(f"  {name:30s} keep={keep:.1f}: {kept / med:8.1f} img/s, epoch {med:.3f} s", file=sys.stderr)
    return rows


def render(rows: list[dict], info: dict, args, budget_note: str = "") -> str:
    base = {(r["keep"]): r for r in rows if r["loader"].startswith("torchvision")}
    full = {r["loader"]: r["epoch_s"] for r in rows if r["keep"] == 1.0}
    out = []
    for r in rows:
        out.append([r["loader"], f"{r['keep']:.1f}", r["images"], f"{r['images_per_s']:.1f}",
                    f"{r['epoch_s']:.3f}", f"{r['epoch_s'] / full[r['loader']]:.2f}",
                    f"{r['images_per_s'] / base[r['keep']]['images_per_s']:.2f}x" if r["keep"] in base else "-",
                    f"{r['first_batch_s'] * 1000:.0f}"])
    if not any(r["loader"] == "DaliLoader" for r in rows):
        decode = "DALI is not installed: the torchvision DataLoader (PIL, CPU decode) was measured alone"
    elif info["device"] == "cpu" or args.cpu:
        decode = "CPU decode: CPU figures"
    else:
        decode = "GPU (mixed) decode"
    mode = f"smoke run, {decode}" if args.smoke else decode
    head = (f"### Loader throughput — {describe(info)}\n\n{args.size} JPEGs ~500x375 q90, {args.image_size}px "
            f"train crops, batch {args.batch_size}, {args.workers} worker threads/processes each, median of "
            f"{args.repeats} epochs; {mode}. {prose('loader')}{budget_note}\n\n")
    return head + table(["loader", "keep", "images", "images/s", "epoch s", "epoch / keep-1.0 epoch",
                         "vs torchvision", "first batch ms"], out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run for CPU machines and CI")
    ap.add_argument("--size", type=int, default=None, help="number of images (default 3000; smoke 120)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--data", default=None, help="where to generate the images")
    ap.add_argument("--cpu", action="store_true", help="measure the CPU pipeline even with a GPU")
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    add_write_flags(ap)
    add_max_seconds(ap)
    args = ap.parse_args(argv)
    check_output_file(ap, args.out, "--out", "loader.json")
    args.size = args.size or (120 if args.smoke else 3000)
    args.batch_size = args.batch_size or (16 if args.smoke else 128)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.data = args.data or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastprune-bench-jpegs-{args.size}")
    return args


def produce(args, info) -> tuple[list[dict], str, str]:
    budget = TimeBudget(args.max_seconds)
    rows = run(args, budget)
    records = [{"bench": "loader", "method": r["loader"], "dtype": "float32",
                "sizes": {"N": args.size, "keep": r["keep"], "batch": args.batch_size},
                "median_us": r["epoch_s"] * 1e6, "iqr_us": 0.0, **r} for r in rows]
    section = f"loader-{'cpu' if info['device'] == 'cpu' or args.cpu else info['device']}"
    return records, render(rows, info, args, budget.note()), section


def main(argv=None) -> int:
    args = parse_args(argv)
    write = publishing(args)
    info = machine()
    records, text, section = produce(args, info)
    print(text)
    if args.out:
        write_json(args.out, {"machine": info, "records": records})
    if write:
        write_section(section, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
