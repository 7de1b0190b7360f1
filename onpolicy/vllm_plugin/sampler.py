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
top-k / top-p / min-p are applied to lp before sampling. A request that asks
for processed logprobs *and* sets top-k, top-p or min-p is refused in the front
end with a ValueError naming the parameter (HTTP 400 in the OpenAI server;
`check_request`, installed by `register()`), so the engine never sees it; the
sampler still fails such a step loudly (not on-policy) as a last line: the decision reads the requests' sampling parameters (host-side
state), never the tensors. vLLM's own warm-up requests (0.26:
`SamplingParams.for_sampler_warmup()`, top_k=50, top_p=0.9, min_p=0.1,
logprobs=5, run by `warmup_kernels` while the engine is built) are exempt: the
worker marks the sampler while `compile_or_warm_up_model` runs (worker.py).

Two sampler layouts: V1 (vllm/v1/sample/sampler.py: the CPU runner, and GPU
with VLLM_USE_V2_MODEL_RUNNER=0) and model-runner-V2 as in vLLM 0.26
(vllm/v1/worker/gpu/sample/sampler.py).
"""
from __future__ import annotations

import onpolicy_kernels
import torch

from . import compat
from .errors import OnpolicyVllmError

_NOT_ON_POLICY = ("a request asked for processed logprobs together with top-k / top-p / min-p: the returned "
                  "logprobs would not be the trainer's. Use top_k=-1 (0 in TRL), top_p=1.0, min_p=0.0 with onpolicy")


def masking_params(params, vocab_size: int) -> list[tuple[str, object]]:
    """The (name, value) of each top-k / top-p / min-p setting of one request that truncates the
    distribution (as vLLM's input batches decide it: 0 < top_k < vocab, top_p < 1, min_p > 0)."""
    out = []
    top_k = getattr(params, "top_k", 0) or 0
    if 0 < top_k < vocab_size:
        out.append(("top_k", top_k))
    top_p = getattr(params, "top_p", 1.0)
    if top_p is not None and top_p < 1.0:
        out.append(("top_p", top_p))
    min_p = getattr(params, "min_p", 0.0)
    if min_p is not None and min_p > 0.0:
        out.append(("min_p", min_p))
    return out


def wants_sample_logprobs(params) -> bool:
    return getattr(params, "logprobs", None) is not None or bool(getattr(params, "logprob_token_ids", None))


def check_request(input_processor, params) -> None:
    """Front-end check of one request (compat.install_request_check): refuse with a ValueError naming the
    parameter -- HTTP 400 in the OpenAI server -- a request the sampler cannot serve on-policy, i.e.
    processed logprobs of a top-k / top-p / min-p truncated distribution. The engine never sees it (in
    the worker the same request would fail the whole step, and with it every request in flight)."""
    from vllm import SamplingParams

    if not isinstance(params, SamplingParams) or not wants_sample_logprobs(params):
        return
    if compat.processor_logprobs_mode(input_processor) != "processed_logprobs":
        return
    bad = masking_params(params, compat.processor_vocab_size(input_processor))
    if bad:
        name, value = bad[0]
        raise compat.validation_error(
            f"{name}={value} cannot be served on-policy with logprobs: this server returns processed logprobs "
            f"(--logprobs-mode processed_logprobs) and the onpolicy plugin returns them for the full "
            f"distribution at the temperature, which {name} would truncate. Drop {name} (or the logprobs) from "
            f"the request, or run the server with --logprobs-mode raw_logprobs", name, value)


def v1_masking_requested(md) -> bool:
    """V1 runner: does any request of this batch set top-k, top-p or min-p?

    vLLM's V1 input batch passes `top_k` / `top_p` as None unless some request
    uses them (v32 and v26 `v1/worker/gpu_input_batch.py`, `no_top_k`/`no_top_p`);
    min-p lives in the argmax-invariant `MinPLogitsProcessor` (`min_p_count`).
    Any other argmax-invariant processor is counted as masking (it may).
    """
    if md.top_k is not None or md.top_p is not None:
        return True
    for proc in md.logitsprocs.argmax_invariant:
        count = getattr(proc, "min_p_count", None)
        if count is None or count:
            return True
    return False


def v2_masking_with_logprobs(states, token_ids_state, idx_mapping_np) -> tuple[bool, bool]:
    """V2 runner (0.26): (any row masks, any row both masks and wants logprobs).

    Reads the per-request host arrays of `SamplingStates` (v26
    `v1/worker/gpu/sample/states.py:22-61`: top_k is normalised to vocab_size
    when off, top_p 1.0 and min_p 0.0 when off, num_logprobs -1 when no
    logprobs) and `LogprobTokenIdsState.num_token_ids` (explicit logprob ids).
    """
    import numpy as np

    idx = idx_mapping_np
    masks = ((states.top_k.np[idx] != states.vocab_size) | (states.top_p.np[idx] != 1.0)
             | (states.min_p.np[idx] != 0.0))
    if not masks.any():
        return False, False
    wants = states.num_logprobs[idx] != -1  # NO_LOGPROBS
    if token_ids_state is not None:
        wants = wants | (token_ids_state.num_token_ids.np[idx] > 0)
    return True, bool(np.any(masks & wants))


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
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
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
        lp = _log_softmax(logits, t)
        masked = lp
        if v1_masking_requested(md):
            if processed and not self._onpolicy_warmup:
                raise OnpolicyVllmError(_NOT_ON_POLICY)
            masked = lp.clone()
            for proc in md.logitsprocs.argmax_invariant:
                masked = proc.apply(masked)
            masked = apply_top_k_top_p(masked, md.top_k, md.top_p)
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
        masked = lp
        any_mask, mask_with_logprobs = v2_masking_with_logprobs(
            self.sampling_states, getattr(self, "logprob_token_ids_state", None), idx_mapping_np)
        if any_mask:
            if mask_with_logprobs and mode == "processed_logprobs" and not self._onpolicy_warmup:
                raise OnpolicyVllmError(_NOT_ON_POLICY)
            masked = lp.clone()  # lp itself is what the logprobs are gathered from
            self.sampling_states.apply_min_p(masked, expanded_idx_mapping, idx_mapping_np)
            masked = self.sampling_states.apply_top_k_top_p(masked, expanded_idx_mapping, idx_mapping_np)
        sampled = gumbel_sample(masked, expanded_idx_mapping, temp_all, self.sampling_states.seeds.gpu, pos,
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
