"""Scalars out of trackio's local SQLite store, without importing trackio.

trackio (what TRL's ``report_to="trackio"`` uses) keeps one SQLite database per
project, ``$TRACKIO_DIR/<project>.db`` (default ``$HF_HOME/trackio``, i.e.
``~/.cache/huggingface/trackio``). Its ``metrics`` table holds one row per
``trackio.log`` call: ``id`` (autoincrement), ``run_name``, ``step``,
``timestamp`` (ISO 8601) and ``metrics`` (a JSON object; non-finite floats as
the strings "NaN", "Infinity", "-Infinity"). Newer versions add ``run_id``.

trackio numbers its own steps (one per log call); transformers' TrackioCallback
adds ``train/global_step`` to every row, which is the optimizer step the other
sources use, so it wins when present.

The database is opened read-only (``mode=ro``) and read incrementally by ``id``.
"""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path


def trackio_dir() -> Path:
    if os.environ.get("TRACKIO_DIR"):
        return Path(os.environ["TRACKIO_DIR"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(hf_home) / "trackio"


def connect_ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2.0)
    return conn


def is_trackio_db(db: Path) -> bool:
    try:
        conn = connect_ro(db)
    except sqlite3.Error:
        return False
    try:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(metrics)")}
        return {"run_name", "step", "metrics"} <= cols
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def run_names(db: Path) -> list[str]:
    """Run names in a project database, in the order they first logged."""
    conn = connect_ro(db)
    try:
        rows = conn.execute("SELECT run_name, MIN(id) FROM metrics GROUP BY run_name ORDER BY 2").fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


def _timestamp(ts) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class TrackioRunReader:
    """Incremental reader of one run of a trackio project database."""

    def __init__(self, db: Path, run_name: str):
        self.db = Path(db)
        self.run_name = run_name
        self.last_id = 0
        self.warnings: list[str] = []
        self._has_global_step = False

    def read_new(self):
        """Yield (time, step, {name: value}) for rows added since the last call."""
        if not self.db.exists():
            return
        try:
            conn = connect_ro(self.db)
            try:
                rows = conn.execute(
                    "SELECT id, step, timestamp, metrics FROM metrics WHERE run_name = ? AND id > ? ORDER BY id",
                    (self.run_name, self.last_id)).fetchall()
            finally:
                conn.close()
        except sqlite3.Error as e:
            self.warnings.append(f"{self.db.name}: cannot read ({e}); will retry")
            return
        for rid, step, ts, blob in rows:
            self.last_id = rid
            try:
                metrics = json.loads(blob)
            except (TypeError, ValueError):
                self.warnings.append(f"{self.db.name} row {rid}: metrics are not valid JSON; skipped")
                continue
            if not isinstance(metrics, dict):
                continue
            gs = metrics.get("train/global_step")
            if isinstance(gs, (int, float)) and not isinstance(gs, bool):
                step = int(gs)
                self._has_global_step = True
            elif self._has_global_step:
                continue  # an evaluation row (on_predict): trackio's own counter, not a training step
            yield _timestamp(ts), int(step), metrics
