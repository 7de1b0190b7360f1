"""Append-only run log: metrics.jsonl plus bounded per-token samples (docs/metrics-format.md).

A run directory holds one run. `RunLog.open` follows Transformers' output-dir conventions:
a directory with an earlier run's records (metrics.jsonl, tokens/, TensorBoard event files)
is refused unless told to overwrite (the records are removed) or resuming from a checkpoint
(the records after the checkpoint's step are dropped; the run continues after it).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

MAX_SAMPLES = 8  # sequences kept per step for the dashboard's drill-down
EVENTS_GLOB = "events.out.tfevents.*"


class RunDirError(ValueError):
    """The run directory holds an earlier run's records."""


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def checkpoint_step(checkpoint) -> int:
    """The global step a Transformers checkpoint directory was saved at (trainer_state.json)."""
    path = Path(checkpoint) / "trainer_state.json"
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read the step of checkpoint {checkpoint} ({path}: {e})") from None


def earlier_records(run_dir) -> list[str]:
    """What in `run_dir` belongs to an earlier run (relative paths; empty when none)."""
    d = Path(run_dir)
    out = []
    if (d / "metrics.jsonl").exists():
        out.append("metrics.jsonl")
    if (d / "tokens").is_dir() and any((d / "tokens").iterdir()):
        out.append("tokens/")
    events = sorted(d.rglob(EVENTS_GLOB)) if d.is_dir() else []
    if events:
        out.append(f"{len(events)} TensorBoard event file(s) ({events[0].relative_to(d)}...)")
    return out


def check_run_dir(run_dir, overwrite: bool = False) -> list[str]:
    """RunDirError unless `run_dir` is free for a new run (or `overwrite`); returns the earlier records found.
    Read-only: every process of a run can call it and reach the same verdict."""
    d = Path(run_dir)
    found = earlier_records(d)
    if found and not overwrite:
        raise RunDirError(f"run directory {d} already holds an earlier run's records ({', '.join(found)}); a "
                          "second run would mix its steps with them. Choose a new run directory, resume with "
                          "train(resume_from_checkpoint=...), or pass overwrite_run_dir=True (the recipe: "
                          "--overwrite_run_dir true) to remove them")
    return found


class RunLog:
    def __init__(self, run_dir, max_samples: int = MAX_SAMPLES):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tokens").mkdir(exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.max_samples = max_samples

    @classmethod
    def open(cls, run_dir, overwrite: bool = False, resume_step: Optional[int] = None,
             max_samples: int = MAX_SAMPLES) -> "RunLog":
        """The run log of a new run (refusing, or with overwrite removing, an earlier run's records), or of
        a run resumed at `resume_step` (keeping the records up to that step, dropping those after it)."""
        d = Path(run_dir)
        if resume_step is not None:
            log = cls(d, max_samples)
            log.truncate_after(resume_step)
            return log
        found = check_run_dir(d, overwrite)
        if found:
            (d / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(d / "tokens", ignore_errors=True)
            for ev in [*d.rglob(EVENTS_GLOB), *d.glob("engine_step*.json")]:
                ev.unlink()
        return cls(d, max_samples)

    def write_engine_report(self, step: int, report) -> Path:
        """What the sampler's engine ran when step `step` mismatched (onpolicy.vllm_plugin.diagnostics)."""
        path = self.dir / f"engine_step{step}.json"
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        return path

    def finish(self) -> None:
        """The end record, `{"event": "finished", "time": ...}`: the run ended (the dashboard shows it
        finished rather than stopped). Steps written after it (a resumed run) reopen the run."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": "finished", "time": time.time()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step`, and the end record (a resumed run redoes them)."""
        if self.path.exists():
            keep = [r for r in read_steps(self.path, later_passes=True) if r["step"] <= step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            tmp.rename(self.path)
        for f in (self.dir / "tokens").glob("step_*.json"):
            try:
                n = int(f.stem.removeprefix("step_"))
            except ValueError:
                continue
            if n > step:
                f.unlink()

    def log_step(self, step: int, metrics: dict, samples: Optional[list] = None) -> None:
        rec = {"step": int(step), "time": time.time(), **_clean(metrics)}
        with open(self.path, "a") as f:  # one write of one line: readers never see half a record
            f.write(json.dumps(rec) + "\n")
        if samples:
            tmp = self.dir / "tokens" / f".step_{step:06d}.json.tmp"
            tmp.write_text(json.dumps({"step": int(step), "samples": _clean(samples[: self.max_samples])}))
            tmp.rename(self.dir / "tokens" / f"step_{step:06d}.json")


def read_steps(path, later_passes: bool = False) -> list[dict]:
    """The step records of a metrics.jsonl, in order (the end record and other events left out).

    With num_iterations > 1 a generation's later optimisation passes (off-policy by design) have records
    of their own (`pass` >= 2, `offpolicy_*` metrics); they are left out unless later_passes."""
    rows = [r for r in (json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()) if "step" in r]
    return rows if later_passes else [r for r in rows if r.get("pass", 1) == 1]
