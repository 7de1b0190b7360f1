"""Top-k / top-p / min-p truncation of a distribution, batch-invariant, shared by sampler and trainer.

    truncation_thresholds(logprobs, top_k=0, top_p=1.0, min_p=0.0)  -> fp32 [...]  (tau per row)
    truncate_logprobs(logprobs, top_k=0, top_p=1.0, min_p=0.0)      -> fp32 [..., V]
    truncated_log_softmax(logits, temperature=1.0, *, top_k, top_p, min_p)           -> fp32 [..., V]
    truncated_token_logprobs(logits, token_ids, temperature=1.0, *, top_k, top_p, min_p) -> fp32 [...]

The input is the *processed* logprobs lp = `log_softmax(logits, temperature)` (this package's
invariant op), which the vLLM plugin's sampler and the trainer already compute bitwise equal. Each
setting is a number for every row or a tensor of one value per row; "off" is top_k <= 0 or
top_k >= V, top_p == 1, min_p == 0 (vLLM's and TRL's conventions). A row is *truncated* when one of
its settings is on; the others are returned untouched (the very bits of lp).

The rule, per truncated row, on lp sorted in descending order, s_0 >= s_1 >= ... (values only):

  1. min-p (as vLLM, first): rank r survives if fp32(s_r - s_0) >= fp32(log(min_p)), i.e.
     p_r >= min_p * p_max.
  2. top-k: rank r survives if r < k.
  3. top-p, on the distribution left by 1-2 renormalised: with e_r = exp(s_r - s_0) for the
     surviving ranks (0 for the others), Z their fixed-tree sum and C_r = e_0 + ... + e_{r-1}
     (a fixed-order prefix sum), rank r survives if C_r < top_p * Z: the smallest head of the
     sorted distribution whose mass reaches top_p (vLLM's rule, accumulated from the top).

  The survivors are a head of the sorted row, ranks 0..n-1 (n >= 1: rank 0 always survives), and
  the row's threshold is tau = s_{n-1}. **Tie rule: every token with lp >= tau is kept**, so tokens
  of equal logprob are kept or dropped together, whatever their ids or positions; the kept set may
  exceed k (vLLM's top-k keeps ties the same way; its top-p splits a tie by its sort's order, which
  this rule replaces) and the top-p mass may then exceed top_p by the tied tokens.

The truncated distribution's logprobs are `log_softmax(where(lp >= tau, lp, -inf), 1.0)` with the
same invariant log_softmax: -inf outside the kept set, renormalised inside.

Guarantee: a row's threshold and output bits depend only on that row's values and settings, never
on the other rows, their settings, their number or the row's position (the sort's values are unique
whatever its algorithm; the sums run in an order fixed by the rank alone -- the prefix sum of rank
r reads ranks < r only, and trailing zeros do not change the tree's sum -- so a batch that sorts
only its largest k columns gives the bits of a full sort). The CPU path computes exp and log through
`_cpu.chunked` (one code path per element). On CUDA the same torch code runs (sort / topk values,
elementwise arithmetic, the same trees); it is invariant by the same argument but has not been run
on a GPU yet, and CPU and GPU bits differ (sampler and trainer must share a device kind, as for every
op here). Backward: through log_softmax; the mask itself is piecewise constant (no gradient).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from .._cpu import chunked, tree_sum
from .._dispatch import call, check_float, custom_op, rows, shaped
from .logprobs import log_softmax, token_logprobs

Setting = Union[int, float, torch.Tensor, None]
ROWS_PER_CALL = 64  # rows of one sort on the CPU: bounds the temporaries; rows are independent anyway
GPU_ROWS_PER_CALL = 512  # on CUDA (~0.3 GB per fp32 temporary at V = 151936)


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x) if x.is_cuda else chunked(torch.exp, x)


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x) if x.is_cuda else chunked(torch.log, x)


def _prefix_sum(e: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum over the last dim (Hillis-Steele: pass j adds the value 2^j to the left).

    Entry r's additions depend on r alone (not on the row's length, nor on entries >= r), so a longer
    or shorter row gives entry r the same bits."""
    c = e
    n = e.shape[-1]
    sh = 1
    while sh < n:
        c = torch.cat([c[..., :sh], c[..., sh:] + c[..., :-sh]], dim=-1)
        sh *= 2
    return torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], dim=-1)


