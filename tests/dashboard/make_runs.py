"""Recorded runs for the dashboard tests (and for trying the dashboard out).

Writes, deterministically from a seed:

- an onpolicy recipe run: ``metrics.jsonl`` + ``tokens/step_*.json``, either
  bitwise on-policy (every logprob pair equal, so every mismatch metric is
  exactly 0 / 1) or with a sampler/trainer mismatch;
- a plain TRL GRPO run as TensorBoard event files, with the tags transformers'
  TensorBoardCallback writes (``train/`` + TRL's metric names; values float32);
- a plain TRL GRPO run in a trackio project database, as TrackioCallback writes
  it (trackio's own step counter, ``train/global_step`` in every row).

The event-file writer here is independent of the reader under test except for
the shared CRC helper; tests also cross-check the reader against tensorboardX.
Each writer returns the truth it wrote: ``{step: {canonical_key: value}}``.

    python tests/dashboard/make_runs.py OUT_DIR [--steps 300]
"""
from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import struct
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path

from onpolicy.dashboard.tfevents import masked_crc32c

T0 = 1_764_244_800.0  # 2025-11-27 12:00 UTC: fixed so files are reproducible

TEXTS = [
    "Natalia sold 48 clips in April and half as many in May, so 48 / 2 = 24 in May. "
    "Altogether she sold 48 + 24 = 72 clips.\nThe answer is 72.",
    "Weng earns 12 / 60 = 0.2 dollars per minute. For 50 minutes of babysitting she earned "
    "0.2 * 50 = 10 dollars.\nThe answer is 10.",
    "Betty has half of the 100 dollars she needs, which is 50. Her parents give her 15 and her "
    "grandparents twice as much, 30. She still needs 100 - 50 - 15 - 30 = 5 dollars.\nThe answer is 5.",
    "Julie read 12 pages yesterday and 2 * 12 = 24 today, 36 in all. 120 - 36 = 84 pages remain, "
    "and half of them is 84 / 2 = 42.\nThe answer is 42.",
]


def tokenize(text: str) -> list[str]:
    """Word-piece-like tokens with leading spaces, as a BPE tokenizer shows them."""
    return re.findall(r"\n| ?[A-Za-z]+| ?\d| ?[^\sA-Za-z\d]", text)


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --- per-token data and the step metrics computed from it ------------------------

def _token_logps(rng: random.Random, n: int) -> list[float]:
    out = []
    for _ in range(n):
        u = rng.random()
        out.append(0.0 if u < 0.25 else f32(-rng.expovariate(6.0) if u < 0.9 else -rng.uniform(0.5, 4.0)))
    return out


def _trainer_logps(rng: random.Random, sampler: list[float], drift: float) -> list[float]:
    """Sampler logprobs as seen by a trainer whose kernels differ: confident
    tokens often stay equal, the others move by log-uniformly spread amounts
    (mostly 1e-4..1e-2, a few up to ~10 x drift)."""
    out = []
    for a in sampler:
        if a == 0.0 and rng.random() < 0.7:
            out.append(a)
            continue
        mag = drift * 10 ** rng.uniform(-3.0, 0.0) * (8.0 if rng.random() < 0.02 else 1.0)
        out.append(f32(min(0.0, a + (mag if rng.random() < 0.5 else -mag))))
    return out


def step_metrics(pairs: list[tuple[float, float]]) -> dict:
    """The recipe's per-step mismatch metrics over (sampler, trainer) logprob pairs."""
    n = len(pairs)
    d = [b - a for a, b in pairs]                      # log r, r = p_trainer / p_sampler
    r = [math.exp(x) for x in d]
    return {
        "tokens": n,
        "bitwise_equal_frac": sum(1 for a, b in pairs if a == b) / n,
        "logp_abs_diff_mean": sum(abs(x) for x in d) / n,
        "logp_abs_diff_max": max(abs(x) for x in d),
        "kl_k1": sum(-x for x in d) / n,
        "kl_k3": sum(ri - 1.0 - x for ri, x in zip(r, d)) / n,
        "is_ratio_min": min(r), "is_ratio_mean": sum(r) / n, "is_ratio_max": max(r),
    }


