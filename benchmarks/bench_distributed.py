"""The pruner under torch.distributed: bytes exchanged per epoch and ``next_epoch()`` time, K processes.

    python -m benchmarks.bench_distributed [--smoke] [--ranks 2] [--write] [--max-seconds S]

Spawns ``--ranks`` processes joined by a gloo group on the CPU (NCCL on GPUs when there are as many
GPUs as ranks).  Each rank owns a pruner over N samples; an "epoch" marks this rank's shard as
trained (scores changed, as the fused step would leave them) and then calls ``next_epoch()``: the
merge (one all-reduce of the touched state), the global selection and the hand-over of this rank's
shard.  Baseline: ``next_epoch()`` of a single-process pruner over the same N on the same machine.
Bytes are what each rank hands to its collectives (ring all-reduce wire traffic per rank is about
2(K-1)/K times that).  Past ``--select-limit`` samples on the CPU only ``sync()`` (the merge) is
timed: the CPU selection itself is then the long pole and is measured by ``bench_select``.  N = 100M runs
on GPUs only.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from fastprune.distributed import RankError, run_local

from .goals import prose
from .report import TimeBudget, base_parser, cli_main, describe, table
from .timing import measure


def sizes(smoke: bool, gpu: bool) -> list[int]:
    """100M only on GPUs: on the CPU a 100M pruner's own selection peaks at ~15 GB per process."""
    if smoke:
        return [20_000]
    return [1_281_167, 10_000_000, 100_000_000] if gpu else [1_281_167, 10_000_000]


def _pruner(n: int, device, group):
    import fastprune as fp

    g = torch.Generator().manual_seed(0)
    p = fp.DynamicPruner(n, 1000, epochs=10, keep_ratio=0.7, noise_ratio=0.05, text_emb=torch.randn(1000, 8).to(device),
                         device=device, process_group=group)
    p._state.scores.copy_((torch.rand(n, generator=g) * 5).to(device))
    p._state.consistency.copy_((torch.randn(n, generator=g) * 0.1 + 0.3).to(device))
    p._state.visits.fill_(1)
    p._has_batch_consistency = True
    return p


def _train_shard(p):
    """What an epoch of steps leaves behind on this rank: its shard's state changed and stamped."""
    shard = p.epoch_indices.to(p.device)
    p._state.scores[shard] *= 0.9
    p._state.visits[shard] += 1
    p._state.stamp[shard] = p._step_count
    p._step_count += 1


def _rank_main(rank, world, n, reps, select) -> dict:
    import torch.distributed as dist

    use_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    p = _pruner(n, device, None)
    times = []
    for k in range(reps + 1):  # the first is a warm-up
        _train_shard(p)
        if use_cuda:
            torch.cuda.synchronize()
        dist.barrier()  # start together: time the epoch end, not the simulated epoch's skew
        t0 = time.perf_counter()
        if select:
            p.epoch = 1  # the same epoch each time: the same work
            p.history = p.history[:1]
            p.next_epoch()
        else:
            p.sync()
        if use_cuda:
            torch.cuda.synchronize()
        if k:
            times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    out = {"timed": {"median_us": statistics.median(times), "iqr_us": q[2] - q[0]}, "bytes": p.last_sync["bytes"],
           "backend": dist.get_backend(), "device": str(device)}
    if rank == 0 and select:
        single = _pruner(n, device, False)

        def alone():
            single.epoch = 1
            single.history = single.history[:1]
            single.next_epoch()

        out["single"] = measure(alone, device, reps=reps, warmup=1)
    dist.barrier()
    return out


def run(args, budget: TimeBudget) -> list[dict]:
    records = []
    gpu = torch.cuda.is_available() and not args.cpu and torch.cuda.device_count() >= args.ranks
    for n in sizes(args.smoke, gpu):
        if not budget.allows(f"N={n:,}"):
            continue
        select = gpu or n <= args.select_limit
        reps = 3 if (args.smoke or n > 10_000_000) else 5
        res = run_local(_rank_main, args.ranks, n, reps, select, backend="nccl" if gpu else "gloo", timeout=1800,
                        collective_timeout=600)
        failed = [r for r in res if isinstance(r, RankError)]
        if failed:
            raise RuntimeError(f"bench_distributed: a rank failed at N={n}: {failed[0].message}")
        r0 = res[0]
        med = max(r["timed"]["median_us"] for r in res)  # the epoch ends when the slowest rank is through
        rec = {"bench": "distributed", "method": "next_epoch" if select else "sync", "dtype": "float32",
               "sizes": {"N": n, "ranks": args.ranks}, "backend": r0["backend"], "median_us": med,
               "iqr_us": max(r["timed"]["iqr_us"] for r in res), "bytes_per_rank": r0["bytes"],
               "ring_wire_bytes_per_rank": round(r0["bytes"] * 2 * (args.ranks - 1) / args.ranks)}
        if "single" in r0:
            rec["single_process_us"] = r0["single"]["median_us"]
            rec["ratio_to_single"] = med / r0["single"]["median_us"]
        records.append(rec)
        print(f"  N={n}: {rec['method']} {med / 1000:.1f} ms, {r0['bytes'] / 2**20:.1f} MiB per rank", file=sys.stderr)
    return records


def render(records, info, budget_note: str = "") -> str:
    rows = []
    for r in records:
        single = f"{r['single_process_us'] / 1000:.1f}" if "single_process_us" in r else "-"
        ratio = f"{r['ratio_to_single']:.2f}" if "ratio_to_single" in r else "-"
        rows.append([f"{r['sizes']['N']:,}", r["sizes"]["ranks"], r["backend"], r["method"],
                     f"{r['median_us'] / 1000:.1f}", single, ratio, f"{r['bytes_per_rank'] / 2**20:.1f}",
                     f"{r['ring_wire_bytes_per_rank'] / 2**20:.1f}"])
    headers = ["N", "ranks", "backend", "timed", "ms (slowest rank)", "1 process next_epoch ms",
               "ratio", "MiB handed to all-reduce per rank", "ring wire MiB per rank"]
    mode = "CPU figures" if info["device"] == "cpu" else "GPU figures"
    return (f"### Distributed epoch end — {describe(info)}\n\nOne epoch's merge of per-sample state over ranks and "
            f"the global selection (`next_epoch()`), or the merge alone (`sync()`) where the CPU selection would "
            f"dominate; median over repeats, slowest rank ({mode}; on the CPU each process uses cores / ranks "
            f"threads, and the one-process baseline as many). The step path exchanges nothing. {prose('distributed')}"
            + budget_note + "\n\n" + table(headers, rows))


def parse_args(argv=None):
    ap = base_parser(__doc__)
    ap.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--select-limit", type=int, default=2_000_000,
                    help="on the CPU, time next_epoch() up to this N and sync() beyond")
    return ap.parse_args(argv)


def produce(args, info) -> tuple[list[dict], str, str]:
    budget = TimeBudget(args.max_seconds)
    records = run(args, budget)
    return records, render(records, info, budget.note()), f"distributed-{info['device']}"


def main(argv=None) -> int:
    return cli_main(parse_args, produce, argv)


if __name__ == "__main__":
    raise SystemExit(main())
