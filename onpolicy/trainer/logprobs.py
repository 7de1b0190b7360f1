"""`token_logprobs(model, input_ids, ...)`: per-token logprobs exactly as the patched sampler computes them."""
from __future__ import annotations

from typing import Optional, Union

import torch

import onpolicy_kernels as K

from . import forward as F
from .patch import patched

Temperature = Union[float, torch.Tensor]


def score_tokens(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, score_mask: Optional[torch.Tensor] = None,
                 temperature: Temperature = 1.0, with_entropy: bool = False, chunk_rows: int = 2048):
    """(logprobs, entropy or None), both fp32 [B, L-1]: entry i scores token i+1 given tokens <= i.

    Only entries where score_mask [B, L-1] is true (and both tokens are real)
    are computed; the others are 0. The model must be patched.
    """
    B, L = input_ids.shape
    hidden, plan, _ = F.packed_hidden(model.model, input_ids, attention_mask, position_ids)
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
    head = model.lm_head
    w, b = F.full(head.weight), F.full(head.bias)
    lps, ents = [], []
    for s in range(0, rows.numel(), chunk_rows):
        r = rows[s : s + chunk_rows]
        logits = K.linear(hidden[src[r]], w, b)
        t = temperature[r] if per_row_t else temperature
        lps.append(K.token_logprobs(logits, targets[r], t))
        if with_entropy:
            ls = K.log_softmax(logits, t)
            ents.append(-(ls.exp() * ls).sum(-1))
    zeros = torch.zeros(B * (L - 1), dtype=torch.float32, device=dev)
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
    (1 or 2), so the forward reproduces its sharded reductions.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    k = L - 1 if logits_to_keep is None else int(logits_to_keep)
    if not 0 < k < L:
        raise ValueError(f"logits_to_keep must be in [1, {L - 1}] for sequences of length {L}, got {k}")
    score = torch.zeros(B, L - 1, dtype=torch.bool, device=input_ids.device)
    score[:, L - 1 - k :] = True
    with patched(model, tensor_parallel_size):
        lp, _ = score_tokens(model, input_ids, attention_mask, position_ids, score, temperature,
                             chunk_rows=chunk_rows)
    return lp[:, L - 1 - k :]
