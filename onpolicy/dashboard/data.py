"""Runs: what the dashboard plots, read from what training runs write.

A *run* merges up to three sources into one table of steps (the canonical keys
of :mod:`.metrics`, one row per optimizer step):

- ``metrics.jsonl`` — the onpolicy recipe's per-step lines (docs/metrics-format.md);
- TensorBoard event files (``events.out.tfevents.*`` anywhere under the run
  dir) — what a TRL run writes with ``report_to="tensorboard"``;
- a trackio project database — what it writes with ``report_to="trackio"``.

When two sources give the same metric for the same step, ``metrics.jsonl`` wins
over TensorBoard, which wins over trackio.

Reading is incremental and never raises on bad input: each source remembers how
far it has read (a byte offset, a row id), a partly written last line is left
for the next refresh, a corrupt line is skipped and reported in
:attr:`Run.warnings`, a step written twice with another value (a resumed run)
or a negative step is reported there too, a source that cannot be read (an
``OSError``) is reported in :attr:`Run.notes` while the run's other sources
and the other runs go on, and a missing or empty run dir gives a
:attr:`Run.message`. :meth:`Run.state` tells running / stopped / finished.
Clients ask for the rows changed since a table *version* they already hold
(:meth:`Run.columns`), so keeping a 10,000-step run live costs only its new rows.
"""
from __future__ import annotations

import bisect
import math
import os
import sqlite3
import threading
import time
from pathlib import Path

from . import trackio_store
from .metrics import META_KEYS, STEP_KEYS, RunSummary, canonical_key, step_mismatch, to_float
from .sources import TFEVENTS_PREFIX, JsonlSource, ResetNeeded, TfEventsSource, TrackioSource
from .tokens import TOKEN_FILE_RE, load_token_file

__all__ = ["Run", "StepTable", "RunSpecError", "resolve_runs", "JsonlSource", "TfEventsSource", "TrackioSource",
           "load_token_file"]

MAX_WARNINGS = 100
STALE_S = 300.0   # a run with no write for this long is shown as stopped


class RunSpecError(ValueError):
    """What was passed cannot name a run (the message says what to pass)."""


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


# --- the merged step table ------------------------------------------------------

class StepTable:
    """Rows keyed by step, kept in step order, with a version per change set so
    a client can ask for what changed after the version it holds."""

    MAX_CHANGES = 4096

    def __init__(self):
        self.rows: dict[int, dict] = {}
        self.steps: list[int] = []
        self.prio: dict[int, dict[str, int]] = {}
        self.numeric_keys: dict[str, None] = {}     # ordered set
        self.version = 1                            # 0 is the client's "I hold nothing"
        self._changes: list[tuple[int, int | None]] = []   # (version, lowest step changed; None = all)
        self._dirty: int | None = None
        self._dirty_all = False

    def clear(self):
        self.rows.clear()
        self.steps.clear()
        self.prio.clear()
        self.numeric_keys.clear()
        self._dirty_all = True

    def upsert(self, step: int, values: dict, prio: int):
        row = self.rows.get(step)
        if row is None:
            row = self.rows[step] = {}
            if not self.steps or step > self.steps[-1]:
                self.steps.append(step)
            else:
                bisect.insort(self.steps, step)
        pr = self.prio.setdefault(step, {})
        for k, v in values.items():
            if pr.get(k, -1) <= prio:
                row[k] = v
                pr[k] = prio
        if self._dirty is None or step < self._dirty:
            self._dirty = step

    def commit(self) -> bool:
        if self._dirty is None and not self._dirty_all:
            return False
        self.version += 1
        self._changes.append((self.version, None if self._dirty_all else self._dirty))
        if len(self._changes) > self.MAX_CHANGES:
            del self._changes[: len(self._changes) - self.MAX_CHANGES]
        self._dirty, self._dirty_all = None, False
        return True

    def changed_since(self, version: int):
        """``...`` if nothing changed after ``version``, None if the client must
        reload everything, else the lowest step changed since."""
        if version == self.version:
            return ...
        if version <= 0 or version > self.version or not self._changes or self._changes[0][0] > version + 1:
            return None
        low = ...
        for v, s in reversed(self._changes):
            if v <= version:
                break
            if s is None:
                return None
            low = s if low is ... else min(low, s)
        return None if low is ... else low


def _clean(v):
    if v is None or not isinstance(v, float) or math.isfinite(v):
        return v
    return None


