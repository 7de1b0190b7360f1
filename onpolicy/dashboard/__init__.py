"""`onpolicy dashboard` and `onpolicy report`: per-step sampler/trainer mismatch
of training runs, for onpolicy runs (the recipe's metrics.jsonl + tokens/) and
plain TRL runs (TensorBoard event files, trackio's local store).

Imports nothing heavy (no torch): ``data`` reads runs, ``app`` serves them,
``report`` writes a self-contained HTML page and a PNG, ``cli`` holds the
command functions.
"""
from .data import Run, resolve_runs

__all__ = ["Run", "resolve_runs"]
