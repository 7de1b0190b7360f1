"""Qwen2 (q/k/v bias), Llama (llama3 RoPE scaling), tied-embedding Qwen3 and an eager
(uncompiled) engine: sampler == trainer bitwise. One engine per process (family_check.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm_helpers import assert_not_degenerate

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("family_check.py")


# qwen3-eager-no-entry-points: vLLM loads none of the installed plugins (VLLM_PLUGINS names
# none of them), as on the GPU machine where onpolicy is not pip-installed: only the
# in-process `enable()` path (re-classing the already-resolved platform) is left.
@pytest.mark.parametrize("family, flags, env_extra",
                         [("qwen2", [], {}), ("llama", [], {}), ("qwen3", ["--tied"], {}),
                          ("qwen3", ["--eager"], {"VLLM_PLUGINS": "no-such-plugin"})],
                         ids=["qwen2", "llama", "qwen3-tied", "qwen3-eager-no-entry-points"])
def test_family_bitwise(family, flags, env_extra, tmp_path):
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", **env_extra)
    r = subprocess.run([sys.executable, str(SCRIPT), family, str(tmp_path), *flags], env=env, capture_output=True,
                       text=True, timeout=600)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-4000:]
    audit = [ln for ln in r.stdout.splitlines() if ln.startswith("PLUGIN ")]
    assert audit and json.loads(audit[0][len("PLUGIN "):])["attention"] > 0, r.stdout[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    print(f"\n{family} {' '.join(flags)}: " + ", ".join(f"T={t}: {e}/{n} bitwise" for t, (e, n) in result.items()))
    for t, (equal, total) in result.items():
        assert equal == total and total == 256, f"T={t}: {equal}/{total}"
    _controls(r.stdout)


def _controls(stdout: str) -> None:
    """The plain (unpatched) trainer must not match, and sampling must not be degenerate (issue 28 item 11:
    a degenerate model makes any trainer match, so a bitwise result over it proves nothing)."""
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in stdout.splitlines()
             if ln.startswith(("CONTROL ", "DEGENERACY "))}
    assert "CONTROL" in lines and "DEGENERACY" in lines, stdout[-3000:]
    print("control (plain transformers): " + ", ".join(f"T={t}: {e}/{n}" for t, (e, n) in lines["CONTROL"].items())
          + f"; sampling: {lines['DEGENERACY']}")
    for t, (equal, total) in lines["CONTROL"].items():
        assert equal < 0.5 * total, f"the unpatched trainer matched {equal}/{total} at T={t}: the test cannot fail"
    assert_not_degenerate(lines["DEGENERACY"])


def test_tied_embeddings_tiny_model_is_not_degenerate(tmp_path):
    """The tied case's scale: head_scale on a tied model scales the final norm, not the shared embedding
    table (which made the top next-token probability 1.0 for every prompt)."""
    import torch
    from transformers import AutoModelForCausalLM

    from onpolicy.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "tied", "qwen3", dtype=torch.bfloat16, overrides={"tie_word_embeddings": True})
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    prompts = [[3] + [100 + (i * 37 + j * 13) % 900 for j in range(5 + i % 9)] for i in range(16)]
    with torch.no_grad():
        top = [float(m(torch.tensor([p])).logits[0, -1].float().softmax(-1).max()) for p in prompts]
    assert max(top) < 0.95 and sum(top) / len(top) < 0.6, top
    assert float(m.model.embed_tokens.weight.float().std()) < 0.05  # the inputs were not scaled


# TP=2 (vLLM's all-reduce, one rounding) is checked by test_trl_server.py's TP=2 server, before and after a
# weight update, with the TP=1 trainer as its control: one engine start fewer here.
@pytest.mark.parametrize("tp, family", [(4, "qwen3"), (4, "llama")], ids=["tp4-qwen3", "tp4-llama"])
def test_tensor_parallel_bitwise(tp, family, tmp_path):
    """vLLM with tensor_parallel_size=tp (tp worker processes; on this CPU machine each bound to one
    core, ranks sharing cores beyond two) == the trainer mirroring it (tensor_parallel_size=tp),
    bitwise. Each o_proj and down_proj sums tp partial matmuls over K-slices: at TP=2 vLLM's
    all-reduce (one rounding), at TP=4 onpolicy's rank-order float32 sum after an all-gather. A
    trainer that does not mirror it differs, and at TP=4 so does one with the same sharding but a
    bf16 sum (the test tells reductions apart). About 75 s an engine on two cores."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r = subprocess.run([sys.executable, str(SCRIPT), family, str(tmp_path), "--eager", "--tp", str(tp)], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in r.stdout.splitlines()
             if ln.startswith(("RESULT ", "RESULT_TP1 ", "RESULT_BF16SUM ", "PLUGIN "))}
    assert r.returncode == 0 and "RESULT" in lines, r.stdout[-3000:] + r.stderr[-4000:]
    assert lines["PLUGIN"]["linear"] > 0
    bf16 = lines.get("RESULT_BF16SUM")
    print(f"\nTP={tp} {family}: " + ", ".join(
        f"T={t}: {e}/{n} bitwise (trainer without TP mirror: {lines['RESULT_TP1'][t][0]}/{n}"
        + (f"; with a bf16 sum: {bf16[t][0]}/{n}" if bf16 else "") + ")" for t, (e, n) in lines["RESULT"].items()))
    for t, (equal, total) in lines["RESULT"].items():
        assert equal == total and total == 256, f"T={t}: {equal}/{total}"
        assert lines["RESULT_TP1"][t][0] < total, "the TP=1 trainer matched too: the TP reduction was not exercised"
        if tp > 2:
            assert bf16[t][0] < total, "a bf16-sum trainer matched too: the test cannot tell the reductions apart"
    _controls(r.stdout)
