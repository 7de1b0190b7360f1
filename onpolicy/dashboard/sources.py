"""The sources a run reads, each incrementally and without raising on bad input:

- :class:`JsonlSource` — the recipe's ``metrics.jsonl`` (byte offset; a partly written
  last line waits, a corrupt line is skipped with a warning);
- :class:`TfEventsSource` — every TensorBoard event file under a directory;
- :class:`TrackioSource` — one run of a trackio project database (row id).

``read_new()`` returns ``[(step, {name: value})]`` for what was added since the
last call, or raises :class:`ResetNeeded` when a file was replaced or truncated;
an ``OSError`` (a file that cannot be read) is left to the run, which reports it
for this source alone. ``mtime()`` is the last time the source's files changed
(None before they exist): the run's running / stopped state.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from . import trackio_store
from .jsonio import JSONError, loads
from .metrics import STEP_KEYS
from .tfevents import EventFileReader

TFEVENTS_PREFIX = "events.out.tfevents."
PRIO_JSONL, PRIO_TFEVENTS, PRIO_TRACKIO = 2, 1, 0


class ResetNeeded(Exception):
    """A source's file was replaced or truncated: the run must be re-read."""


class JsonlSource:
    """The recipe's ``metrics.jsonl``, read from the last consumed byte on."""

    prio = PRIO_JSONL

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.lineno = 0
        self.partial_line: int | None = None   # line number of an unterminated, unparsable tail
        self._ident = None
        self._swallow_newline = False          # tail consumed before its newline arrived
        self.warnings: list[str] = []
        self.finished: float | None = None     # time of the end record ({"event": "finished"}), if last
        self._mtime: float | None = None

    @property
    def label(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_file()

    def mtime(self) -> float | None:
        return self._mtime

    def reset(self):
        self.__init__(self.path)

    def _warn(self, msg):
        self.warnings.append(f"{self.path.name} {msg}")

    def read_new(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.offset:
                raise ResetNeeded(f"{self.path.name} disappeared")
            return []
        ident = (st.st_ino, st.st_dev)
        if self._ident is not None and (ident != self._ident or st.st_size < self.offset):
            raise ResetNeeded(f"{self.path.name} was replaced or truncated")
        self._ident = ident
        self._mtime = st.st_mtime
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            buf = fh.read(st.st_size - self.offset)
        out = []
        start = 0
        if self._swallow_newline and buf.startswith(b"\n"):
            start = 1
        self._swallow_newline = False
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            self.lineno += 1
            self._parse(buf[start:nl], out, complete=True)
            start = nl + 1
        self.partial_line = None
        tail = buf[start:]
        if tail.strip():
            if self._parse(tail, out, complete=False):
                start = len(buf)
                self._swallow_newline = True
            else:
                self.partial_line = self.lineno + 1
        elif tail:
            start = len(buf)
        self.offset += start
        return out

    def _parse(self, line: bytes, out: list, complete: bool) -> bool:
        line = line.strip()
        if not line:
            return True
        if b"\0" in line:
            if complete:
                self._warn(f"line {self.lineno}: contains NUL bytes (the file was cut short or zero-filled, "
                           "e.g. by a crash or a full disk); skipped")
            return False
        try:
            obj = loads(line)
        except JSONError as e:
            if complete:
                self._warn(f"line {self.lineno}: not valid JSON ({str(e).splitlines()[0][:80]}); skipped")
            return False
        if not complete:
            self.lineno += 1
        if not isinstance(obj, dict):
            self._warn(f"line {self.lineno}: not a JSON object; skipped")
            return True
        step = None
        for k in STEP_KEYS:
            v = obj.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                if v != int(v):
                    self._warn(f"line {self.lineno}: step {v!r} is not an integer; skipped")
                    return True
                step = int(v)
                break
        if step is None:
            if obj.get("event") == "finished":        # the trainer's end record
                t = obj.get("time")
                self.finished = float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0
                return True
            self._warn(f"line {self.lineno}: no integer 'step'; skipped")
            return True
        if step < 0:
            self._warn(f"line {self.lineno}: negative step {step}; skipped")
            return True
        self.finished = None                            # steps after an end record: the run went on
        out.append((step, obj))
        return True


class TfEventsSource:
    """Every TensorBoard event file under a directory (TRL writes them to
    ``<output_dir>/runs/<date>_<host>/``); new files are picked up as they appear."""

    prio = PRIO_TFEVENTS
    rescan_s = 3.0

    def __init__(self, root: Path):
        self.root = Path(root)
        self.readers: dict[str, EventFileReader] = {}
        self._last_scan = 0.0

    @property
    def label(self) -> str:
        n = len(self.readers)
        return f"TensorBoard ({n} event file{'s' if n != 1 else ''})"

    def exists(self) -> bool:
        return bool(self.readers)

    def reset(self):
        self.readers.clear()
        self._last_scan = 0.0

    @property
    def warnings(self):
        return [w for r in self.readers.values() for w in r.warnings]

    def mtime(self) -> float | None:
        ts = [r.mtime for r in self.readers.values() if r.mtime is not None]
        return max(ts) if ts else None

    def _scan(self):
        if not self.root.is_dir():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "tokens"
                           and not d.startswith("checkpoint-")]
            found += [os.path.join(dirpath, f) for f in filenames if f.startswith(TFEVENTS_PREFIX)]
        for p in sorted(found):   # names carry the creation time: older files first, later ones win
            if p not in self.readers:
                self.readers[p] = EventFileReader(p)

    def read_new(self):
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_s:
            self._scan()
            self._last_scan = now
        out = []
        for r in self.readers.values():
            before = r.records
            for wall, step, scalars in r.read_new():
                if scalars:
                    out.append((step, {"time": wall, **scalars}))
            if r.records < before:
                raise ResetNeeded(f"{os.path.basename(r.path)} was replaced or truncated")
        return out


class TrackioSource:
    prio = PRIO_TRACKIO

    def __init__(self, db: Path, run_name: str):
        self.reader = trackio_store.TrackioRunReader(db, run_name)

    @property
    def label(self) -> str:
        return f"trackio {self.reader.db.name}:{self.reader.run_name}"

    @property
    def warnings(self):
        return self.reader.warnings

    def exists(self) -> bool:
        return self.reader.db.exists()

    def mtime(self) -> float | None:
        ts = []
        for p in (self.reader.db, self.reader.db.with_name(self.reader.db.name + "-wal")):
            try:
                ts.append(os.stat(p).st_mtime)
            except OSError:
                pass
        return max(ts) if ts else None

    def reset(self):
        self.reader = trackio_store.TrackioRunReader(self.reader.db, self.reader.run_name)

    def read_new(self):
        return [(step, {"time": t, **m}) for t, step, m in self.reader.read_new()]