def _block_thresholds(lp: torch.Tensor, k: torch.Tensor, p: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """tau per row of a block of truncated rows (see the module docstring)."""
    V = lp.shape[-1]
    kmax = int(k.max())
    if kmax < V:  # every row of the block has a top-k: its largest kmax values suffice (same bits)
        s = torch.topk(lp, kmax, dim=-1, largest=True, sorted=True).values
    else:
        s = torch.sort(lp, dim=-1, descending=True).values
    L = s.shape[-1]
    d = s - s[:, :1]
    rank = torch.arange(L, device=lp.device)
    keep = (rank[None, :] < k[:, None]) & (d >= log_min_p[:, None])
    top_p = p < 1.0
    if bool(top_p.any()):
        e = torch.where(keep, _exp(d), torch.zeros_like(d))
        z = tree_sum(e)  # [M, 1]
        keep &= (_prefix_sum(e) < p[:, None] * z) | ~top_p[:, None]
    n = keep.sum(-1)  # >= 1: rank 0 has d = 0, C_0 = 0 < top_p * Z
    return s.gather(1, (n - 1)[:, None])[:, 0]


def _active(k: torch.Tensor, p: torch.Tensor, min_p: torch.Tensor, V: int) -> torch.Tensor:
    """Rows whose settings truncate (as vLLM's input batch decides: 0 < top_k < V, top_p < 1, min_p > 0)."""
    return ((k > 0) & (k < V)) | (p < 1.0) | (min_p > 0.0)


def _thresholds_impl(lp: torch.Tensor, k: torch.Tensor, p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    M, V = lp.shape
    tau = torch.full((M,), float("-inf"), dtype=torch.float32, device=lp.device)
    idx = _active(k, p, min_p, V).nonzero()[:, 0]
    if idx.numel() == 0:
        return tau
    kk = torch.where((k > 0) & (k < V), k, V)[idx].long()
    pp = p[idx]
    lmp = _log(min_p[idx].float()[:, None])[:, 0]  # log(0) = -inf: min-p off keeps every rank
    block = GPU_ROWS_PER_CALL if lp.is_cuda else ROWS_PER_CALL
    for r in range(0, idx.numel(), block):
        sl = slice(r, r + block)
        tau[idx[sl]] = _block_thresholds(lp[idx[sl]].float(), kk[sl], pp[sl], lmp[sl])
    return tau


def _check_values(k, p, min_p):
    """Value checks (skipped on the GPU, where they would cost a host sync)."""
    if not k.is_cuda and k.numel():
        if bool((k < -1).any()):
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {int(k.min())}")
        if not bool(((p > 0) & (p <= 1)).all()):
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {p[~((p > 0) & (p <= 1))][0].item()}")
        if not bool(((min_p >= 0) & (min_p <= 1)).all()):
            raise ValueError(f"min_p must be in [0, 1] (0.0 = off), got "
                             f"{min_p[~((min_p >= 0) & (min_p <= 1))][0].item()}")


@custom_op("onpolicy::truncation_thresholds", mutates_args=())
def _thresholds_op(logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    _check_values(top_k, top_p, min_p)
    return _thresholds_impl(logprobs, top_k, top_p, min_p)


@_thresholds_op.register_fake
def _(logprobs, top_k, top_p, min_p):
    return logprobs.new_empty(logprobs.shape[0], dtype=torch.float32)


def _row_setting(name: str, value: Setting, rows_: int, device, dtype, off) -> torch.Tensor:
    if value is None:
        value = off
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=dtype).reshape(-1)
        if t.numel() == 1:
            t = t.expand(rows_)
        if t.numel() != rows_:
            raise ValueError(f"{name} has {t.numel()} values for {rows_} rows; give one number or one per row")
        return t.contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {value!r}")
    if dtype == torch.int64 and not float(value).is_integer():
        raise ValueError(f"top_k must be an integer, got {value!r}")
    if dtype != torch.int64 and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return torch.full((rows_,), value, dtype=dtype, device=device)


def row_settings(top_k: Setting, top_p: Setting, min_p: Setting, rows_: int, device):
    """(top_k int64, top_p fp32, min_p fp32), one per row. Floats are rounded to fp32 first, as vLLM
    stores them, so a Python float and vLLM's stored value give the same threshold."""
    out = (_row_setting("top_k", top_k, rows_, device, torch.int64, 0),
           _row_setting("top_p", top_p, rows_, device, torch.float32, 1.0),
           _row_setting("min_p", min_p, rows_, device, torch.float32, 0.0))
    _check_values(*out)
    return out


def is_truncating(top_k: Setting = 0, top_p: Setting = 1.0, min_p: Setting = 0.0, vocab_size: int | None = None) -> bool:
    """Whether numbers (not tensors) ask for any truncation. A tensor counts as truncating."""
    if any(isinstance(v, torch.Tensor) for v in (top_k, top_p, min_p)):
        return True
    k = top_k or 0
    return (k > 0 and (vocab_size is None or k < vocab_size)) or (top_p is not None and top_p < 1.0) \
        or (min_p is not None and min_p > 0.0)


def truncation_thresholds(logprobs: torch.Tensor, top_k: Setting = 0, top_p: Setting = 1.0,
                          min_p: Setting = 0.0) -> torch.Tensor:
    """tau per row (fp32, shape logprobs.shape[:-1]): the row keeps the tokens with logprob >= tau;
    -inf for rows that do not truncate. See the module docstring for the rule."""
    check_float("logprobs", logprobs)
    x = rows(logprobs)
    k, p, mp = row_settings(top_k, top_p, min_p, x.shape[0], logprobs.device)
    with torch.no_grad():
        tau = call(_thresholds_op, x.detach(), k, p, mp)
    return shaped(tau, logprobs.shape[:-1])


def truncate_logprobs(logprobs: torch.Tensor, top_k: Setting = 0, top_p: Setting = 1.0,
                      min_p: Setting = 0.0) -> torch.Tensor:
    """The logprobs of the truncated, renormalised distribution (fp32 [..., V]): -inf outside the kept
    set. Rows that do not truncate are returned as given, bitwise. Differentiable."""
    check_float("logprobs", logprobs)
    x = rows(logprobs).float()
    k, p, mp = row_settings(top_k, top_p, min_p, x.shape[0], logprobs.device)
    active = _active(k, p, mp, x.shape[-1])
    if not bool(active.any()):
        return shaped(x, logprobs.shape)
    with torch.no_grad():
        tau = call(_thresholds_op, x.detach(), k, p, mp)
    renorm = log_softmax(x.masked_fill(x < tau[:, None], float("-inf")), 1.0)
    return shaped(torch.where(active[:, None], renorm, x), logprobs.shape)


def truncated_log_softmax(logits: torch.Tensor, temperature=1.0, *, top_k: Setting = 0, top_p: Setting = 1.0,
                          min_p: Setting = 0.0) -> torch.Tensor:
    """`truncate_logprobs(log_softmax(logits, temperature), top_k, top_p, min_p)`: what the vLLM plugin's
    sampler returns as processed logprobs and samples from."""
    return truncate_logprobs(log_softmax(logits, temperature), top_k, top_p, min_p)


def truncated_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature=1.0, *,
                             top_k: Setting = 0, top_p: Setting = 1.0, min_p: Setting = 0.0) -> torch.Tensor:
    """`truncated_log_softmax(...)[..., token_ids]`, bitwise; with every setting off (numbers), exactly
    `token_logprobs(logits, token_ids, temperature)`. A token outside the kept set scores -inf."""
    if not is_truncating(top_k, top_p, min_p, logits.shape[-1]):
        return token_logprobs(logits, token_ids, temperature)
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    out = truncated_log_softmax(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return out.gather(-1, token_ids.to(out.device).long()[..., None])[..., 0]
