"""The GRPO recipe (issue 6), short version on CPU: bitwise at every step across weight syncs; the control is not."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.vllm
def test_recipe_is_bitwise_every_step_and_the_control_is_not(tmp_path):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("ONPOLICY_VLLM", None)
    cmd = ["accelerate", "launch", "--config_file", "recipes/accelerate/cpu.yaml", "recipes/grpo.py",
           "--config", "recipes/cpu_demo.yaml", "--max_steps", "3", "--sft_warmup_steps", "40",
           "--run_dir", str(tmp_path), "--report_to", "none"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    on = _rows(tmp_path / "onpolicy" / "metrics.jsonl")
    assert [x["step"] for x in on] == [1, 2, 3]
    for x in on:
        assert x["onpolicy"] and x["tokens"] > 0
        assert x["bitwise_equal_frac"] == 1.0 and x["first_mismatch"] is None
        assert x["logp_abs_diff_max"] == 0.0 and x["kl_k1"] == 0.0 and x["kl_k3"] == 0.0
        assert x["is_ratio_min"] == 1.0 == x["is_ratio_max"]
    # the policy changed between steps, so vLLM matched freshly synced weights, not the initial ones
    assert len({x["weights"] for x in on}) > 1
    samples = json.loads((tmp_path / "onpolicy" / "tokens" / "step_000001.json").read_text())["samples"]
    assert samples and all(s["sampler_logp"] == s["trainer_logp"] for s in samples)
    off = _rows(tmp_path / "control" / "metrics.jsonl")
    assert len(off) == 3 and not any(x["onpolicy"] for x in off)
    assert min(x["bitwise_equal_frac"] for x in off) < 1.0 and max(x["logp_abs_diff_max"] for x in off) > 0
    assert "onpolicy GRPO: sampler vs trainer" in r.stdout


@pytest.mark.vllm
@pytest.mark.slow
def test_recipe_two_ranks_with_vllm_tensor_parallel_2_is_bitwise(tmp_path):
    """Issue 7 on the CPU: two trainer processes (DDP over gloo) that are also vLLM's TP=2 group
    (TRL colocate, external launcher; one core each). vLLM's o_proj/down_proj all-reduce two
    half-K partial sums; the trainer mirrors that (patched with tensor_parallel_size=2)."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env.pop("ONPOLICY_VLLM", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "recipes/grpo.py",
           "--config", "recipes/cpu_demo.yaml", "--max_steps", "3", "--sft_warmup_steps", "40",
           "--per_device_train_batch_size", "8", "--vllm_tensor_parallel_size", "2", "--control", "false",
           "--vllm_gpu_memory_utilization", "0.05", "--run_dir", str(tmp_path), "--report_to", "none"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    on = _rows(tmp_path / "onpolicy" / "metrics.jsonl")
    assert [x["step"] for x in on] == [1, 2, 3]
    for x in on:
        assert x["tokens"] > 0 and x["bitwise_equal_frac"] == 1.0 and x["kl_k3"] == 0.0
    assert len({x["weights"] for x in on}) > 1  # weights synced into the TP=2 engine between steps
