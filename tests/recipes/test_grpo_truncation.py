"""Issue 32's top-p / top-k / min-p row, through TRL: OnPolicyGRPOTrainer with GRPOConfig(top_k=20, top_p=0.9,
min_p=0.02, temperature=0.7) runs 3 steps in strict mode, every token bitwise and TRL's own
`sampling/sampling_logp_difference` exactly 0 and `importance_sampling_ratio` exactly 1; the control --
the sampler's logprobs against the trainer's untruncated distribution, TRL's comparison -- matches none.

The same run also sets beta=0.04 (a reference model, patched too; it scores the full distribution,
so TRL's KL starts above 0: the truncated policy is not the reference even at step 1) and
loss_type="grpo" (TRL's default is dapo, run by the README snippet's test): one run, three rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.vllm
def test_grpo_with_top_k_top_p_min_p_is_bitwise_every_step(tmp_path):
    import torch

    from onpolicy.runlog import read_steps
    from onpolicy.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "qwen3", "qwen3", dtype=torch.bfloat16)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("ONPOLICY_VLLM", None)
    extra = json.dumps({"beta": 0.04, "loss_type": "grpo"})
    r = subprocess.run([sys.executable, str(HERE / "grpo_truncation.py"), str(model), str(tmp_path / "out"), extra],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    steps = [x for x in result["log"] if "sampling/sampling_logp_difference/max" in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    for x in steps:
        assert x["sampling/sampling_logp_difference/mean"] == 0.0 == x["sampling/sampling_logp_difference/max"]
        assert x["sampling/importance_sampling_ratio/min"] == 1.0 == x["sampling/importance_sampling_ratio/max"]
        assert x["onpolicy/bitwise_equal_frac"] == 1.0 and x["onpolicy/tokens"] > 0
        assert 0.0 < x["kl"] < float("inf")  # beta > 0: TRL computed the KL to the reference model
    assert result["ref_model_patched"] is True
    # the KL TRL logs equals a recomputation apart from TRL (see grpo_truncation.recompute_kl), step by step
    assert len(result["kl_recomputed"]) == 3
    for x, kl in zip(steps, result["kl_recomputed"]):
        assert abs(x["kl"] - kl) <= 1e-5 * kl, (x["kl"], kl)
    rows = read_steps(tmp_path / "out" / "metrics.jsonl")
    assert len({x["weights"] for x in rows}) > 1  # vLLM matched synced, changed weights
    c = result["control"]
    print(f"\nGRPO top_k=20 top_p=0.9 min_p=0.02 T=0.7: 3 steps bitwise; after training {c['equal']}/{c['total']} "
          f"sampled tokens bitwise vs the truncated trainer, {c['untruncated_equal']}/{c['total']} vs the untruncated")
    assert c["total"] > 0 and c["equal"] == c["total"]
    assert c["untruncated_equal"] < 0.05 * c["total"], "control: the untruncated trainer matched, the test cannot fail"
