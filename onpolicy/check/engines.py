"""The two sides of the check: the vLLM engine that samples and the transformers model that recomputes."""
from __future__ import annotations

import os

import torch

from .inputs import CheckError


def engine_dtype(llm) -> torch.dtype:
    """The dtype the engine runs the model in (what the trainer must load it in)."""
    return llm.llm_engine.model_config.dtype


def make_engine(model: str, plugin: bool, max_model_len: int = 512, seed: int = 0, tp: int = 1,
                cuda_graphs: bool = False, dtype: str = "auto", **engine_args):
    """An in-process vLLM engine, eager unless `cuda_graphs`, with the onpolicy plugin on or off
    (tp > 1: one worker process a rank); engine_args: more of `LLM`'s arguments."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from .. import vllm_plugin

    if plugin:
        vllm_plugin.enable()
    elif vllm_plugin.is_registered():
        raise CheckError("the onpolicy vLLM plugin is already on in this process; run --off in a fresh process")
    from vllm import LLM

    kw = dict(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=not cuda_graphs,
              logprobs_mode="processed_logprobs")
    if not torch.cuda.is_available():
        kw["gpu_memory_utilization"] = 0.3
    if tp > 1:
        from ..vllm_plugin.config import tensor_parallel_engine_args

        kw.update(tensor_parallel_engine_args(tp))
        if not torch.cuda.is_available():
            kw["gpu_memory_utilization"] = 0.3 / tp  # a share of host memory per rank
    kw.update(engine_args)
    return LLM(**kw)


def vllm_model(llm):
    """The torch module vLLM runs (in-process engine)."""
    from ..vllm_plugin import compat

    return compat.engine_model(llm)


def sample(llm, prompts, max_tokens: int, temperature: float, seed: int, **truncation):
    """Completions and their sampled (processed) logprobs; truncation: vLLM's top_k / top_p / min_p."""
    from vllm import SamplingParams

    reqs = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed + i,
                             ignore_eos=True, **truncation) for i in range(len(prompts))]
    outs = llm.generate(reqs, params, use_tqdm=False)
    comps, lps = [], []
    for o in outs:
        c = o.outputs[0]
        comps.append(list(c.token_ids))
        lps.append([c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)])
    return comps, lps


def load_trainer(model: str, patch: bool, tp: int = 1, dtype="auto"):
    """The trainer side: transformers, in `dtype` (pass the engine's, `engine_dtype(llm)`), patched or not."""
    from transformers import AutoModelForCausalLM

    from ..trainer import patch_model

    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    if torch.cuda.is_available():
        m = m.cuda()
    return patch_model(m, tensor_parallel_size=tp) if patch else m


def trainer_logprobs(model, prompt: list[int], completion: list[int], temperature: float, patched: bool,
                     **truncation):
    """The trainer's logprobs of `completion`: patched, onpolicy's (of the distribution truncated as the
    sampler's, where truncation is set); unpatched, transformers' plain log-softmax (what TRL compares)."""
    from ..trainer import token_logprobs

    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad():
        if patched:
            return token_logprobs(model, ids, temperature=temperature, logits_to_keep=len(completion),
                                  **truncation)[0].cpu()
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0].cpu()
