"""The sampler's logprobs from `onpolicy_kernels.log_softmax`, and sampling from them.

Installed after the model is loaded (worker.py): the runner's sampler object is
re-classed to a subclass that overrides only the step from logits to
(token, logprobs). For each row, with t = its temperature (1.0 for greedy rows):

    lp = onpolicy_kernels.log_softmax(logits, t)         # fp32, batch-invariant

`processed_logprobs` returns lp (what the trainer's `token_logprobs(...,
temperature=t)` computes, bitwise); `raw_logprobs` returns log_softmax(logits,
1.0). The token is drawn by vLLM's own seeded Gumbel sampler *from lp* (the
temperature is already in lp; Gumbel-max is shift-invariant), greedy rows by
vLLM's argmax, so the sampled policy is exactly exp(lp).

vLLM's distribution-changing options that run before temperature (logit bias,
min_tokens, allowed/bad words, penalties) are applied by vLLM as usual; the
trainer does not see them, so tokens they touch are not on-policy (documented).

top-k / top-p / min-p are applied by onpolicy's one truncation
(`onpolicy_kernels.truncate_logprobs`, kernels/onpolicy_kernels/ops/truncation.py),
which the trainer runs too: for a request that sets any of them,

    lp = truncate_logprobs(lp, top_k, top_p, min_p)      # -inf outside, renormalised

and the token is drawn from that lp, which is also what processed logprobs
return. Requests without them get the untruncated lp, bitwise, whatever the
other requests of the batch set. The rule (vLLM's order: min-p, top-k, then
top-p on the renormalised rest; ties at the boundary kept together) replaces
vLLM's own masking, whose top-p splits ties by its sort's order. Another
argmax-invariant logits processor (a custom one given to the engine) is applied
for sampling as vLLM does; a step that must also return processed logprobs for
it fails loudly (not on-policy). vLLM's own warm-up requests (0.26:
`SamplingParams.for_sampler_warmup()`, top_k=50, top_p=0.9, min_p=0.1,
logprobs=5, run by `warmup_kernels` while the engine is built) run the
truncation like any request; the worker marks the sampler while
`compile_or_warm_up_model` runs (worker.py).

Two sampler layouts: V1 (vllm/v1/sample/sampler.py: the CPU runner, and GPU
with VLLM_USE_V2_MODEL_RUNNER=0) and model-runner-V2 as in vLLM 0.26
(vllm/v1/worker/gpu/sample/sampler.py).
"""
from __future__ import annotations

import onpolicy_kernels
import torch

from . import compat
from .errors import OnpolicyVllmError

_NOT_ON_POLICY = ("the engine has a custom argmax-invariant logits processor and a request asked for processed "
                  "logprobs: onpolicy cannot reproduce that processor in the trainer. Remove the logits processor "
                  "(top-k, top-p and min-p are supported)")


def v1_truncation(md):
    """V1 runner: (top_k, top_p, min_p, other argmax-invariant processors) of this batch.

    vLLM's V1 input batch passes `top_k` / `top_p` as None unless some request uses them
    (v32 and v26 `v1/worker/gpu_input_batch.py`, `no_top_k`/`no_top_p`; rows without top-k hold
    vocab_size); min-p lives in the argmax-invariant `MinPLogitsProcessor` (`min_p_count`, its
    `min_p` one value per row). Any other argmax-invariant processor is returned in the list.
    """
    min_p, others = None, []
    for proc in md.logitsprocs.argmax_invariant:
        count = getattr(proc, "min_p_count", None)
        if count is None:
            others.append(proc)
        elif count:
            min_p = proc.min_p.reshape(-1)
    return md.top_k, md.top_p, min_p, others


