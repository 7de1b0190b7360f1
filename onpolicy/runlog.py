"""Append-only run log: metrics.jsonl plus bounded per-token samples (docs/metrics-format.md)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

MAX_SAMPLES = 8  # sequences kept per step for the dashboard's drill-down


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class RunLog:
    def __init__(self, run_dir, max_samples: int = MAX_SAMPLES):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tokens").mkdir(exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.max_samples = max_samples

    def log_step(self, step: int, metrics: dict, samples: Optional[list] = None) -> None:
        rec = {"step": int(step), "time": time.time(), **_clean(metrics)}
        with open(self.path, "a") as f:  # one write of one line: readers never see half a record
            f.write(json.dumps(rec) + "\n")
        if samples:
            tmp = self.dir / "tokens" / f".step_{step:06d}.json.tmp"
            tmp.write_text(json.dumps({"step": int(step), "samples": _clean(samples[: self.max_samples])}))
            tmp.rename(self.dir / "tokens" / f"step_{step:06d}.json")
