"""The benchmarks' goals, as data: the one place they are stated.

Each benchmark's table intro in BENCHMARKS.md (``prose``) and the GPU suite's goal table (``evaluate``) are
made from ``GOALS``, so what the tables promise and what the suite checks cannot drift apart.  A goal names
its benchmark, a phrase with ``{op}`` and ``{threshold}`` placeholders, the comparison, the threshold, how to
read the measured value from that benchmark's records, and the GPU it was set for (None: any device).

No torch here: the suite's driver and the dry run use this module without a GPU.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

from .report import device_us, table

COMPARE = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
BIG_STEP = 64_000_000  # B*C from which the step is judged against the copy bandwidth


@dataclass(frozen=True)
class Measured:
    value: float
    detail: str  # where the value comes from: which configuration(s)


@dataclass(frozen=True)
class Goal:
    bench: str
    phrase: str  # with {op} and {threshold}: "fused / ce {op} {threshold:g}"
    op: str  # "<=", ">=" or "=="
    threshold: float
    measure: Callable[[list[dict]], Measured | None]  # from the benchmark's records; None: not in them
    fmt: str = "{:.2f}"  # how to print the measured value
    device: str | None = None  # the GPU the goal was set for; None: any device, the CPU included

    @property
    def text(self) -> str:
        return self.phrase.format(op=self.op, threshold=self.threshold)

    def met(self, value: float) -> bool:
        return COMPARE[self.op](value, self.threshold)


@dataclass(frozen=True)
class GoalResult:
    goal: Goal
    status: str  # "met", "not met" or "not measured"
    measured: str  # the value and where it comes from, or "-"
    note: str = ""


# ----------------------------------------------------------------------------- extractors

def _step_configs(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(B, C, dtype) -> {method: record} of bench_step."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("bench") == "step":
            out.setdefault((r["sizes"]["B"], r["sizes"]["C"], r["dtype"]), {})[r["method"]] = r
    return out


def _config(key: tuple) -> str:
    b, c, dtype = key
    return f"B={b} C={c} {dtype}"


def _worst(pairs: list[tuple[float, tuple]], pick, what: str) -> Measured | None:
    """The worst (``pick`` = max or min) of per-configuration values, naming its configuration."""
    if not pairs:
        return None
    value, key = pick(pairs, key=lambda p: p[0])
    return Measured(value, f"worst of {len(pairs)} {what}: {_config(key)}")


def step_ratio(num: str, den: str, pick) -> Callable[[list[dict]], Measured | None]:
    """``num`` device time / ``den`` device time over every configuration that has both; the worst one."""
    def measure(records):
        pairs = [(device_us(by[num]) / device_us(by[den]), key) for key, by in _step_configs(records).items()
                 if num in by and den in by]
        return _worst(pairs, pick, "configurations")
    return measure


def step_host_syncs(records) -> Measured | None:
    pairs = [(by["fused"]["host_syncs"], key) for key, by in _step_configs(records).items()
             if by.get("fused", {}).get("host_syncs") is not None]
    return _worst(pairs, max, "configurations")


def step_copy_fraction(records) -> Measured | None:
    """The fused step's GB/s as a fraction of the copy bandwidth, at B*C >= BIG_STEP; the lowest."""
    pairs = [(by["fused"]["GBps"] / by["fused"]["copy_GBps"], key) for key, by in _step_configs(records).items()
             if "fused" in by and key[0] * key[1] >= BIG_STEP]
    return _worst(pairs, min, f"configurations with B*C >= {BIG_STEP / 1e6:.0f}M")


def select_ms(n: int) -> Callable[[list[dict]], Measured | None]:
    """``next_epoch()`` milliseconds at N = n."""
    def measure(records):
        for r in records:
            if r.get("bench") == "select" and r["method"] == "next_epoch" and r["sizes"]["N"] == n:
                return Measured(r["median_us"] / 1000, f"N={n:,}")
        return None
    return measure


def epoch_keep_ratio(records) -> Measured | None:
    """Epoch time at keep 0.7 over the full epoch's."""
    for r in records:
        if r.get("bench") == "epoch" and r["sizes"]["keep"] == 0.7 and "ratio_to_full" in r:
            return Measured(r["ratio_to_full"], f"{r['method']}, {r['sizes']['N']} images")
    return None


def loader_keep_ratio(records) -> Measured | None:
    """DaliLoader's epoch at keep 0.7 over its keep-1.0 epoch."""
    dali = {r["sizes"]["keep"]: r for r in records if r.get("bench") == "loader" and r["method"] == "DaliLoader"}
    if 0.7 not in dali or 1.0 not in dali:
        return None
    return Measured(dali[0.7]["epoch_s"] / dali[1.0]["epoch_s"], f"{dali[1.0]['sizes']['N']} JPEGs")


def distributed_bytes_per_sample(records) -> Measured | None:
    """Bytes each rank hands to the all-reduce per sample, the largest over the sizes run, to 0.01 (the
    fixed header, 8 x (6 + ranks) bytes, is below that)."""
    per = [(r["bytes_per_rank"] / r["sizes"]["N"], r) for r in records if r.get("bench") == "distributed"]
    if not per:
        return None
    value, r = max(per, key=lambda p: p[0])
    return Measured(round(value, 2), f"largest over {len(per)} sizes, {r['sizes']['ranks']} ranks")


