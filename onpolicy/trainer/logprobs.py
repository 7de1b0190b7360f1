"""`token_logprobs(model, input_ids, ...)`: per-token logprobs exactly as the patched sampler computes them."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

import onpolicy_kernels as K

from . import forward as F
from .patch import patched

Temperature = Union[float, torch.Tensor]


def check_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], temperature: Temperature,
                 chunk_rows: int, vocab_size: Optional[int], score_mask: Optional[torch.Tensor] = None) -> None:
    """Raise a ValueError naming the argument for input the kernels would turn into a raw torch error or,
    worse, into silent zeros."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, seq] tensor of token ids, got {shape}")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must hold integer token ids (int64 or int32), got {input_ids.dtype}")
    B, L = input_ids.shape
    if B == 0 or L < 2:
        raise ValueError(f"input_ids has shape {(B, L)}: need at least one sequence of at least 2 tokens "
                         "(a logprob scores a token given the tokens before it)")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive int (rows of logits per LM-head call), got {chunk_rows!r}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, L):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have input_ids' shape {(B, L)} (1 = token, 0 = padding), got {shape}")
        if not bool(attention_mask.bool().any()):
            raise ValueError("attention_mask is all padding (0): there is no token to score")
    if score_mask is not None and tuple(score_mask.shape) != (B, L - 1):
        raise ValueError(f"score_mask must have shape {(B, L - 1)} (one entry per scored token), "
                         f"got {tuple(score_mask.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() not in (1, B):
            raise ValueError(f"temperature must be a float or a tensor of one value per row ({B}), got "
                             f"{temperature.numel()} values (shape {tuple(temperature.shape)})")
        t = temperature.detach().double()
        if not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
            raise ValueError(f"temperature must be finite and > 0 (vLLM refuses other values; greedy samples' "
                             f"logprobs are taken at 1.0), got {temperature.tolist()}")
    else:
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a float or a tensor, got {temperature!r}") from None
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be finite and > 0 (vLLM refuses other values; greedy samples' "
                             f"logprobs are taken at 1.0), got {temperature!r}")


def check_truncation(top_k, top_p, min_p, batch: int) -> dict:
    """The top-k / top-p / min-p settings as keyword arguments for the kernels' truncation ({} when they
    truncate nothing): numbers, or one value per sequence [B]. A bad value raises a ValueError naming it
    (0 / -1 / None = top_k off, top_p in (0, 1], min_p in [0, 1] or None)."""
    from onpolicy_kernels.ops.truncation import is_truncating, row_settings

    for name, v in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(v, torch.Tensor) and v.numel() not in (1, batch):
            raise ValueError(f"{name} must be a number or a tensor of one value per row ({batch}), got "
                             f"{v.numel()} values")
    row_settings(*(v.reshape(-1)[:1] if isinstance(v, torch.Tensor) else v for v in (top_k, top_p, min_p)), 1,
                 "cpu")  # the kernels' own checks (every value of a tensor is checked again at the call)
    if not is_truncating(top_k, top_p, min_p):
        return {}
    return {"top_k": top_k, "top_p": top_p, "min_p": min_p}


def score_tokens(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, score_mask: Optional[torch.Tensor] = None,
                 temperature: Temperature = 1.0, with_entropy: bool = False, chunk_rows: int = 2048,
                 top_k=0, top_p=1.0, min_p=None):
    """(logprobs, entropy or None), both fp32 [B, L-1]: entry i scores token i+1 given tokens <= i.

    Only entries where score_mask [B, L-1] is true (and both tokens are real)
    are computed; the others are 0. The model must be patched. With top_k / top_p /
    min_p (numbers, or one per sequence), the logprobs and entropy are those of the
    truncated distribution, `onpolicy_kernels.truncated_token_logprobs` -- what the
    vLLM plugin's sampler drew from and returns.
    """
    check_inputs(input_ids, attention_mask, temperature, chunk_rows, getattr(model.config, "vocab_size", None),
                 score_mask)
    trunc = check_truncation(top_k, top_p, min_p, input_ids.shape[0])
    B, L = input_ids.shape
    hidden, plan, _ = F.packed_hidden(model.model, input_ids, attention_mask, position_ids)
    with F.no_autocast(hidden.device):
        return _score(model, input_ids, hidden, plan, score_mask, temperature, with_entropy, chunk_rows, trunc)


def _per_row(value, B: int, L: int, dev):
    """A per-sequence tensor [B] as one value per scored position [B*(L-1)]; numbers as they are."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return value.to(dev).reshape(B, 1).expand(B, L - 1).reshape(-1)
    return value


def _score(model, input_ids, hidden, plan, score_mask, temperature, with_entropy, chunk_rows, trunc=None):
    B, L = input_ids.shape
    dev = hidden.device
    slot = torch.full((B * L,), -1, dtype=torch.long, device=dev)
    slot[plan.idx] = torch.arange(plan.idx.numel(), device=dev)
    slot = slot.view(B, L)
    keep = (slot[:, :-1] >= 0) & (slot[:, 1:] >= 0)
    if score_mask is not None:
        keep &= score_mask.to(dev).bool()
    rows = keep.reshape(-1).nonzero().squeeze(1)
    src = slot[:, :-1].reshape(-1)
    targets = input_ids[:, 1:].reshape(-1)
    per_row_t = isinstance(temperature, torch.Tensor) and temperature.numel() > 1
    if per_row_t:
        temperature = temperature.to(dev).float().reshape(B, 1).expand(B, L - 1).reshape(-1)
    trunc = {k: _per_row(v, B, L, dev) for k, v in (trunc or {}).items()}
    head = model.lm_head
    w, b = F.full(head.weight), F.full(head.bias)
    lps, ents = [], []
    for s in range(0, rows.numel(), chunk_rows):
        r = rows[s : s + chunk_rows]
        logits = K.linear(hidden[src[r]], w, b)
        t = temperature[r] if per_row_t else temperature
        if trunc:  # the truncated distribution: one row of logprobs, the token's gathered from it
            kw = {k: (v[r] if isinstance(v, torch.Tensor) and v.numel() > 1 else v) for k, v in trunc.items()}
            ls = K.truncated_log_softmax(logits, t, **kw)
            lps.append(ls.gather(1, targets[r].long()[:, None])[:, 0])
            if with_entropy:
                ents.append(-torch.where(ls > float("-inf"), ls.exp() * ls, torch.zeros_like(ls)).sum(-1))
            continue
        lps.append(K.token_logprobs(logits, targets[r], t))
        if with_entropy:
            ls = K.log_softmax(logits, t)
            ents.append(-(ls.exp() * ls).sum(-1))
    zeros = torch.zeros(B * (L - 1), dtype=torch.float32, device=dev)
    if not lps and hidden.requires_grad:
        # nothing to score (TRL's mask_truncated_completions masks every completion of a batch that hit
        # max_completion_length): zeros still tied to the graph, so the loss has a backward (of zero
        # gradients, reaching every parameter, as DDP needs); adding +0.0 leaves the zeros' bits alone
        zeros = zeros + hidden[:0].sum()
    lp = zeros.index_put((rows,), torch.cat(lps)) if lps else zeros
    ent = (zeros.index_put((rows,), torch.cat(ents)) if ents else zeros) if with_entropy else None
    return lp.view(B, L - 1), (ent.view(B, L - 1) if ent is not None else None)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    temperature: Temperature = 1.0,
    logits_to_keep: Optional[int] = None,
    position_ids: Optional[torch.Tensor] = None,
    chunk_rows: int = 2048,
    tensor_parallel_size: Optional[int] = None,
    top_k=0,
    top_p=1.0,
    min_p=None,
) -> torch.Tensor:
    """Logprobs of each token given the tokens before it, in fp32.

    Returns [B, L-1] where out[b, i] = log p(input_ids[b, i+1] | input_ids[b, :i+1])
    or, with logits_to_keep=k, [B, k] for the last k tokens of each row (TRL's
    convention for completions). temperature: a float or one per row [B].
    The logits go through the model's LM head (onpolicy `linear`) and
    `onpolicy_kernels.token_logprobs(logits, ids, temperature)`: fp32 logits
    divided by temperature, then log-softmax -- vLLM's *processed* logprobs as
    the onpolicy vLLM adapter computes them, bitwise. Entries whose token or
    predecessor is padding (attention_mask 0) hold 0.0. Differentiable (the
    backward uses standard kernels). The model is patched for the call if it
    is not already. tensor_parallel_size: that of the vLLM engine that sampled
    (1, 2, 4 or 8), so the forward reproduces its sharded reductions. Bad input
    (no token to score, a mask or temperature of the wrong shape, token ids
    outside the vocabulary, a temperature that is not finite and > 0,
    chunk_rows <= 0) raises a ValueError naming the argument. Runs with
    autocast off (see trainer.forward.no_autocast). top_k / top_p / min_p (numbers,
    or one per row [B]; off: 0 or -1, 1.0, 0.0 or None): the logprobs of the
    truncated distribution the onpolicy sampler draws from with those settings
    (`onpolicy_kernels.truncated_token_logprobs`), bitwise equal to vLLM's processed
    logprobs; a token outside the kept set scores -inf.
    """
    check_inputs(input_ids, attention_mask, temperature, chunk_rows, getattr(model.config, "vocab_size", None))
    check_truncation(top_k, top_p, min_p, input_ids.shape[0])
    B, L = input_ids.shape
    k = L - 1 if logits_to_keep is None else int(logits_to_keep)
    if not 0 < k < L:
        raise ValueError(f"logits_to_keep must be in [1, {L - 1}] for sequences of length {L}, got {k}")
    score = torch.zeros(B, L - 1, dtype=torch.bool, device=input_ids.device)
    score[:, L - 1 - k :] = True
    with patched(model, tensor_parallel_size):
        lp, _ = score_tokens(model, input_ids, attention_mask, position_ids, score, temperature,
                             chunk_rows=chunk_rows, top_k=top_k, top_p=top_p, min_p=min_p)
    return lp[:, L - 1 - k :]
