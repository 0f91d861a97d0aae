"""End to end: epoch time at keep 1.0, 0.7 and 0.5, with the time split by where it goes.

    python -m benchmarks.bench_epoch [--smoke] [--repeats 3] [--write] [--max-seconds S]

The epoch time is the median of ``--repeats`` pruned epochs after a warm-up epoch on every sample.

ResNet-50 at 224 px on a GPU (bf16 autocast, channels_last), SmallCNN at 32 px on a CPU, over a generated
ImageNet-like JPEG folder, fed by DaliLoader when DALI is installed (else the DataLoader fallback).  The
split: loader wait (time blocked on the next batch), forward+backward+optimiser, and the pruner (its step
and the epoch's selection); on a GPU each part ends with a synchronisation so the split is attributable,
which removes some overlap — the wall time column is measured separately without those syncs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

import fastprune as fp
from fastprune.data import ImageFolderIndex
from fastprune.train import TrainConfig, build_model, make_loader

from .bench_loader import make_dataset
from .goals import prose
from .report import TimeBudget, base_parser, cli_main, describe, table


def one_epoch(model, opt, pruner, loader, device, split: bool) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t = {"loader": 0.0, "compute": 0.0, "pruner": 0.0}
    n = 0
    sync()
    t_start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, y, idx = next(it)
        except StopIteration:
            break
        if split:
            sync()
        t1 = time.perf_counter()
        with autocast:
            logits = model(x)
        if split:
            sync()
        t2 = time.perf_counter()
        loss = pruner.step(logits, y, idx)
        if split:
            sync()
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if split:
            sync()
        t4 = time.perf_counter()
        t["loader"] += t1 - t0
        t["compute"] += (t2 - t1) + (t4 - t3)
        t["pruner"] += t3 - t2
        n += idx.numel()
    t0 = time.perf_counter()
    pruner.next_epoch()
    t["pruner"] += time.perf_counter() - t0
    sync()
    t["wall"] = time.perf_counter() - t_start
    t["images"] = n
    return t


def run(args, budget: TimeBudget) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    root = make_dataset(Path(args.data), args.size)
    index = ImageFolderIndex(root, progress=False)
    records = []
    for keep in (1.0, 0.7, 0.5):  # keep 1.0 first: the others are compared with it
        if not budget.allows(f"keep {keep}"):
            continue
        torch.manual_seed(0)
        model = build_model(args.arch, index.num_classes).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        policy = "random" if keep < 1 else "full"
        pruner = fp.DynamicPruner(len(index), index.num_classes, epochs=max(10, args.repeats + 3), keep_ratio=keep,
                                  policy=policy, warmup=1, anneal=0.0, device=device, seed=0)
        cfg = TrainConfig(data=str(root), batch_size=args.batch_size, workers=args.workers,
                          image_size=args.image_size)
        loader, name = make_loader("auto", index, pruner, cfg, True, device)
        one_epoch(model, opt, pruner, loader, device, split=False)  # warm-up epoch: every sample, caches
        # the pruned epochs (same keep, the same number of images each), then one more with split timing
        walls = [one_epoch(model, opt, pruner, loader, device, split=False) for _ in range(args.repeats)]
        parts = one_epoch(model, opt, pruner, loader, device, split=True)
        secs = [w["wall"] for w in walls]
        q = statistics.quantiles(secs, n=4) if len(secs) > 1 else [secs[0]] * 3
        med, images = statistics.median(secs), walls[0]["images"]
        records.append({"bench": "epoch", "method": f"{args.arch} + {name}", "dtype": "bf16" if device.type == "cuda"
                        else "float32", "sizes": {"N": len(index), "keep": keep, "batch": args.batch_size},
                        "median_us": med * 1e6, "iqr_us": (q[2] - q[0]) * 1e6, "epochs_timed": len(secs),
                        "images": images, "images_per_s": images / med,
                        "split_s": {k: parts[k] for k in ("loader", "compute", "pruner")}})
        print(f"  keep={keep}: {images} images in {med:.2f} s (median of {len(secs)} epochs)", file=sys.stderr)
    full = records[0]["median_us"]
    for r in records:
        r["ratio_to_full"] = r["median_us"] / full
    return records


def render(records, info, args, budget_note: str = "") -> str:
    rows = []
    for r in records:
        sp = r["split_s"]
        total = sum(sp.values())
        rows.append([f"{r['sizes']['keep']:.1f}", r["images"], f"{r['median_us'] / 1e6:.2f}",
                     f"{r['iqr_us'] / 1e6:.2f}",
                     f"{r['ratio_to_full']:.2f}", f"{r['images_per_s']:.0f}",
                     " / ".join(f"{100 * sp[k] / total:.0f}%" for k in ("loader", "compute", "pruner"))])
    mode = ("smoke run, " if args.smoke else "") + ("CPU figures" if info["device"] == "cpu" else "GPU figures")
    head = (f"### Epoch time — {describe(info)}\n\n{records[0]['method']}, {args.size} generated JPEGs, "
            f"{args.image_size} px, batch {args.batch_size} ({mode}); epoch time: median of {args.repeats} epochs "
            "after a warm-up epoch; the split comes from one more epoch with a synchronisation after each part. "
            f"{prose('epoch')}{budget_note}\n\n")
    return head + table(["keep", "images", "epoch s", "IQR s", "vs keep 1.0", "images/s",
                         "split loader / fwd-bwd-opt / pruner"], rows)


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--data", default=None)
    ap.add_argument("--repeats", type=int, default=None, help="pruned epochs timed per keep (default 3; smoke 1)")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    args.repeats = args.repeats or (1 if args.smoke else 3)
    gpu = torch.cuda.is_available() and not args.cpu
    args.size = args.size or (96 if args.smoke else (5000 if gpu else 1000))
    args.arch = args.arch or ("resnet50" if gpu else "smallcnn")
    args.image_size = args.image_size or (224 if gpu else 32)
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.data = args.data or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastprune-bench-jpegs-{args.size}")
    return args


def produce(args, info) -> tuple[list[dict], str, str]:
    budget = TimeBudget(args.max_seconds)
    records = run(args, budget)
    return records, render(records, info, args, budget.note()), f"epoch-{info['device']}"


def main(argv=None) -> int:
    return cli_main(parse_args, produce, argv)


if __name__ == "__main__":
    raise SystemExit(main())