def truncate(lp: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """lp truncated by the shared kernel op (None = that setting is off for every row)."""
    if top_k is None and top_p is None and min_p is None:
        return lp
    return onpolicy_kernels.truncate_logprobs(lp, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p,
                                              0.0 if min_p is None else min_p)


def v2_truncation(states, expanded_idx_mapping, idx_mapping_np):
    """V2 runner (0.26): (top_k, top_p, min_p) of this step's rows, each None when no request of the
    step uses it, else one value per logits row (gathered by `expanded_idx_mapping`).

    Decided on the per-request host arrays of `SamplingStates` (v26
    `v1/worker/gpu/sample/states.py`: top_k is normalised to vocab_size when off, top_p 1.0 and
    min_p 0.0 when off), as vLLM's own `get_top_k_top_p` / `apply_min_p` decide; the values are its
    device copies (`.gpu`). Read off vLLM's source, run on the CPU only through a stand-in.
    """
    import numpy as np

    idx = idx_mapping_np
    top_k = states.top_k.gpu[expanded_idx_mapping] if np.any(states.top_k.np[idx] != states.vocab_size) else None
    top_p = states.top_p.gpu[expanded_idx_mapping] if np.any(states.top_p.np[idx] != 1.0) else None
    min_p = states.min_p.gpu[expanded_idx_mapping] if np.any(states.min_p.np[idx] != 0.0) else None
    return top_k, top_p, min_p


def v2_row_temperatures(states, expanded_idx_mapping, idx_mapping_np):
    """V2 runner (0.26): the temperature each logits row is divided by -- its request's, with
    greedy rows (temperature 0) at 1.0 as vLLM samples them.

    When every request of the step is at 0 or 1 (read off the host array, as vLLM's own
    `apply_temperature` does before skipping its kernel), the float 1.0: the op then divides
    by the same ones the per-row tensor would hold (same bits) without the gather, compare
    and select launches a decode step would otherwise pay on the host."""
    import numpy as np

    temp_np = states.temperature.np[idx_mapping_np]
    if np.all((temp_np == 0.0) | (temp_np == 1.0)):
        return 1.0
    t = states.temperature.gpu[expanded_idx_mapping].to(torch.float32)
    return torch.where(t == 0.0, torch.ones_like(t), t)


def unit_rows(sampler, rows: int, device) -> torch.Tensor:
    """`rows` ones (fp32, on `device`): the temperatures of a step whose rows all sample at 1.

    A slice of one buffer kept on the sampler, grown when a step has more rows, so a decode
    step does not build a new tensor (the float 1.0 would: an allocation and a fill launch,
    13-25 us of host time per step on the H200 under cProfile). Same values, same bits."""
    buf = getattr(sampler, "_onpolicy_unit_rows", None)
    if buf is None or buf.numel() < rows or buf.device != torch.device(device):
        with torch.inference_mode(False):  # usable whatever the caller's mode
            buf = torch.ones(max(rows, 256), dtype=torch.float32, device=device)
        sampler._onpolicy_unit_rows = buf
    return buf[:rows]


def _log_softmax(logits: torch.Tensor, temperature) -> torch.Tensor:
    return onpolicy_kernels.log_softmax(logits, temperature)


class OnpolicySamplerMixin:
    """Marker; `_onpolicy_mode` is the logprobs mode the user asked for."""

    _onpolicy_mode: str = "raw_logprobs"
    _onpolicy_warmup: bool = False  # True while vLLM warms the engine up (worker.py)


class V1SamplerMixin(OnpolicySamplerMixin):
    @staticmethod
    def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
        # raw logprobs (and prompt logprobs): temperature 1
        return _log_softmax(logits, 1.0)

    def sample(self, logits: torch.Tensor, sampling_metadata, logprobs_mode_override=None):
        from vllm.v1.sample.sampler import _SAMPLING_EPS

        md = sampling_metadata
        mode = logprobs_mode_override or self.logprobs_mode
        want = md.max_num_logprobs is not None or bool(getattr(md, "logprob_token_ids", None))
        processed = want and mode == "processed_logprobs"
        if mode == "processed_logits":
            raise OnpolicyVllmError("logprobs_mode='processed_logits' is not supported")

        greedy = None if md.all_random else self.greedy_sample(logits)
        if md.all_greedy:
            return greedy, (_log_softmax(logits, 1.0) if processed else None)

        temp = md.temperature
        t = temp if md.all_random else torch.where(temp < _SAMPLING_EPS, torch.ones_like(temp), temp)
        top_k, top_p, min_p, others = v1_truncation(md)
        lp = truncate(_log_softmax(logits, t), top_k, top_p, min_p)
        masked = lp
        if others:
            if processed and not self._onpolicy_warmup:
                raise OnpolicyVllmError(_NOT_ON_POLICY)
            masked = lp.clone()
            for proc in others:
                masked = proc.apply(masked)
        random_sampled, _ = self.topk_topp_sampler(masked, md.generators, None, None)
        if greedy is None:
            sampled = random_sampled
        else:
            sampled = torch.where(temp < _SAMPLING_EPS, greedy, random_sampled)
        return sampled, (lp if processed else None)


class V2SamplerMixin026(OnpolicySamplerMixin):
    """Model runner V2 as in vLLM 0.26 (vllm/v1/worker/gpu/sample/sampler.py).

    `__call__` is vLLM's; it gathers from what `sample` returns as "processed
    logits" without re-normalising (we set the instance's mode to
    processed_logits and keep the user's in `_onpolicy_mode`).
    """

    def sample(self, logits, expanded_idx_mapping, idx_mapping_np, pos, input_ids, expanded_local_pos,
               return_logprobs: bool = False):
        from vllm.v1.worker.gpu.sample.gumbel import gumbel_sample

        mode = self._onpolicy_mode
        raw = logits.clone() if (return_logprobs and mode.startswith("raw_")) else None
        # vLLM's pre-temperature steps, in its order, in place (see module docstring).
        self.logit_bias_state.apply_logit_bias(logits, expanded_idx_mapping, idx_mapping_np, pos)
        self.penalties_state.apply_penalties(logits, expanded_idx_mapping, idx_mapping_np, input_ids,
                                             expanded_local_pos)
        self.bad_words_state.apply_bad_words(logits, expanded_idx_mapping, idx_mapping_np, input_ids,
                                             expanded_local_pos)
        temp_all = self.sampling_states.temperature.gpu
        t = v2_row_temperatures(self.sampling_states, expanded_idx_mapping, idx_mapping_np)
        graphs = getattr(self, "_onpolicy_graphs", None)  # decode steps from CUDA graphs (graphs.py)
        if graphs is not None:
            lp = graphs(logits, extra=(t,)) if isinstance(t, float) else graphs(logits, t)
        else:
            lp = _log_softmax(logits, unit_rows(self, logits.shape[0], logits.device) if isinstance(t, float) else t)
        lp = truncate(lp, *v2_truncation(self.sampling_states, expanded_idx_mapping, idx_mapping_np))
        sampled = gumbel_sample(lp, expanded_idx_mapping, temp_all, self.sampling_states.seeds.gpu, pos,
                                apply_temperature=False, use_fp64=getattr(self, "use_fp64_gumbel", False))
        if raw is None:
            out = lp
        elif mode == "raw_logprobs":
            out = _log_softmax(raw, 1.0)
        else:  # raw_logits: vLLM gathers and casts to fp32
            out = raw
        return sampled, out


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, mixin: type) -> type:
    key = (base, mixin)
    if key not in _SUBCLASSES:
        name = f"Onpolicy{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__})
        cls.__qualname__ = name
        _SUBCLASSES[key] = cls
    return _SUBCLASSES[key]


def install(model_runner) -> None:
    """Re-class the runner's sampler (idempotent). Raises if the layout is unknown."""
    sampler = compat.runner_sampler(model_runner)
    if sampler is None:
        return  # pooling model or not the last pipeline stage: nothing samples here
    if isinstance(sampler, OnpolicySamplerMixin):
        return
    flavour = compat.sampler_flavour(sampler)
    user_mode = getattr(sampler, "logprobs_mode", "raw_logprobs")
    if flavour == "v1":
        sampler.__class__ = _subclass(type(sampler), V1SamplerMixin)
        sampler._onpolicy_mode = user_mode
    elif flavour == "v2_026":
        sampler.__class__ = _subclass(type(sampler), V2SamplerMixin026)
        sampler._onpolicy_mode = user_mode
        sampler.logprobs_mode = "processed_logits"  # vLLM's __call__ then only gathers our values
    else:
        raise OnpolicyVllmError(
            f"unsupported vLLM sampler {type(sampler).__module__}.{type(sampler).__qualname__} (vLLM "
            f"{'.'.join(map(str, compat.vllm_version()))}); try VLLM_USE_V2_MODEL_RUNNER=0"
        )
