"""GPU: the tiny families through a real vLLM engine with CUDA graphs (family_check.py, one engine per
process): Qwen3, Qwen2 (q/k/v bias), Llama 3 (llama3 RoPE), tied Qwen3 -- sampler == trainer bitwise,
the unpatched trainer must not match, sampling must not be degenerate (as tests/vllm/test_families.py)."""
import os
import pathlib
import subprocess
import sys

import pytest

from _gpu_util import pytestmark, require_compiled_triton  # noqa: F401

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "vllm"))
pytest.importorskip("vllm")
from test_families import SCRIPT, _controls  # noqa: E402


@pytest.mark.parametrize("family, flags", [("qwen3", []), ("qwen2", []), ("llama", []), ("qwen3", ["--tied"])],
                         ids=["qwen3", "qwen2", "llama", "qwen3-tied"])
def test_family_bitwise_on_gpu(family, flags, tmp_path):
    import json

    require_compiled_triton()
    r = subprocess.run([sys.executable, str(SCRIPT), family, str(tmp_path), *flags], env=dict(os.environ),
                       capture_output=True, text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-4000:]
    for t, (equal, total) in json.loads(line[0][len("RESULT "):]).items():
        assert equal == total and total == 256, f"T={t}: {equal}/{total}"
    _controls(r.stdout)
