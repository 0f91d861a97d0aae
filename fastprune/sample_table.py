"""What a run records per sample for its report, so that ``fastprune report RUN`` needs the run folder alone.

``samples.npz`` (written at the end of a run): for every sample, where its image is, its given label, the
noise decisions' action, belief and suggested class, the evidence (the model's area under the margin and its
predicted class, CLIP's margin and preferred class), the score, consistency and visits; and the class names.

``selection.npz`` (written as the run goes): the selection of the last epoch that pruned — each sample's
priority when it was chosen, whether it was kept, its noise action, and the policy's threshold — so that the
score histograms show what the policy decided, not the all-kept annealing epochs at the end.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .noise import DOWNWEIGHT, EXCLUDE, KEEP, RELABEL
from .rundir import atomic_write, describe_load_error

SAMPLES_FILE = "samples.npz"
SELECTION_FILE = "selection.npz"
FORMAT = 1

# What happened to a sample in the recorded selection (a noise action takes precedence over the policy).
KEPT, PRUNED, DOWN_WEIGHTED, EXCLUDED, RELABELED, UNSEEN = range(6)
STATUS_NAMES = {KEPT: "kept", PRUNED: "pruned", DOWN_WEIGHTED: "flagged: down-weighted",
                EXCLUDED: "flagged: excluded", RELABELED: "flagged: relabeled", UNSEEN: "not scored yet"}


def _strings(values: list[str]) -> np.ndarray:
    """Strings as one NUL-separated UTF-8 byte array: compact for a million paths, loads without pickle."""
    return np.frombuffer("\0".join(values).encode("utf-8"), dtype=np.uint8)


def _unstrings(array: np.ndarray, count: int) -> list[str]:
    if count == 0:
        return []
    return array.tobytes().decode("utf-8").split("\0")


def _save_npz(path: Path, arrays: dict) -> None:
    def write(tmp):
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(Path(path), write)


def _load_npz(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist ({what})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is one message
        raise ValueError(f"cannot read {str(path)!r} ({what}): {describe_load_error(path, e)}") from e


def _host(t: torch.Tensor | None, dtype) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu").numpy().astype(dtype, copy=False)


@dataclass
class SampleTable:
    """Per-sample columns at the end of a run (numpy arrays of length N) and the class names."""

    classes: list[str]
    root: str  # the training folder the run read ("" when unknown)
    files: list[str]  # each sample's path, relative to ``root`` (or absolute); empty when unknown
    label: np.ndarray  # int32: the given label
    action: np.ndarray  # int8: fastprune.noise action codes
    belief: np.ndarray  # float32: belief that the label is wrong (acted-on samples: the one acted on)
    suggested: np.ndarray  # int32: the class a relabeled sample trains with (-1: its own)
    model_margin: np.ndarray  # float32: area under the margin (NaN: never scored)
    model_pred: np.ndarray  # int32: the model's latest predicted class (-1: never scored)
    clip_margin: np.ndarray  # float32 (NaN: no embeddings)
    clip_pred: np.ndarray  # int32 (-1: no embeddings)
    score: np.ndarray  # float32: EMA cross-entropy
    consistency: np.ndarray  # float32
    visits: np.ndarray  # int64
    noise_decisions: bool  # whether the run made noise decisions at all

    COLUMNS = ("label", "action", "belief", "suggested", "model_margin", "model_pred", "clip_margin", "clip_pred",
               "score", "consistency", "visits")

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def flagged(self) -> np.ndarray:
        """Whether the noise decisions act on each sample (relabel, exclude or down-weight)."""
        return self.action != KEEP

    def paths(self, root: str | None = None) -> list[str]:
        """Each sample's image path, under ``root`` instead of the recorded one when given."""
        base = Path(root if root is not None else self.root)
        return [str(base / f) for f in self.files]

    @classmethod
    def from_pruner(cls, pruner, index=None) -> SampleTable:
        """The pruner's per-sample state now; ``index`` (the training ``ImageFolderIndex``) adds the files,
        class names and the labels as given (the pruner's evidence holds a relabeled sample's new class)."""
        acted = pruner.noise_actions != KEEP
        belief = pruner.noise_belief
        if pruner.decision_belief is not None:
            belief = torch.where(acted, belief, pruner.decision_belief.to(belief.device))
        if index is not None:
            label, classes = index.labels, list(index.classes)
            root, files = str(index.root), index.relative_files
        else:
            label = pruner.given_labels
            classes, root, files = [str(c) for c in range(pruner.num_classes)], "", []
        return cls(classes=classes, root=root, files=files, label=_host(label, np.int32),
                   action=_host(pruner.noise_actions, np.int8), belief=_host(belief, np.float32),
                   suggested=_host(pruner.relabeled, np.int32), model_margin=_host(pruner.model_margin, np.float32),
                   model_pred=_host(pruner.model_pred, np.int32), clip_margin=_host(pruner.clip_margin, np.float32),
                   clip_pred=_host(pruner.clip_pred, np.int32), score=_host(pruner.scores, np.float32),
                   consistency=_host(pruner.consistency, np.float32), visits=_host(pruner.visits, np.int64),
                   noise_decisions=pruner.noise_ratio > 0)

    def save(self, path: Path) -> Path:
        arrays = {name: getattr(self, name) for name in self.COLUMNS}
        arrays.update(format=np.int64(FORMAT), classes=_strings(self.classes), class_count=np.int64(len(self.classes)),
                      root=_strings([self.root]), files=_strings(self.files), file_count=np.int64(len(self.files)),
                      noise_decisions=np.bool_(self.noise_decisions))
        _save_npz(path, arrays)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> SampleTable:
        z = _load_npz(path, "the run's per-sample table")
        missing = [k for k in (*cls.COLUMNS, "classes", "class_count", "root", "files", "file_count") if k not in z]
        if missing:
            raise ValueError(f"{str(path)!r} is not a per-sample table of fastprune train: it lacks {missing}")
        n = z["label"].shape[0]
        wrong = [k for k in cls.COLUMNS if z[k].shape != (n,)]
        files = _unstrings(z["files"], int(z["file_count"]))
        if wrong or len(files) not in (0, n):
            raise ValueError(f"{str(path)!r} is damaged: its columns {wrong or ['files']} do not have {n} rows")
        return cls(classes=_unstrings(z["classes"], int(z["class_count"])), root=_unstrings(z["root"], 1)[0],
                   files=files, noise_decisions=bool(z.get("noise_decisions", True)),
                   **{k: z[k] for k in cls.COLUMNS})


