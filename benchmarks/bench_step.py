"""Score-and-select overhead per training step: fastprune's fused step against what it replaces.

    python -m benchmarks.bench_step [--smoke] [--write] [--max-seconds S]

Per configuration (B, C, dtype; D = 512 CLIP width), each method computes the batch loss and its gradient
w.r.t. the logits:
- fused: ``DynamicPruner.step`` + ``backward`` (loss, gradient, consistency, EMA, weights in one pass);
- ce: plain ``F.cross_entropy`` forward + backward — what a user pays without any pruning;
- eager: the same scoring in eager PyTorch (per-sample CE, gathers, cosine, EMA scatter, weights, backward);
- compiled: ``eager`` under ``torch.compile`` (GPU runs; skipped in CPU smoke runs, where compiling
  dominates);
- liger: Liger-Kernel's fused cross-entropy forward + backward, where installed;
- infobatch-style: scores kept on the host, per-step copy of the losses to the CPU (as InfoBatch's paper and
  public code describe it; reimplemented here from that description).
Reported: median and IQR, ratios against the fused step, host syncs (CUDA), and achieved GB/s of the fused
step (its compulsory traffic: read the logits, write the gradient) against the copy bandwidth measured in
the same run.  On a GPU, each method's *device time* is its replay from a CUDA graph (``do_bench_cudagraph``:
the GPU's own work, without the host's launch cost), for every method that never synchronises; the ratios, the
GB/s and the goals read it.  The host's side is reported beside it: the enqueue time of one call (Python,
launches, autograd) and the wall time of ``do_bench``, which is the host's enqueue time wherever that is longer
than the GPU's work.  In a training step the host enqueues the loss while the GPU still runs the model's
forward pass, so the device time is what the fused step adds, unless the host is the bottleneck.
GPU configurations run in ``GPU_ORDER`` (the largest, which the bandwidth goal reads, first), so a run trimmed by
``--max-seconds`` keeps the figures that matter most; the table names any left out.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastprune as fp

from .goals import prose
from .report import TimeBudget, base_parser, cli_main, describe, device_us, table
from .timing import copy_bandwidth, count_host_syncs, host_enqueue_us, measure, measure_graphed

METHODS = ("fused", "ce", "eager", "compiled", "liger", "infobatch")
# (B, C) on GPUs, most telling first: B*C >= 64M (the bandwidth goal), then the common ImageNet-1k shapes,
# then the rest; each in bf16, then fp32.
GPU_ORDER = [(4096, 32000), (16384, 10000), (16384, 32000), (256, 1000), (1024, 1000), (4096, 1000),
             (1024, 10000), (1024, 32000), (4096, 10000), (256, 10000), (16384, 1000), (256, 32000)]


def configs(smoke: bool, device: torch.device):
    if smoke:
        return [(b, c, d) for b in (64, 256) for c in (100, 1000) for d in (torch.float32,)], 64
    if device.type != "cuda":  # CPU figures: sizes a CPU finishes in minutes
        return [(b, c, torch.float32) for b in (256, 1024) for c in (1000, 10000)], 512
    return [(b, c, d) for b, c in GPU_ORDER for d in (torch.bfloat16, torch.float32)], 512


class Setup:
    """Inputs shared by every method of one configuration."""

    def __init__(self, B, C, dtype, D, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.N = 4 * B
        # drawn where it is used: a CPU draw of 16384 x 32000 takes seconds
        g_dev = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
        self.logits = (torch.randn(B, C, generator=g_dev, device=device) * 2).to(dtype).requires_grad_()
        self.labels = torch.randint(0, C, (B,), generator=g).to(device)
        self.idx = torch.randperm(self.N, generator=g)[:B].to(device)
        self.image = F.normalize(torch.randn(self.N, D, generator=g), dim=1).to(device, torch.float16)
        self.text = F.normalize(torch.randn(C, D, generator=g), dim=1).to(device, torch.float16)
        self.scores = torch.zeros(self.N, device=device)
        self.visits = torch.zeros(self.N, dtype=torch.int32, device=device)
        self.consistency = torch.zeros(self.N, device=device)
        self.weights = torch.ones(self.N, device=device)
        self.pruner = fp.DynamicPruner(self.N, C, epochs=10, image_emb=self.image, text_emb=self.text,
                                       device=device, validate="none")
        self.host_scores = torch.zeros(self.N)  # infobatch-style: scores on the host
        self.host_weights = torch.ones(self.N)


def eager_scoring(logits, labels, idx, image, text, scores, visits, consistency, weights, ema=0.9):
    """The fused step's work written plainly in PyTorch."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    w = weights[idx]
    loss = (w * ce).sum() / logits.shape[0]
    with torch.no_grad():
        first = visits[idx] == 0
        cos = F.cosine_similarity(image[idx].float(), text[labels].float(), dim=1)
        consistency[idx] = torch.where(first, cos, consistency[idx])
        scores[idx] = torch.where(first, ce.detach(), ema * scores[idx] + (1 - ema) * ce.detach())
        visits[idx] += 1
    return loss


