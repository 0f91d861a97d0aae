"""Epoch selection: ``next_epoch()`` over N scores against torch.topk / torch.sort and a NumPy host version.

    python -m benchmarks.bench_select [--smoke] [--write] [--max-seconds S] [--baseline DIR]

``next_epoch`` (infobatch with noise filter and consistency, the most work) includes the hand-over of the
index list to the host.  Baselines get the same scores: ``torch.topk`` of the kept count, ``torch.sort``
of all scores (each followed by the same host copy), and a NumPy implementation on the host
(``argpartition`` + permutation), whose time includes copying the scores to the host.  The shuffle alone
(70% kept, on the device) is timed against the stable sort of 62-bit keys it replaced and ``torch.randperm``.
``--baseline DIR`` also times ``next_epoch()`` of another fastprune checkout (a git worktree of an earlier
commit, say), each size in a subprocess that imports only that tree, with that tree's own benchmark pruner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import fastprune as fp

from .goals import prose
from .report import TimeBudget, base_parser, cli_main, describe, table
from .timing import measure, peak_extra_bytes


def sizes(smoke: bool, device: torch.device) -> list[int]:
    if smoke:
        return [10_000, 100_000]
    return [1_281_167, 10_000_000, 100_000_000] if device.type == "cuda" else [1_281_167, 10_000_000, 30_000_000]


def make_pruner(n: int, device, seed=0) -> fp.DynamicPruner:
    """A pruner mid-training: every sample seen, scores and consistency set, and both sources of evidence (the
    model's margins, CLIP's margins from per-batch embeddings) for every sample, over 1000 classes: the noise
    decisions fit and apply their mixtures to all N samples."""
    g = torch.Generator().manual_seed(seed)
    pruner = fp.DynamicPruner(n, 1000, epochs=10, keep_ratio=0.7, noise_ratio=0.05,
                              text_emb=torch.randn(1000, 8).to(device), device=device)
    state = pruner._state
    state.scores.copy_((torch.rand(n, generator=g) * 5).to(device))
    state.consistency.copy_((torch.randn(n, generator=g) * 0.1 + 0.3).to(device))
    state.visits.fill_(1)
    state.label.copy_(torch.randint(0, 1000, (n,), generator=g).to(device, state.label.dtype))
    state.margin_sum.copy_((torch.randn(n, generator=g) * 3 + 2).to(device))
    state.margin_count.fill_(1)
    pruner._evidence.clip_margin.copy_((torch.randn(n, generator=g) * 0.1 + 0.05).to(device))
    pruner._has_batch_consistency = True
    return pruner


def run(args, budget: TimeBudget) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    records = []
    for n in sizes(args.smoke, device):
        if not budget.allows(f"N={n:,}"):
            continue
        pruner = make_pruner(n, device)
        scores = pruner.scores.clone()
        k = int(0.7 * n)

        def next_epoch():
            pruner.epoch = 1  # the same epoch each time: the same work
            pruner.history = pruner.history[:1]
            return pruner.next_epoch()

        g = torch.Generator().manual_seed(1)
        keep = (torch.rand(n, generator=g) < 0.7).to(device)
        keys = torch.randint(0, 1 << 62, (n,), generator=g).to(device)
        cases = {
            "next_epoch": next_epoch,
            "torch.topk": lambda: torch.topk(scores, k).indices.cpu(),
            "torch.sort": lambda: torch.sort(scores).indices.cpu(),
            "numpy (host)": lambda: np.random.default_rng(0).permutation(
                np.argpartition(scores.cpu().numpy(), n - k)[n - k:]),
            # the shuffle alone, on the device: fastprune's against the sort of 62-bit keys it replaced, and a
            # permutation of N by torch's own generator
            "shuffle": lambda: fp.kernels.shuffle(keep, 7, 1),
            "sort of keys": lambda: torch.sort(keys, stable=True).indices,
            "torch.randperm": lambda: torch.randperm(n, device=device),
        }
        reps = 5 if args.smoke else 10
        timed = {name: measure(fn, device, reps=reps, warmup=2) for name, fn in cases.items()}
        timed["next_epoch"]["peak_extra_bytes"] = peak_extra_bytes(next_epoch, device)
        if args.baseline:
            timed[BASELINE] = {"median_us": baseline_us(args.baseline, n, device, reps), **describe_tree(args.baseline)}
        for name, t in timed.items():
            records.append({"bench": "select", "method": name, "dtype": "float32", "sizes": {"N": n}, **t,
                            "ratio_to_next_epoch": t["median_us"] / timed["next_epoch"]["median_us"]})
        print(f"  N={n}: " + ", ".join(f"{k_} {v['median_us'] / 1000:.2f} ms" for k_, v in timed.items()),
              file=sys.stderr)
    return records


BASELINE = "baseline next_epoch"

# Run by ``baseline_us`` in the other tree: that tree's fastprune and benchmarks only (an installed checkout's
# import hooks, which would map ``fastprune.kernels`` to this tree, are dropped first).
_BASELINE_SCRIPT = """
import json, statistics, sys, time
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, sys.argv[1])
import torch
from benchmarks.bench_select import make_pruner
n, device, reps = int(sys.argv[2]), torch.device(sys.argv[3]), int(sys.argv[4])
pruner = make_pruner(n, device)
def once():
    pruner.epoch = 1
    pruner.history = pruner.history[:1]
    pruner.next_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
