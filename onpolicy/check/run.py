"""The check itself: sample, recompute, compare, locate."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..metrics import mismatch_metrics
from .capture import capture_trainer, capture_vllm, first_divergence
from .engines import engine_dtype, load_trainer, make_engine, sample, trainer_logprobs
from .inputs import CheckError, load_prompts, validate_inputs, validate_model


@dataclass
class CheckResult:
    model: str
    plugin: bool
    temperature: float
    sequences: int
    metrics: dict
    first_mismatch_per_sequence: list  # completion index of the first differing token, or None
    divergence: Optional[dict] = None
    notes: list = field(default_factory=list)
    tensor_parallel_size: int = 1
    cuda_graphs: bool = False
    sampler_dtype: Optional[str] = None
    trainer_dtype: Optional[str] = None
    max_model_len: int = 512
    truncation: dict = field(default_factory=dict)  # top_k / top_p / min_p where set

    @property
    def ok(self) -> bool:
        return self.metrics["bitwise_equal_frac"] == 1.0


def _short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compare(sampler: list, trainer: list) -> tuple[dict, list]:
    """Per-sequence sampler logprobs (lists of floats) against the trainer's (tensors): the mismatch
    metrics over every token, and each sequence's first differing completion index (or None)."""
    T = max((len(s) for s in sampler), default=0)
    S = torch.full((len(sampler), T), float("nan"))
    R = torch.full((len(sampler), T), float("nan"))
    M = torch.zeros(len(sampler), T, dtype=torch.bool)
    for i, (s, t) in enumerate(zip(sampler, trainer)):
        S[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        R[i, : len(s)] = t
        M[i, : len(s)] = True
    firsts = []
    for i in range(len(sampler)):
        bad = ((S[i] != R[i]) & M[i]).nonzero()
        firsts.append(int(bad[0]) if bad.numel() else None)
    return mismatch_metrics(S, R, M), firsts


def run_check(model: str, prompts: int = 16, max_tokens: int = 32, temperature: float = 1.0, off: bool = False,
              prompt_file: Optional[Path] = None, seed: int = 0, llm=None, trainer=None,
              trainer_hook: Optional[Callable] = None, progress: Optional[Callable[[str], None]] = None,
              tp: int = 1, cuda_graphs: bool = False, dtype: str = "auto", max_model_len: int = 512,
              warn: Optional[Callable[[str], None]] = None, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0) -> CheckResult:
    """Sample, recompute, compare; localise the first divergence. `llm`/`trainer` may be passed in to reuse them.

    Every input is checked (CheckError) before an engine starts; `warn` hears what the check will do
    differently from what was asked (e.g. fewer tokens than --max-tokens where the context is full)."""
    say = progress or (lambda _msg: None)
    validate_inputs(prompts, max_tokens, temperature, tp, dtype, max_model_len, top_k, top_p, min_p)
    trunc = {k: v for k, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p))
             if v != {"top_k": 0, "top_p": 1.0, "min_p": 0.0}[k]}
    cfg = validate_model(model)
    tok = None
    if prompt_file is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    prompt_ids = load_prompts(prompt_file, prompts, cfg.vocab_size, seed, tok)
    longest = max(len(p) for p in prompt_ids)
    if longest >= max_model_len:
        raise CheckError(f"a prompt of {longest} tokens does not fit the {max_model_len}-token context "
                         "(--max-model-len)")
    notes = []
    if longest + max_tokens > max_model_len:
        notes.append(f"--max-tokens {max_tokens} does not fit the {max_model_len}-token context after the prompts "
                     f"(up to {longest} tokens): sequences are cut at the context, so as few as "
                     f"{max_model_len - longest} tokens are compared for some (raise --max-model-len)")
        (warn or say)(notes[-1])
    if llm is None:
        say("starting vLLM" + (" (onpolicy plugin off)" if off else " with the onpolicy plugin"))
        llm = make_engine(model, plugin=not off, seed=seed, tp=tp, cuda_graphs=cuda_graphs, dtype=dtype,
                          max_model_len=max_model_len)
    sampler_dtype = engine_dtype(llm)
    say(f"sampling {len(prompt_ids)} prompts x {max_tokens} tokens at temperature {temperature}"
        + "".join(f", {k}={v}" for k, v in trunc.items()) + " "
        f"(vLLM runs {_short(sampler_dtype)})")
    comps, slps = sample(llm, prompt_ids, max_tokens, temperature, seed, **trunc)
    if trainer is None:
        say(f"loading the trainer model in {_short(sampler_dtype)}" + ("" if off else " (patched)"))
        trainer = load_trainer(model, patch=not off, tp=tp, dtype=sampler_dtype)
    trainer_dtype = next(trainer.parameters()).dtype
    if trainer_dtype != sampler_dtype:
        notes.append(f"the trainer model is {_short(trainer_dtype)} but vLLM runs {_short(sampler_dtype)}: no token "
                     "can match; load it in vLLM's dtype")
    if trainer_hook is not None:
        trainer_hook(trainer)
    say("recomputing logprobs in the trainer")
    patched = not off
    tl = [trainer_logprobs(trainer, p, c, temperature, patched, **trunc) for p, c in zip(prompt_ids, comps)]
    metrics, firsts = compare(slps, tl)
    res = CheckResult(model, not off, temperature, len(comps), metrics, firsts, tensor_parallel_size=tp,
                      cuda_graphs=cuda_graphs, sampler_dtype=_short(sampler_dtype),
                      trainer_dtype=_short(trainer_dtype), max_model_len=max_model_len, notes=notes,
                      truncation=trunc)
    if metrics["first_mismatch"] is not None:
        i, j = metrics["first_mismatch"]["seq"], metrics["first_mismatch"]["pos"]
        ids = prompt_ids[i] + comps[i][:j]
        if cuda_graphs:
            res.notes.append("the per-layer divergence search needs an eager engine (module hooks): rerun "
                             "without --cuda-graphs to locate it")
            return res
        if tp > 1:
            res.notes.append("the per-layer divergence search runs the vLLM model in this process: rerun with "
                             "--tp 1 to locate it")
            return res
        say(f"locating the divergence: sequence {i}, completion token {j}")
        res.divergence = first_divergence(capture_vllm(llm, ids), capture_trainer(trainer, ids, patched))
        if res.divergence is None:
            res.notes.append("every recorded sub-op output is identical; the difference is in the LM head or the "
                             "logprob computation (or vLLM's decode differs from its prefill)")
    return res