# ----------------------------------------------------------------------------- the goals

GOALS: list[Goal] = [
    Goal("step", "fused / ce {op} {threshold:g}", "<=", 0.7, step_ratio("fused", "ce", max), device="H100"),
    Goal("step", "eager / fused {op} {threshold:g}", ">=", 3, step_ratio("eager", "fused", min), device="H100"),
    Goal("step", "compiled / fused {op} {threshold:g}", ">=", 1.5, step_ratio("compiled", "fused", min),
         device="H100"),
    Goal("step", "fused host syncs {op} {threshold:g}", "==", 0, step_host_syncs, fmt="{:.0f}", device="H100"),
    Goal("step", "{op} {threshold:.0%} of copy bandwidth at B*C >= 64M", ">=", 0.8, step_copy_fraction,
         fmt="{:.0%}", device="H100"),
    Goal("select", "{op} {threshold:g} ms at 1.28M", "<=", 0.3, select_ms(1_281_167), fmt="{:.3f} ms",
         device="H100"),
    Goal("select", "{op} {threshold:g} ms at 100M", "<=", 20, select_ms(100_000_000), fmt="{:.1f} ms",
         device="H100"),
    Goal("loader", "DaliLoader's keep-0.7 epoch {op} {threshold:g}x its keep-1.0 epoch", "<=", 0.73,
         loader_keep_ratio),
    Goal("epoch", "keep 0.7 {op} {threshold:g}x the full epoch", "<=", 0.73, epoch_keep_ratio),
    Goal("distributed", "{op} {threshold:g} bytes per sample handed to the all-reduce per rank", "<=", 16,
         distributed_bytes_per_sample),
]


def prose(bench: str) -> str:
    """The sentence a benchmark's table intro states its goals with, e.g. "Goals (H100): a, b." ('' if none)."""
    parts = []
    for device in dict.fromkeys(g.device for g in GOALS if g.bench == bench):
        texts = [g.text for g in GOALS if g.bench == bench and g.device == device]
        label = ("Goals" if len(texts) > 1 else "Goal") + (f" ({device})" if device else "")
        parts.append(f"{label}: {', '.join(texts)}.")
    return " ".join(parts)


def evaluate(records: list[dict], device: str, goals: list[Goal] = GOALS) -> list[GoalResult]:
    """Every goal against ``records`` measured on ``device`` (its name, "cpu" for the CPU)."""
    out = []
    for g in goals:
        if g.device is not None and device == "cpu":
            out.append(GoalResult(g, "not measured", "-", f"CPU figures; goal set for the {g.device}"))
            continue
        m = g.measure(records)
        if m is None:
            out.append(GoalResult(g, "not measured", "-", f"no {g.bench} figures for it in this run"))
            continue
        note = f"goal set for the {g.device}" if g.device is not None and g.device not in device else ""
        out.append(GoalResult(g, "met" if g.met(m.value) else "not met", f"{g.fmt.format(m.value)} ({m.detail})",
                              note))
    return out


def goal_table(results: list[GoalResult]) -> str:
    rows = [[r.goal.bench, r.goal.text, r.goal.device or "any", r.measured, r.status, r.note or "-"]
            for r in results]
    return table(["benchmark", "goal", "set for", "measured", "status", "note"], rows)


def sample_records() -> list[dict]:
    """Records shaped as the benchmarks write them, one of each kind a goal reads: the dry run checks every
    extractor on them without a GPU."""
    recs = []
    for b, c in ((1024, 1000), (4096, 32000)):
        for method, us, syncs in (("fused", 100.0, 0), ("ce", 150.0, 0), ("eager", 400.0, 0),
                                  ("compiled", 200.0, 0), ("infobatch", 900.0, 1)):
            nbytes = 2 * b * c * 2
            recs.append({"bench": "step", "method": method, "dtype": "bfloat16", "sizes": {"B": b, "C": c, "D": 512},
                         "median_us": us, "iqr_us": 1.0, "host_syncs": syncs, "bytes": nbytes,
                         "GBps": nbytes / (us * 1e-6) / 1e9, "copy_GBps": 3000.0})
    for n, us in ((1_281_167, 250.0), (100_000_000, 15_000.0)):
        recs.append({"bench": "select", "method": "next_epoch", "dtype": "float32", "sizes": {"N": n},
                     "median_us": us, "iqr_us": 1.0})
    for keep, sec in ((1.0, 2.0), (0.7, 1.4), (0.5, 1.0)):
        recs.append({"bench": "loader", "method": "DaliLoader", "dtype": "float32",
                     "sizes": {"N": 3000, "keep": keep, "batch": 128}, "median_us": sec * 1e6, "iqr_us": 0.0,
                     "epoch_s": sec})
        recs.append({"bench": "epoch", "method": "resnet50 + DALI (GPU decode)", "dtype": "bf16",
                     "sizes": {"N": 5000, "keep": keep, "batch": 256}, "median_us": sec * 1e6, "iqr_us": 0.0,
                     "ratio_to_full": sec / 2.0})
    recs.append({"bench": "distributed", "method": "next_epoch", "dtype": "float32",
                 "sizes": {"N": 1_281_167, "ranks": 2}, "median_us": 5000.0, "iqr_us": 1.0,
                 "bytes_per_rank": 16 * 1_281_167 + 64})
    return recs