times = []
for i in range(reps + 2):
    t = time.perf_counter()
    once()
    times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times[2:]) * 1e6))
"""


def baseline_us(tree: str, n: int, device: torch.device, reps: int) -> float:
    """Median microseconds of ``next_epoch()`` in the fastprune checkout ``tree`` (its own benchmark's pruner, N
    samples, after two warm-up calls), in a subprocess."""
    root = Path(tree).resolve()
    if not _is_checkout(root):
        raise SystemExit(f"--baseline: {tree} is not a fastprune checkout with benchmarks/bench_select.py")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # leave the other checkout as it was
    out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT, str(root), str(n), device.type, str(reps)],
                         cwd=root, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"--baseline: the run in {tree} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _is_checkout(root: Path) -> bool:
    return (root / "fastprune").is_dir() and (root / "benchmarks" / "bench_select.py").is_file()


def describe_tree(tree: str) -> dict:
    """The baseline checkout's path and commit (empty when it is not a git checkout)."""
    out = subprocess.run(["git", "-C", tree, "log", "-1", "--format=%h %cs"], capture_output=True, text=True)
    return {"tree": str(Path(tree).resolve()), "commit": out.stdout.strip() if out.returncode == 0 else ""}


def render(records, info, budget_note: str = "") -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for n in sorted({r["sizes"]["N"] for r in records}):
        by = {r["method"]: r for r in records if r["sizes"]["N"] == n}
        peak = by["next_epoch"].get("peak_extra_bytes")
        rows.append([f"{n:,}"] + [f"{by[m]['median_us'] / 1000:.2f}" for m in methods] +
                    [f"{by[m]['median_us'] / by['next_epoch']['median_us']:.2f}" for m in methods[1:]] +
                    ["-" if peak is None else f"{peak / 2**20:,.0f} ({peak / n:.0f} B/sample)"])
    headers = (["N"] + [f"{m} ms" for m in methods] + [f"{m} / next_epoch" for m in methods[1:]] +
               ["next_epoch peak memory MiB"])
    mode = "CPU figures" if info["device"] == "cpu" else "GPU figures"
    base = next((r for r in records if r["method"] == BASELINE), None)
    if base is not None:
        budget_note = (f" {BASELINE}: `next_epoch()` of the checkout {base['tree']} (commit {base['commit'] or '?'}) "
                       f"with its own benchmark's pruner, in a subprocess, after two warm-up calls." + budget_note)
    return (f"### Epoch selection — {describe(info)}\n\n`next_epoch()` = infobatch keep 0.7 with the noise filter "
            f"and consistency, both sources of evidence for every sample (1000 classes), index list handed to the "
            f"host; median ({mode}). Peak memory: what one `next_epoch()` allocates beyond the pruner's state, at "
            f"its peak (the allocator's on CUDA, resident memory on the CPU), the index list handed over included. "
            f"{prose('select')}"
            + budget_note + "\n\n" + table(headers, rows))


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="also time next_epoch() of another fastprune checkout (e.g. a git worktree of an earlier "
                         "commit), on the same sizes and device, in a subprocess")
    args = ap.parse_args(argv)
    if args.baseline and not _is_checkout(Path(args.baseline)):
        ap.error(f"--baseline: {args.baseline} is not a fastprune checkout with benchmarks/bench_select.py")
    return args


def produce(args, info) -> tuple[list[dict], str, str]:
    budget = TimeBudget(args.max_seconds)
    records = run(args, budget)
    return records, render(records, info, budget.note()), f"select-{info['device']}"


def main(argv=None) -> int:
    return cli_main(parse_args, produce, argv)


if __name__ == "__main__":
    raise SystemExit(main())
