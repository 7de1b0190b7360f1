"""The backward of the trainer's attention: standard kernels (only the forward must be invariant)."""
from __future__ import annotations

from typing import Optional

import torch

from .paged import longest_bound


def standard_attention(q, k, v, cu_seqlens, scale, dtype: Optional[torch.dtype] = None):
    """Standard causal attention of packed sequences (differentiable; NOT invariant).

    torch SDPA (flash on CUDA) on zero-padded batches [n, H, L_max, D] with
    grouped K/V, one call per bucket of sequences of similar length (padding
    at most doubles a bucket's tokens). Exact for causal attention: padding
    sits after each sequence's last token, so no real query sees it and no
    gradient reaches it. Computed in `dtype` (default: q's dtype on CUDA, fp32
    on CPU). The backward of attention_contiguous backpropagates through this.
    """
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    if dtype is None:
        dtype = q.dtype if q.is_cuda else torch.float32
    bounds = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    order = sorted((i for i in range(len(lens)) if lens[i] > 0), key=lambda i: -lens[i])
    buckets, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lens[cur[0]] > 2 * (sum(lens[j] for j in cur) + lens[i]):
            buckets.append(cur)
            cur = []
        cur.append(i)
    if cur:
        buckets.append(cur)
    rows, ids = [], []
    for bucket in buckets:
        L = lens[bucket[0]]
        pos = torch.arange(L)
        idx = torch.tensor([bounds[i] for i in bucket])[:, None] + pos[None, :]
        valid = pos[None, :] < torch.tensor([lens[i] for i in bucket])[:, None]
        idx = torch.where(valid, idx, 0).to(q.device)
        valid = valid.to(q.device)
        pad = [torch.where(valid[:, :, None, None], t[idx].to(dtype), 0).transpose(1, 2) for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*pad, is_causal=True, scale=scale, enable_gqa=G > 1)
        rows.append(o.transpose(1, 2)[valid])
        ids.append(idx[valid])
    out = q.new_zeros(T, Hq, D, dtype=dtype)
    if rows:
        out = out.index_copy(0, torch.cat(ids), torch.cat(rows))
    return out


def _setup_contig(ctx, inputs, output):
    q, k, v, cu, scale, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.scale = scale
    ctx.max_seqlen = max_seqlen


def _flash_ok(q: torch.Tensor) -> bool:
    """Whether PyTorch's FlashAttention (varlen, GQA) can take the backward."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and torch.cuda.get_device_capability(q.device)[0] >= 8
            and hasattr(torch.ops.aten, "_flash_attention_backward"))


FLASH_GRID_MAX = 1 << 20  # sequences x tokens up to which the flash backward's grid is sized by T


def flash_max_len(cu: torch.Tensor, T: int) -> int:
    """The max sequence length handed to FlashAttention's varlen kernels: T (blocks past a
    sequence's end exit at once; no sync per layer to stall the backward on the CPU) up to
    FLASH_GRID_MAX sequence-tokens, above it the exact longest length (mostly empty grid)."""
    return longest_bound(cu, T, FLASH_GRID_MAX)


def _flash_backward(q, k, v, cu, scale, g, max_len):
    """d(q, k, v) by FlashAttention's varlen kernels on the packed tensors: its forward
    (for the log-sum-exp its backward needs) then its backward. No padding, no copies."""
    cu = cu.to(torch.int32)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
    return torch.ops.aten._flash_attention_backward(
        g.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused, scale=scale)


def _backward_contig(ctx, g):
    q, k, v, cu = ctx.saved_tensors
    # max_len 1 is left to SDPA: FlashAttention's one-query path regroups heads by the
    # number of sequences and fails with GQA when some sequence is empty.
    max_len = (ctx.max_seqlen or flash_max_len(cu, q.shape[0])) if _flash_ok(q) else 0
    if max_len > 1:
        gq, gk, gv = _flash_backward(q, k, v, cu, ctx.scale, g.to(q.dtype), max_len)
        return gq, gk, gv, None, None, None
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = standard_attention(qd, kd, vd, cu, ctx.scale)
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), g.to(out.dtype))
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None