class Run:
    """One run of the dashboard: sources, merged table, warnings, summary."""

    min_refresh_s = 0.5
    stale_s = STALE_S

    def __init__(self, name: str, path: str, sources: list, kind: str, run_dir: Path | None = None):
        self.name = name
        self.path = path            # what the user passed (shown)
        self.run_dir = run_dir      # directory with tokens/, if any
        self.kind = kind            # "dir" | "trackio"
        self.sources = sources
        self.table = StepTable()
        self.onpolicy: bool | None = None
        self.first_mismatch: dict[int, dict] = {}
        self.lock = threading.RLock()
        self._last_refresh = 0.0
        self._summary_cache: tuple[int, RunSummary] | None = None
        self._reset_notes: list[str] = []
        self._token_steps: tuple[float, list[int]] | None = None
        self.errors: dict[int, str] = {}        # source index -> why it cannot be read now
        self._dups: dict[str, list] = {}         # source label -> [steps written twice, first few]
        self._negative: dict[str, list] = {}     # source label -> [count, first step]

    # reading
    def refresh(self, force: bool = False) -> bool:
        """Read what the sources added; True if the table changed."""
        with self.lock:
            now = time.monotonic()
            if not force and now - self._last_refresh < self.min_refresh_s:
                return False
            self._last_refresh = now
            try:
                self._read_all()
            except ResetNeeded as e:
                self._reset_notes.append(f"{e}: re-read from the start")
                for s in self.sources:
                    s.reset()
                self.table.clear()
                self.first_mismatch.clear()
                self._dups.clear()
                self._negative.clear()
                self.onpolicy = None
                self._read_all()
            return self.table.commit()

    def _read_all(self):
        for i, src in enumerate(self.sources):
            try:
                got = src.read_new()
            except ResetNeeded:
                raise
            except OSError as e:   # one unreadable file: this source waits, the rest goes on
                what = getattr(src, "path", None) or getattr(src, "root", None) or src.label
                self.errors[i] = (f"cannot read {what}: {e.strerror or e} ({type(e).__name__}); "
                                  "retrying on every refresh")
                continue
            self.errors.pop(i, None)
            for step, obj in got:
                if step < 0:
                    n = self._negative.setdefault(src.label, [0, step])
                    n[0] += 1
                    continue
                self._ingest(step, obj, src.prio, src.label)

    def _ingest(self, step: int, obj: dict, prio: int, label: str = ""):
        values = {}
        for k, v in obj.items():
            if k in META_KEYS or k in STEP_KEYS:
                if k == "time":
                    f = to_float(v)
                    if f is not None:
                        values["time"] = f
                elif k == "onpolicy" and isinstance(v, bool):
                    self.onpolicy = v
                elif k == "first_mismatch":
                    values["first_mismatch"] = v
                    if isinstance(v, dict):
                        self.first_mismatch[step] = v
                    else:
                        self.first_mismatch.pop(step, None)
                continue
            f = to_float(v)
            if f is None:
                continue
            ck = canonical_key(k)
            values[ck] = f
            if ck not in self.table.numeric_keys:
                self.table.numeric_keys[ck] = None
        pr = self.table.prio.get(step)
        if pr:   # the same source wrote this step before: a resumed run? The later value wins; say so
            row = self.table.rows[step]
            if any(pr.get(k) == prio and k != "time" and not _same(row.get(k), v) for k, v in values.items()):
                d = self._dups.setdefault(label, [0, []])
                d[0] += 1
                if len(d[1]) < 5:
                    d[1].append(step)
        self.table.upsert(step, values, prio)

    # what the page shows
    @property
    def version(self) -> int:
        return self.table.version

    @property
    def warnings(self) -> list[str]:
        ws = list(self._reset_notes)
        for s in self.sources:
            ws += s.warnings
        for label, (n, first) in self._dups.items():
            steps = ", ".join(map(str, first)) + (", ..." if n > len(first) else "")
            ws.append(f"{label}: {n} step{'s' if n != 1 else ''} written again with other values (step "
                      f"{steps}; a resumed or restarted run?): the later value is shown")
        for label, (n, first) in self._negative.items():
            ws.append(f"{label}: {n} record{'s' if n != 1 else ''} with a negative step (first: {first}); skipped")
        if len(ws) > MAX_WARNINGS:
            ws = ws[:MAX_WARNINGS] + [f"... and {len(ws) - MAX_WARNINGS} more warnings"]
        return ws

    @property
    def notes(self) -> list[str]:
        """Transient conditions (cleared when they go away)."""
        out = []
        for k, n in self.summary().nonfinite.items():
            out.append(f"{k} is NaN or infinite at {n} step{'s' if n != 1 else ''}: those points are not plotted "
                       "(a NaN mismatch metric counts as a mismatch)")
        for s in self.sources:
            if isinstance(s, JsonlSource) and s.partial_line:
                out.append(f"{s.path.name} line {s.partial_line} is incomplete (being written, or the writer "
                           "stopped mid-line); it is read once it is complete")
        out += self.errors.values()
        return out

    def last_write(self) -> float | None:
        """When the run's files last changed (unix time), None before they exist."""
        ts = [t for s in self.sources if (t := s.mtime()) is not None]
        return max(ts) if ts else None

    def finished(self) -> float | None:
        """The time of the trainer's end record (``{"event": "finished"}`` after the
        last step in metrics.jsonl), None if there is none."""
        for s in self.sources:
            if isinstance(s, JsonlSource) and s.finished is not None:
                return s.finished
        return None

    def state(self, now: float | None = None) -> str:
        """"finished" (end record written), "running" (a write in the last
        ``stale_s`` seconds), "stopped" (no write since), "waiting" (no files yet)."""
        if self.finished() is not None:
            return "finished"
        lw = self.last_write()
        if lw is None:
            return "waiting"
        return "running" if (now if now is not None else time.time()) - lw < self.stale_s else "stopped"

    @property
    def message(self) -> str | None:
        """Why there is nothing to plot, when there is nothing."""
        if self.table.steps:
            return None
        if self.errors:
            return "; ".join(self.errors.values())
        if self.kind == "dir":
            p = Path(self.path)
            if not p.exists():
                return f"Run directory {self.path} does not exist (yet). Waiting for it to appear."
            if not p.is_dir():
                return f"{self.path} is not a directory."
            if not any(s.exists() for s in self.sources):
                return (f"No metrics in {self.path} yet: expected metrics.jsonl, TensorBoard event files "
                        "(events.out.tfevents.*) or a trackio database. Waiting for the run to write them.")
            return f"{self.path}: metrics files found but no complete step yet."
        src = self.sources[0]
        if not src.exists():
            return f"trackio database {src.reader.db} does not exist (yet)."
        return f"trackio run {src.reader.run_name!r} has no steps yet."

    def sources_label(self) -> list[str]:
        return [s.label for s in self.sources if s.exists()]

    def summary(self) -> RunSummary:
        with self.lock:
            v = self.table.version
            if self._summary_cache and self._summary_cache[0] == v:
                return self._summary_cache[1]
            t = self.table
            s = RunSummary(steps=len(t.steps))
            if t.steps:
                s.first_step, s.last_step = t.steps[0], t.steps[-1]
                s.last_time = t.rows[t.steps[-1]].get("time")
            worst: dict[str, tuple[float, int]] = {}
            lowest = {"bitwise_equal_frac", "is_ratio_min"}
            nonfinite: dict[str, int] = {}
            bad: dict[str, tuple[float, int]] = {}   # first NaN/inf: worse than any finite value
            for step in t.steps:
                row = t.rows[step]
                m = step_mismatch(row)
                if m is None:
                    s.unknown_steps += 1
                elif m:
                    s.mismatch_steps += 1
                    if s.first_mismatch_step is None:
                        s.first_mismatch_step = step
                else:
                    s.equal_steps += 1
                for k, val in row.items():
                    if not isinstance(val, float):
                        continue
                    if not math.isfinite(val):
                        nonfinite[k] = nonfinite.get(k, 0) + 1
                        if k not in bad:
                            bad[k] = (val, step)
                        continue
                    w = worst.get(k)
                    if w is None or (val < w[0] if k in lowest else val > w[0]):
                        worst[k] = (val, step)
                    s.last[k] = val
            worst.update(bad)
            s.worst = {k: {"value": v_, "step": st} for k, (v_, st) in worst.items()}
            s.last.pop("time", None)
            s.worst.pop("time", None)
            s.nonfinite = nonfinite
            self._summary_cache = (v, s)
            return s

    def columns(self, since_version: int = 0):
        """Rows changed after ``since_version``: None if nothing changed, else
        ``{"version", "from_step", "steps", "cols", "mismatch"}``; ``from_step``
        None means "replace everything", else "replace rows from this step on"."""
        with self.lock:
            t = self.table
            low = t.changed_since(since_version)
            if low is ...:
                return None
            i = 0 if low is None else bisect.bisect_left(t.steps, low)
            steps = t.steps[i:]
            rows = [t.rows[s] for s in steps]
            cols = {k: [_clean(r.get(k)) for r in rows] for k in t.numeric_keys}
            if any(r.get("time") is not None for r in rows):
                cols["time"] = [_clean(r.get("time")) for r in rows]
            mm = [step_mismatch(r) for r in rows]
            fm = {s: self.first_mismatch[s] for s in steps if s in self.first_mismatch}
            return {"version": t.version, "from_step": None if low is None else low, "steps": steps,
                    "cols": cols, "mismatch": [None if m is None else int(m) for m in mm],
                    "first_mismatch": fm}

    # per-token drill-down
    def token_steps(self) -> list[int]:
        if self.run_dir is None:
            return []
        now = time.monotonic()
        if self._token_steps and now - self._token_steps[0] < 1.0:
            return self._token_steps[1]
        steps = []
        d = self.run_dir / "tokens"
        try:
            with os.scandir(d) as it:
                for e in it:
                    m = TOKEN_FILE_RE.match(e.name)
                    if m:
                        steps.append(int(m.group(1)))
        except (FileNotFoundError, NotADirectoryError):
            pass
        steps.sort()
        self._token_steps = (now, steps)
        return steps

    def token_file(self, step: int) -> dict | None:
        """The validated per-token data of one step, or None if there is none."""
        if self.run_dir is None:
            return None
        d = self.run_dir / "tokens"
        p = d / f"step_{step:06d}.json"
        if not p.is_file():
            matches = [e for e in (os.listdir(d) if d.is_dir() else [])
                       if (m := TOKEN_FILE_RE.match(e)) and int(m.group(1)) == step]
            if not matches:
                return None
            p = d / matches[0]
        return load_token_file(p)


