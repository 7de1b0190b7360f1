"""Qwen2 (q/k/v bias), Llama (llama3 RoPE scaling), tied-embedding Qwen3 and an eager
(uncompiled) engine: sampler == trainer bitwise. One engine per process (family_check.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("family_check.py")


@pytest.mark.parametrize("family, flags", [("qwen2", []), ("llama", []), ("qwen3", ["--tied"]),
                                           ("qwen3", ["--eager"])],
                         ids=["qwen2", "llama", "qwen3-tied", "qwen3-eager"])
def test_family_bitwise(family, flags, tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r = subprocess.run([sys.executable, str(SCRIPT), family, str(tmp_path), *flags], env=env, capture_output=True,
                       text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-4000:]
    result = json.loads(line[0][len("RESULT "):])
    print(f"\n{family} {' '.join(flags)}: " + ", ".join(f"T={t}: {e}/{n} bitwise" for t, (e, n) in result.items()))
    for t, (equal, total) in result.items():
        assert equal == total and total == 256, f"T={t}: {equal}/{total}"