def _first_mismatch(samples) -> dict | None:
    for s in samples:
        for j, (a, b) in enumerate(zip(s["sampler_logp"], s["trainer_logp"])):
            if a != b:
                return {"seq": s["seq"], "pos": j, "sampler": a, "trainer": b}
    return None


def _tokens(step: int, steps: int, rng: random.Random) -> int:
    """Completion tokens of a step: 64 completions growing longer as the policy learns."""
    return int(64 * (150 + 90 * (1 - math.exp(-3.0 * step / max(steps, 1))) + rng.gauss(0, 6)))


def reward_curve(step: int, steps: int, rng: random.Random, lag: float = 0.0) -> tuple[float, float]:
    x = step / max(steps, 1)
    mean = 0.18 + 0.62 * (1 - math.exp(-4.0 * x)) - lag * x + rng.gauss(0, 0.035)
    return min(1.0, max(0.0, mean)), 0.25 + 0.1 * rng.random()


# --- the onpolicy recipe's run directory ------------------------------------------

def write_onpolicy_run(run_dir: Path, steps: int = 200, seed: int = 0, mismatch: bool = False,
                       token_every: int = 10, samples_per_step: int = 4, drift: float = 0.02,
                       tail: str | None = None) -> dict[int, dict]:
    """metrics.jsonl (+ tokens/ every ``token_every`` steps). With
    ``mismatch=False`` trainer logprobs are the sampler's, bit for bit. Steps
    with a token file get metrics computed from those tokens (so the drill-down
    and the charts agree); the others get cheap synthetic ones of the same kind.
    ``tail`` is appended raw after the last line (e.g. a partly written line)."""
    run_dir = Path(run_dir)
    (run_dir / "tokens").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    truth: dict[int, dict] = {}
    lines = []
    for step in range(1, steps + 1):
        samples = None
        if token_every and (step % token_every == 0 or step == 1):
            samples = []
            for i in range(samples_per_step):
                toks = tokenize(TEXTS[(step + i) % len(TEXTS)])
                a = _token_logps(rng, len(toks))
                b = _trainer_logps(rng, a, drift * (1 + step / steps)) if mismatch else list(a)
                samples.append({"seq": i, "text": toks, "token_ids": [1000 + zlib.crc32(t.encode()) % 30000 for t in toks],
                                "sampler_logp": a, "trainer_logp": b, "reward": float(rng.random() < 0.6)})
            pairs = [(x, y) for s in samples for x, y in zip(s["sampler_logp"], s["trainer_logp"])]
            m = step_metrics(pairs)   # the sampled sequences stand in for the whole step...
            m["tokens"] = _tokens(step, steps, rng)   # ...of which they are a part
            fm = _first_mismatch(samples)
        elif mismatch:
            scale = drift * (1 + step / steps) * (0.8 + 0.4 * rng.random())
            mx = scale * (2 + 6 * rng.random())
            k3 = 0.05 * scale * scale
            m = {"tokens": _tokens(step, steps, rng), "bitwise_equal_frac": 0.15 + 0.05 * rng.random(),
                 "logp_abs_diff_mean": 0.15 * scale, "logp_abs_diff_max": mx,
                 "kl_k1": k3 * rng.gauss(1, 0.3), "kl_k3": k3,
                 "is_ratio_min": math.exp(-mx * rng.uniform(0.5, 1.0)), "is_ratio_mean": 1 + k3 * rng.gauss(0, 1),
                 "is_ratio_max": math.exp(mx * rng.uniform(0.5, 1.0))}
            fm = {"seq": 0, "pos": rng.randrange(40), "sampler": -0.25, "trainer": -0.2509765625}
        else:
            m = {"tokens": _tokens(step, steps, rng), "bitwise_equal_frac": 1.0, "logp_abs_diff_mean": 0.0,
                 "logp_abs_diff_max": 0.0, "kl_k1": 0.0, "kl_k3": 0.0, "is_ratio_min": 1.0,
                 "is_ratio_mean": 1.0, "is_ratio_max": 1.0}
            fm = None
        rm, rs = reward_curve(step, steps, rng)
        row = {"step": step, "time": T0 + 11.5 * step, "onpolicy": not mismatch, **m,
               "reward_mean": rm, "reward_std": rs, "first_mismatch": fm,
               "step_time": 11.0 + rng.random()}
        truth[step] = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        truth[step]["first_mismatch"] = fm
        lines.append(json.dumps(row))
        if samples is not None:
            (run_dir / "tokens" / f"step_{step:06d}.json").write_text(json.dumps({"step": step, "samples": samples}))
    with open(run_dir / "metrics.jsonl", "w") as fh:
        fh.write("\n".join(lines) + "\n")
        if tail:
            fh.write(tail)
    return truth