@dataclass
class SelectionRecord:
    """One epoch's selection as the policy saw it: per sample (numpy, length N) the priority it was ranked
    by, whether it was kept, whether it had been scored, its noise action; and the policy's threshold
    (infobatch: the mean priority of the eligible samples, below which samples are dropped with
    ``drop_prob``; topk: the lowest kept priority; NaN for random and full)."""

    epoch: int
    policy: str
    priority: np.ndarray  # float32
    kept: np.ndarray  # bool
    seen: np.ndarray  # bool
    action: np.ndarray  # int8
    threshold: float
    drop_prob: float
    priority_is_score: bool  # no consistency factor: the priority is the score itself

    @classmethod
    def from_pruner(cls, pruner) -> SelectionRecord:
        """The pruner's current selection (call it right after ``next_epoch()``, before any step)."""
        record = pruner.history[-1]
        scores = pruner.scores.detach().cpu()
        prio = pruner.selection_priority
        prio = scores.clone() if prio is None else prio.detach().cpu()
        kept = torch.zeros(pruner.num_samples, dtype=torch.bool)
        kept[pruner.global_indices] = True
        seen = pruner.visits.detach().cpu() > 0
        action = pruner.noise_actions.detach().cpu()
        eligible = seen & (action != EXCLUDE) & torch.isfinite(prio)
        threshold = math.nan
        if record["policy"] == "infobatch" and eligible.any():
            threshold = float(prio[eligible].double().mean())
        elif record["policy"] == "topk" and (eligible & kept).any():
            threshold = float(prio[eligible & kept].min())
        same = bool(torch.equal(prio[seen], scores[seen]))
        return cls(epoch=int(record["epoch"]), policy=str(record["policy"]), priority=prio.numpy().astype(np.float32),
                   kept=kept.numpy(), seen=seen.numpy(), action=action.numpy().astype(np.int8), threshold=threshold,
                   drop_prob=float(record.get("drop_prob", 0.0)), priority_is_score=same)

    @property
    def status(self) -> np.ndarray:
        """int8 per sample: KEPT, PRUNED, DOWN_WEIGHTED, EXCLUDED, RELABELED or UNSEEN (see ``STATUS_NAMES``)."""
        s = np.where(self.kept, KEPT, PRUNED).astype(np.int8)
        s[~self.seen] = UNSEEN
        s[self.action == DOWNWEIGHT] = DOWN_WEIGHTED
        s[self.action == EXCLUDE] = EXCLUDED
        s[self.action == RELABEL] = RELABELED
        return s

    def save(self, path: Path) -> Path:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays["policy"] = _strings([self.policy])
        arrays["format"] = np.int64(FORMAT)
        _save_npz(path, arrays)
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> SelectionRecord:
        z = _load_npz(path, "the run's record of its last pruned selection")
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in z]
        if missing:
            raise ValueError(f"{str(path)!r} is not a selection record of fastprune train: it lacks {missing}")
        values = {k: z[k] for k in names}
        values.update(policy=_unstrings(z["policy"], 1)[0], epoch=int(values["epoch"]),
                      threshold=float(values["threshold"]), drop_prob=float(values["drop_prob"]),
                      priority_is_score=bool(values["priority_is_score"]))
        n = values["priority"].shape[0]
        if any(values[k].shape != (n,) for k in ("kept", "seen", "action")):
            raise ValueError(f"{str(path)!r} is damaged: its columns do not have {n} rows each")
        return cls(**values)


def record_selection(pruner, out: Path, epochs: int, replace: bool = False) -> bool:
    """After ``next_epoch()``: write ``selection.npz`` when the new epoch will be trained and its selection
    pruned (or nothing that pruned has been recorded yet), so that the file ends as the last pruned
    selection of the run.  ``replace`` writes whatever is there (a new run's first selection).  Returns
    whether it wrote."""
    record = pruner.history[-1]
    if record["epoch"] >= epochs:
        return False
    path = Path(out) / SELECTION_FILE
    if record["policy"] == "full" and path.exists() and not replace:
        try:
            if SelectionRecord.load(path).policy != "full":
                return False  # keep the last selection that pruned
        except (OSError, ValueError):
            pass
    SelectionRecord.from_pruner(pruner).save(path)
    return True