def methods(s: Setup, device: torch.device, smoke: bool) -> dict:
    def backward(loss):
        loss.backward()
        s.logits.grad = None

    out = {
        "fused": lambda: backward(s.pruner.step(s.logits, s.labels, s.idx)),
        "ce": lambda: backward(F.cross_entropy(s.logits, s.labels)),
        "eager": lambda: backward(eager_scoring(s.logits, s.labels, s.idx, s.image, s.text, s.scores, s.visits,
                                                s.consistency, s.weights)),
    }
    if device.type == "cuda" or not smoke:
        compiled = torch.compile(eager_scoring)
        out["compiled"] = lambda: backward(compiled(s.logits, s.labels, s.idx, s.image, s.text, s.scores,
                                                    s.visits, s.consistency, s.weights))
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        if device.type == "cuda":
            liger = LigerCrossEntropyLoss()
            out["liger"] = lambda: backward(liger(s.logits, s.labels))
    except ImportError:
        pass

    def infobatch_style():
        ce = F.cross_entropy(s.logits.float(), s.labels, reduction="none")
        idx_host = s.idx.cpu()  # the per-step trip to the host
        s.host_scores[idx_host] = ce.detach().cpu()
        w = s.host_weights[idx_host].to(device, non_blocking=True)
        backward((ce * w).mean())

    out["infobatch"] = infobatch_style
    return out


def run(args, budget: TimeBudget) -> tuple[list[dict], dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    cfgs, D = configs(args.smoke, device)
    bw = copy_bandwidth(device, (256 << 20) if device.type == "cuda" else (64 << 20))
    records = []
    for B, C, dtype in cfgs:
        if not budget.allows(f"B={B} C={C} {str(dtype).replace('torch.', '')}"):
            continue
        s = Setup(B, C, dtype, D, device)
        timed = {}
        fns = methods(s, device, args.smoke)
        for name, fn in fns.items():
            timed[name] = measure(fn, device, reps=5 if args.smoke else 20)
            timed[name]["host_syncs"] = count_host_syncs(fn, device)
            if device.type == "cuda":
                timed[name]["host_us"] = host_enqueue_us(fn)
                graphed = measure_graphed(fn, device) if timed[name]["host_syncs"] == 0 else None
                if graphed is not None:
                    timed[name].update(graph_median_us=graphed["median_us"], graph_iqr_us=graphed["iqr_us"])
        nbytes = 2 * B * C * s.logits.element_size()  # read logits + write gradient
        for name, t in timed.items():
            rec = {"bench": "step", "method": name, "dtype": str(dtype).replace("torch.", ""),
                   "sizes": {"B": B, "C": C, "D": D}, **t, "bytes": nbytes,
                   "GBps": nbytes / (device_us(t) * 1e-6) / 1e9,
                   "ratio_to_fused": device_us(t) / device_us(timed["fused"])}
            records.append(rec)
        print(f"  B={B} C={C} {dtype}: " + ", ".join(f"{k} {device_us(v):.0f} us" for k, v in timed.items()),
              file=sys.stderr)
    return records, {"copy_GBps": bw}


def render(records, extra, info, args, budget_note: str = "") -> str:
    rows = []
    keys = sorted({(r["sizes"]["B"], r["sizes"]["C"], r["dtype"]) for r in records},
                  key=lambda k: (k[2], k[0], k[1]))
    present = [m for m in METHODS if any(r["method"] == m for r in records)]
    gpu = any("graph_median_us" in r for r in records)

    def us(r):
        return f"{device_us(r):.0f}" + ("" if not gpu or "graph_median_us" in r else "*")

    for B, C, dtype in keys:
        by = {r["method"]: r for r in records if (r["sizes"]["B"], r["sizes"]["C"], r["dtype"]) == (B, C, dtype)}
        f, ce = by["fused"], by["ce"]
        row = [B, C, dtype] + [us(by[m]) if m in by else "-" for m in present]
        row += [f"{device_us(f) / device_us(ce):.2f}"]
        row += [f"{device_us(by[m]) / device_us(f):.1f}x" if m in by else "-" for m in present[2:]]
        row += [f"{f['GBps']:.0f} ({100 * f['GBps'] / extra['copy_GBps']:.0f}%)"]
        if gpu:
            row += [f"{f['host_us']:.0f} / {ce['host_us']:.0f}" if "host_us" in f and "host_us" in ce else "-",
                    f"{f['median_us']:.0f} / {ce['median_us']:.0f} = {f['median_us'] / ce['median_us']:.2f}"]
        row += ["-" if f["host_syncs"] is None else f["host_syncs"]]
        rows.append(row)
    headers = (["B", "C", "dtype"] + [f"{m} us" for m in present] + ["fused / ce"] +
               [f"{m} / fused" for m in present[2:]] + ["fused GB/s (% of copy)"] +
               (["host enqueue us, fused / ce", "wall us (do_bench), fused / ce"] if gpu else []) +
               ["fused host syncs"])
    mode = ("smoke run, " if args.smoke else "") + ("CPU figures: the CPU path is the PyTorch reference"
                                                     if info["device"] == "cpu" else "GPU figures")
    timing = ("Device time per forward+backward, replayed from a CUDA graph (* = the method synchronises with "
              "the host and cannot be captured: its wall time); ratios and GB/s from device times. Host enqueue: "
              "one call's time on the host without waiting for the GPU; wall: do_bench's median, the longer of "
              "the two sides" if gpu else "Median of repeated forward+backward per method")
    return (f"### Step overhead — {describe(info)}\n\n{timing} ({mode}); "
            f"device copy bandwidth measured in the same run: {extra['copy_GBps']:.0f} GB/s. {prose('step')}"
            + budget_note + "\n\n" + table(headers, rows))


def parse_args(argv=None):
    ap = base_parser(__doc__)
    return ap.parse_args(argv)


def produce(args, info) -> tuple[list[dict], str, str]:
    budget = TimeBudget(args.max_seconds)
    records, extra = run(args, budget)
    for r in records:
        r["copy_GBps"] = extra["copy_GBps"]
    return records, render(records, extra, info, args, budget.note()), f"step-{info['device']}"


def main(argv=None) -> int:
    return cli_main(parse_args, produce, argv)


if __name__ == "__main__":
    raise SystemExit(main())
