"""Per-token files of the drill-down: ``tokens/step_NNNNNN.json`` (a bounded
sample of a step's sequences with sampler and trainer logprobs), checked so
that problems become warnings, never exceptions."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .jsonio import JSONError, loads
from .metrics import to_float

MAX_TOKEN_FILE_BYTES = 32 << 20
MAX_TOKEN_SAMPLES = 64
TOKEN_FILE_RE = re.compile(r"^step_(\d+)\.json$")


def load_token_file(p: Path) -> dict:
    """Read and check one ``tokens/step_*.json``; problems become ``warnings``
    in the result rather than exceptions."""
    out = {"file": p.name, "samples": [], "warnings": []}
    size = p.stat().st_size
    if size > MAX_TOKEN_FILE_BYTES:
        out["warnings"].append(f"{p.name} is {size / 2**20:.0f} MiB, over the {MAX_TOKEN_FILE_BYTES >> 20} MiB "
                               "bound for per-token files; not loaded")
        return out
    try:
        obj = loads(p.read_bytes())
    except JSONError as e:
        out["warnings"].append(f"{p.name}: not valid JSON ({str(e).splitlines()[0][:80]}); is it still being written?")
        return out
    if not isinstance(obj, dict) or not isinstance(obj.get("samples"), list):
        out["warnings"].append(f"{p.name}: expected an object with a 'samples' list")
        return out
    out["step"] = obj.get("step")
    samples = obj["samples"]
    if len(samples) > MAX_TOKEN_SAMPLES:
        out["warnings"].append(f"{p.name}: {len(samples)} samples; showing the first {MAX_TOKEN_SAMPLES}")
        samples = samples[:MAX_TOKEN_SAMPLES]
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            out["warnings"].append(f"{p.name}: sample {i} is not an object; skipped")
            continue
        a, b = s.get("sampler_logp"), s.get("trainer_logp")
        if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
            out["warnings"].append(f"{p.name}: sample {i} needs sampler_logp and trainer_logp lists of equal "
                                   "length; skipped")
            continue
        a = [to_float(x) for x in a]
        b = [to_float(x) for x in b]
        ids = s.get("token_ids") if isinstance(s.get("token_ids"), list) else None
        text = s.get("text") if isinstance(s.get("text"), list) else None
        if text is None or len(text) != len(a):
            if text is not None:
                out["warnings"].append(f"{p.name}: sample {i}: text has {len(text)} tokens, logprobs "
                                       f"{len(a)}; showing token ids")
            text = [f"⟨{t}⟩" for t in ids] if ids and len(ids) == len(a) else [f"⟨{j}⟩" for j in range(len(a))]
        # non-finite logprobs cannot go through JSON: send them as strings
        enc = lambda v: v if v is None or math.isfinite(v) else repr(v)  # noqa: E731
        out["samples"].append({
            "seq": s.get("seq", i), "text": [str(t) for t in text], "token_ids": ids,
            "sampler_logp": [enc(x) for x in a], "trainer_logp": [enc(x) for x in b],
            "reward": to_float(s.get("reward")) if s.get("reward") is not None else None,
        })
    return out