# --- resolving what the user passed ------------------------------------------------

def _trackio_runs(db: Path, only: str | None, label: str) -> list[Run]:
    if not db.exists():
        return [Run(f"{label}" + (f"#{only}" if only else ""), str(db),
                    [TrackioSource(db, only or "")], kind="trackio")]
    try:
        names = [only] if only else trackio_store.run_names(db)
    except sqlite3.Error as e:
        raise RunSpecError(f"{db} is not a trackio project database ({e}): pass PROJECT.db from trackio's store "
                           "($TRACKIO_DIR, default ~/.cache/huggingface/trackio) or trackio:PROJECT") from None
    return [Run(n, f"{db}#{n}", [TrackioSource(db, n)], kind="trackio") for n in names]


def resolve_runs(specs: list) -> list[Run]:
    """Runs for what was passed on the command line. Each spec is

    - a run directory (``metrics.jsonl``, ``tokens/``, TensorBoard event files
      anywhere below, and/or trackio databases ``*.db`` directly inside it);
    - a trackio database file ``PROJECT.db`` (every run in it), or
      ``PROJECT.db#RUN`` for one run;
    - ``trackio:PROJECT`` or ``trackio:PROJECT#RUN``: the project in trackio's
      local store (``$TRACKIO_DIR`` or ``$HF_HOME/trackio``);
    - a run's ``metrics.jsonl`` or one of its ``events.out.tfevents.*`` files:
      the directory that holds it.

    Any other file raises :class:`RunSpecError`, whose message says what to pass.
    """
    runs: list[Run] = []
    for spec in specs:
        s = str(spec)
        only = None
        if s.startswith("trackio:"):
            proj = s[len("trackio:"):]
            if "#" in proj:
                proj, only = proj.split("#", 1)
            runs += _trackio_runs(trackio_store.trackio_dir() / f"{proj}.db", only, proj)
            continue
        base, _, frag = s.partition("#")
        if base.endswith(".db") and (frag or Path(base).is_file()):
            runs += _trackio_runs(Path(base), frag or None, Path(base).stem)
            continue
        p = Path(s).expanduser()
        if p.exists() and not p.is_dir():
            if p.name == "metrics.jsonl" or p.name.startswith(TFEVENTS_PREFIX):
                p = p.parent                            # the run directory that holds it
            else:
                raise RunSpecError(
                    f"{s} is a file, not a run directory: pass the directory that holds metrics.jsonl or "
                    "TensorBoard event files (events.out.tfevents.*), a trackio PROJECT.db, or trackio:PROJECT")
        sources: list = [JsonlSource(p / "metrics.jsonl"), TfEventsSource(p)]
        extra: list[Run] = []
        if p.is_dir():
            dbs = sorted(p.glob("*.db")) + sorted(p.glob("trackio/*.db"))
            for db in dbs:
                if not trackio_store.is_trackio_db(db):
                    continue
                names = trackio_store.run_names(db)
                if len(names) == 1:
                    sources.append(TrackioSource(db, names[0]))
                else:
                    extra += [Run(n, f"{db}#{n}", [TrackioSource(db, n)], kind="trackio") for n in names]
        name = p.name or str(p.resolve().name or p)
        runs.append(Run(name, str(p), sources, kind="dir", run_dir=p))
        runs += extra
    # unique names
    seen: dict[str, int] = {}
    for r in runs:
        if r.name in seen:
            seen[r.name] += 1
            parent = Path(r.path).parent.name
            r.name = f"{parent}/{r.name}" if parent and f"{parent}/{r.name}" not in seen else f"{r.name} ({seen[r.name]})"
        seen.setdefault(r.name, 1)
    for r in runs:
        r.refresh(force=True)
        r.summary()
    return runs
