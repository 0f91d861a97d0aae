"""Run comparison (``fastprune compare RUN [RUN ...]``): accuracy against what the training cost, and one table.

Every number comes from the runs' own records (``log.jsonl``, ``summary.json``): the final validation top-1
and top-5, the sample visits (samples trained, summed over epochs), the time (each epoch's training and
evaluation plus its selection, summed: a resumed run counts each epoch once, the pause not at all), the
speed-up against the reference run (the slowest run that trained on everything, else the slowest run), and
the samples the noise decisions acted on at the end.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .plotting import pyplot, save_png
from .rundir import atomic_write, prepare_dir
from .runlog import RunLog, read_run

FIGURE = "comparison.png"
TABLE_CSV = "comparison.csv"
TABLE_MD = "comparison.md"
CSV_COLUMNS = ("run", "folder", "setting", "epochs", "final_top1", "final_top5", "sample_visits",
               "visits_vs_reference", "seconds", "speedup_vs_reference", "suspected_noisy", "reference")


def epoch_seconds(record: dict) -> float:
    """An epoch's time: training and evaluation, plus the selection of the next epoch where recorded."""
    return float(record.get("epoch_seconds", 0.0)) + float(record.get("select_seconds", 0.0))


def is_full_data(run: RunLog) -> bool:
    """Whether the run trained on everything in every epoch (the baseline)."""
    if run.summary and "policy" in run.summary:
        return run.summary["policy"] == "full"
    return all(r.get("policy") == "full" for r in run.epochs)


def setting(run: RunLog) -> str:
    """A few words on how the run selected its samples."""
    if is_full_data(run):
        return "full data"
    s = run.summary or {}
    if "policy" not in s:
        return "/".join(dict.fromkeys(r.get("policy", "?") for r in run.epochs if r.get("policy") != "full")) or "?"
    text = f"{s['policy']} keep {s['keep_ratio']:g}"
    return text + (f", noise decisions ≤ {s['noise_ratio']:g}" if s.get("noise_ratio") else "")


def run_names(folders: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell them apart."""
    parts = [Path(f).resolve().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def comparison_rows(runs: list[RunLog], names: list[str]) -> list[dict]:
    """One row per run (the numbers of ``CSV_COLUMNS``); the reference is the slowest full-data run, else
    the slowest run."""
    seconds = [sum(epoch_seconds(r) for r in run.epochs) for run in runs]
    full = [k for k, run in enumerate(runs) if is_full_data(run)]
    ref = max(full or range(len(runs)), key=lambda k: seconds[k])
    visits = [sum(int(r["samples_trained"]) for r in run.epochs) for run in runs]
    rows = []
    for k, run in enumerate(runs):
        last = run.epochs[-1]
        suspected = (run.summary or {}).get("suspected_noisy", last.get("suspected_noisy", 0))
        rows.append({"run": names[k], "folder": str(run.path), "setting": setting(run), "epochs": len(run.epochs),
                     "final_top1": last.get("val_top1"), "final_top5": last.get("val_top5"),
                     "sample_visits": visits[k], "visits_vs_reference": visits[k] / max(visits[ref], 1),
                     "seconds": round(seconds[k], 3),
                     "speedup_vs_reference": seconds[ref] / seconds[k] if seconds[k] > 0 else None,
                     "suspected_noisy": int(suspected), "reference": k == ref})
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, the reference run named in the speed-up column's header."""
    ref = next(r["run"] for r in rows if r["reference"])
    lines = [f"| run | setting | epochs | final top-1 | final top-5 | sample visits | time | speed-up vs {ref} "
             "| suspected noisy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}×"
        lines.append(f"| {r['run']} | {r['setting']} | {r['epochs']} | {_pct(r['final_top1'])} | "
                     f"{_pct(r['final_top5'])} | {r['sample_visits']:,} ({r['visits_vs_reference']:.0%}) | "
                     f"{r['seconds']:.1f} s | {speed} | {r['suspected_noisy']:,} |")
    return "\n".join(lines) + "\n"


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_comparison(runs: list[RunLog], names: list[str], path: Path) -> Path:
    """Validation top-1 after each epoch against the cumulative sample visits (left) and time (right)."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    without = []
    for run, name in zip(runs, names):
        label = f"{name} ({setting(run)})" if setting(run) != name else name
        points = [(r, r.get("val_top1")) for r in run.epochs]
        if all(acc is None for _, acc in points):
            without.append(name)
            continue
        visits = seconds = 0.0
        xs_v, xs_t, ys = [], [], []
        for r, acc in points:
            visits += int(r["samples_trained"])
            seconds += epoch_seconds(r)
            if acc is not None:
                xs_v.append(visits)
                xs_t.append(seconds)
                ys.append(acc)
        style = {"marker": "o", "markersize": 4, "linewidth": 1.6, "label": label}
        line, = ax[0].plot(xs_v, ys, **style)
        ax[1].plot(xs_t, ys, color=line.get_color(), **style)
        for a, x in ((ax[0], xs_v[-1]), (ax[1], xs_t[-1])):
            a.annotate(f"{ys[-1]:.1%}", (x, ys[-1]), textcoords="offset points", xytext=(4, -10), fontsize=7.5,
                       color=line.get_color())
    ax[0].set(xlabel="sample visits (samples trained, cumulative)", ylabel="validation top-1",
              title="accuracy against sample visits")
    ax[1].set(xlabel="time (training + evaluation + selection, cumulative), s", title="accuracy against time")
    ax[0].xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    for a in ax:
        a.grid(alpha=0.3)
        a.margins(x=0.1)  # room for the final accuracy's label
        a.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    if len(without) < len(runs):
        ax[0].legend(fontsize=8, loc="lower right")
    if without:
        fig.text(0.5, 0.01, "no validation accuracy recorded (no --val): " + ", ".join(without), ha="center",
                 fontsize=8, color="#8B0000")
    fig.tight_layout(rect=(0, 0.04 if without else 0, 1, 1))
    return save_png(fig, path)


def compare(folders: list, out=".", names: list[str] | None = None, log=print) -> list[dict]:
    """Read the runs in ``folders``, write ``comparison.png``, ``.csv`` and ``.md`` into ``out``, print the
    table (through ``log``) and return its rows."""
    if not folders:
        raise ValueError("compare needs at least one run folder")
    runs = [read_run(f) for f in folders]
    if names is None:
        names = run_names([Path(f) for f in folders])
    elif len(names) != len(runs):
        raise ValueError(f"--names gives {len(names)} names for {len(runs)} runs")
    out = prepare_dir(out, "--out")
    rows = comparison_rows(runs, names)
    table = markdown_table(rows)
    atomic_write(out / TABLE_MD, lambda tmp: Path(tmp).write_text(table))
    text = _csv_text(rows)
    atomic_write(out / TABLE_CSV, lambda tmp: Path(tmp).write_text(text))
    plot_comparison(runs, names, out / FIGURE)
    unfinished = [r["run"] for r, run in zip(rows, runs) if not run.finished]
    log(table.rstrip())
    if unfinished:
        log(f"note: not finished (compared on the epochs logged so far): {', '.join(unfinished)}")
    log(f"wrote {out / FIGURE}, {out / TABLE_CSV}, {out / TABLE_MD}")
    return rows
