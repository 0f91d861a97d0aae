"""Reading a run folder of ``fastprune train`` back: its per-epoch records (``log.jsonl``) and its summary
(``summary.json``), with one-line errors for a folder that is not a run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"


@dataclass
class RunLog:
    """A run folder's records: one dict per finished epoch, and the summary (None while the run is unfinished)."""

    path: Path
    epochs: list[dict]
    summary: dict | None

    @property
    def finished(self) -> bool:
        return self.summary is not None


def read_run(folder) -> RunLog:
    """The records of the run in ``folder``; ``FileNotFoundError``/``ValueError`` naming the folder when it is
    missing, not a run folder (no ``log.jsonl``), has no finished epoch, or holds a damaged file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {str(folder)!r} does not exist" if not folder.exists()
                                else f"{str(folder)!r} is a file, not a run folder")
    log = folder / LOG_FILE
    if not log.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a fastprune run folder: it has no {LOG_FILE} "
                                "(fastprune train writes one line per finished epoch)")
    epochs = []
    for number, line in enumerate(log.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{str(log)!r} line {number} is not JSON: the file is damaged") from None
        if not isinstance(record, dict) or "epoch" not in record or "samples_trained" not in record:
            raise ValueError(f"{str(log)!r} line {number} is not an epoch record of fastprune train")
        epochs.append(record)
    if not epochs:
        raise ValueError(f"run {str(folder)!r} has no finished epoch yet ({LOG_FILE} is empty)")
    summary = None
    if (folder / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((folder / SUMMARY_FILE).read_text())
        except ValueError:
            raise ValueError(f"{str(folder / SUMMARY_FILE)!r} is not JSON: the file is damaged") from None
    return RunLog(path=folder, epochs=epochs, summary=summary)