# --- TensorBoard event files, written by hand -------------------------------------

def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wt: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wt)
    return key + (_varint(len(payload)) + payload if wt == 2 else payload)


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    ev = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        ev += _field(3, 2, file_version.encode())
    if scalars:
        summ = b"".join(_field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                        for tag, v in scalars.items())
        ev += _field(5, 2, summ)
    return ev


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def write_tfevents(path: Path, events: list[tuple[float, int, dict]]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(tfrecord(encode_event(T0, 0, file_version="brain.Event:2")))
        for wall, step, scalars in events:
            fh.write(tfrecord(encode_event(wall, step, scalars)))


TRL_TAGS = {  # transformers' rewrite_logs adds "train/" to TRL's names
    "logp_abs_diff_mean": "train/sampling/sampling_logp_difference/mean",
    "logp_abs_diff_max": "train/sampling/sampling_logp_difference/max",
    "is_ratio_min": "train/sampling/importance_sampling_ratio/min",
    "is_ratio_mean": "train/sampling/importance_sampling_ratio/mean",
    "is_ratio_max": "train/sampling/importance_sampling_ratio/max",
    "reward_mean": "train/reward",
    "reward_std": "train/reward_std",
}


def trl_logs(steps: int, seed: int, every: int = 1) -> list[tuple[int, dict]]:
    """What a plain TRL GRPO run (vLLM colocate, importance-sampling correction
    on, bf16) logs every ``every`` steps: (global_step, logs with TRL's names)."""
    rng = random.Random(seed)
    out = []
    for step in range(every, steps + 1, every):
        x = step / steps
        mean = 0.011 * (1 + 1.5 * x) * (0.85 + 0.3 * rng.random())
        spike = 4.0 if rng.random() < 0.02 else 1.0
        rm, rs = reward_curve(step, steps, rng, lag=0.12)
        logs = {
            "loss": 0.01 * rng.gauss(0, 1), "grad_norm": 0.3 + 0.2 * rng.random(),
            "learning_rate": 1e-6 * (1 - x), "num_tokens": 4096.0 * step,
            "completions/mean_length": 180 + 40 * rng.random(),
            "reward": rm, "reward_std": rs, "frac_reward_zero_std": 0.1 * rng.random(),
            "kl": 0.0, "entropy": 0.45 - 0.1 * x + 0.02 * rng.random(),
            "sampling/sampling_logp_difference/mean": mean,
            "sampling/sampling_logp_difference/max": mean * (25 + 20 * rng.random()) * spike,
            "sampling/importance_sampling_ratio/min": math.exp(-mean * (18 + 8 * rng.random()) * spike),
            "sampling/importance_sampling_ratio/mean": 1.0 + mean * rng.gauss(0.0, 0.05),
            "sampling/importance_sampling_ratio/max": min(2.0, math.exp(mean * (18 + 8 * rng.random()) * spike)),
            "epoch": x,
        }
        out.append((step, logs))
    return out


def _truth_from_logs(logs: list[tuple[int, dict]], rounding) -> dict[int, dict]:
    inv = {v[len("train/"):]: k for k, v in TRL_TAGS.items()}
    return {step: {inv[k]: rounding(v) for k, v in d.items() if k in inv} for step, d in logs}


def write_trl_tensorboard_run(run_dir: Path, steps: int = 200, seed: int = 1, every: int = 1) -> dict[int, dict]:
    """A TRL run's output_dir with TensorBoard logs under runs/<date>_<host>/.
    TensorBoard stores scalars as float32; the truth is float32-rounded."""
    logs = trl_logs(steps, seed, every)
    events = [(T0 + 12.0 * step, step, {"train/" + k: v for k, v in d.items()}) for step, d in logs]
    write_tfevents(Path(run_dir) / "runs" / "Nov27_12-00-00_gpu-node" /
                   "events.out.tfevents.1764244800.gpu-node.4242.0", events)
    (Path(run_dir) / "checkpoint-100").mkdir(parents=True, exist_ok=True)
    return _truth_from_logs(logs, f32)


# --- trackio's local store -------------------------------------------------------

TRACKIO_SCHEMA = """
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, timestamp TEXT NOT NULL,
    run_name TEXT NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL, log_id TEXT, space_id TEXT);
CREATE TABLE IF NOT EXISTS configs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, run_name TEXT NOT NULL,
    config TEXT NOT NULL, created_at TEXT NOT NULL, UNIQUE(run_id));
"""


def _trackio_json(d: dict) -> str:
    def enc(v):
        if isinstance(v, float) and not math.isfinite(v):
            return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return v
    return json.dumps({k: enc(v) for k, v in d.items()})


def write_trl_trackio_run(db: Path, run_name: str, steps: int = 200, seed: int = 2, every: int = 1,
                          eval_every: int = 0) -> dict[int, dict]:
    """Append a TRL run to a trackio project database as TrackioCallback logs it:
    one row per log call, trackio's own 0-based step counter, ``train/`` names
    and ``train/global_step``; optional evaluation rows (no global step)."""
    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.executescript(TRACKIO_SCHEMA)
    conn.execute("PRAGMA journal_mode = WAL")
    logs = trl_logs(steps, seed, every)
    counter = 0
    with conn:
        for step, d in logs:
            row = {"train/" + k: v for k, v in d.items()}
            row["train/global_step"] = step
            ts = datetime.fromtimestamp(T0 + 12.0 * step, timezone.utc).isoformat()
            conn.execute("INSERT INTO metrics (run_id, timestamp, run_name, step, metrics) VALUES (?,?,?,?,?)",
                         (run_name + "-id", ts, run_name, counter, _trackio_json(row)))
            counter += 1
            if eval_every and step % eval_every == 0:
                conn.execute("INSERT INTO metrics (run_id, timestamp, run_name, step, metrics) VALUES (?,?,?,?,?)",
                             (run_name + "-id", ts, run_name, counter,
                              _trackio_json({"eval/reward": 0.5, "eval/loss": 0.1})))
                counter += 1
    conn.close()
    return _truth_from_logs(logs, float)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args(argv)
    write_onpolicy_run(a.out / "qwen3-grpo-onpolicy", a.steps, seed=0, mismatch=False)
    write_onpolicy_run(a.out / "qwen3-grpo-control", a.steps, seed=3, mismatch=True)
    write_trl_tensorboard_run(a.out / "qwen3-grpo-trl", a.steps, seed=1)
    write_trl_trackio_run(a.out / "trackio" / "grpo.db", "trl-trackio", a.steps, seed=2)
    print(f"wrote runs under {a.out}")


if __name__ == "__main__":
    sys.exit(main())
