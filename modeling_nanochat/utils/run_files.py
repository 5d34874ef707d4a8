"""The files a run writes and others read: `metrics.jsonl` (one JSON object per logged step) and JSON records
(run_config.json, eval results, stage records). Pretraining, SFT and RL write metrics through `MetricsLog` (SFT and
RL via `optim/trainer_mixin.MetricsFileCallback` in their TRL trainers); reports, sweeps and publishing read them with `read_metrics` /
`read_json`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from modeling_nanochat.utils.io import atomic_write


def read_json(path, required: bool = False):
    """A run's JSON file (run_config.json, an eval result, ...), or None when it is missing or unreadable; with
    `required`, a FileNotFoundError naming the file instead."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        if required:
            raise FileNotFoundError(f"{path} is missing or unreadable ({e}): is this a finished run's directory?") \
                from e
        return None


def read_metrics(path, missing_ok: bool = False) -> list[dict]:
    """The rows of a metrics.jsonl (pretraining, SFT, RL); [] for a missing file when missing_ok."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """`<output-dir>/metrics.jsonl`: one JSON object per line, written by the main process and flushed each line.
    On resume, lines at or after the resumed step are dropped (they are recomputed, so nothing is duplicated)."""

    def __init__(self, path, enabled, truncate_from=0):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if os.path.exists(path):
            keep = [row for row in read_metrics(path) if row["step"] < truncate_from]
            atomic_write(path, "".join(json.dumps(row) + "\n" for row in keep))
        self.f = open(path, "a")

    def write(self, **record):
        if self.enabled:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
