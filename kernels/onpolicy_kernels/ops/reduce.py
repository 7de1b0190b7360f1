"""Rank-order sum of tensor-parallel partial outputs: `rank_sum(parts)`.

parts [W, ...] holds W partial outputs (one per tensor-parallel rank, in rank
order, each in the model dtype); the result [...] is

    round_to_dtype(((float(parts[0]) + float(parts[1])) + float(parts[2])) + ... )

accumulated in float32, left to right in rank order,
rounded once to parts.dtype (round to nearest even). Guarantee: an element's bits
depend only on its W partials and their order, never on the other elements, the
shape, the device's all-reduce algorithm or the message size. This is the
reduction the vLLM plugin runs for a row-parallel layer at tensor_parallel_size
> 2 (after an all-gather of the partials) and the trainer runs to mirror it.

GPU: one Triton elementwise kernel (fp32 adds in order, one conversion). CPU: the
same steps as torch elementwise ops (each IEEE-exact per element). Both are the
same arithmetic; sampler and trainer run the same path when they run on the same
kind of device. Backward: each partial's gradient is the output's gradient.
"""
from __future__ import annotations

import torch

from .._dispatch import call, check_float, custom_op, use_triton
from .._triton import HAS_TRITON, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rank_sum_kernel(p_ptr, o_ptr, n, W: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ptrs = p_ptr + offs
        acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        for _ in tl.static_range(1, W):
            ptrs += n  # the next rank's partial (pointer steps: no int32 product to overflow)
            acc = acc + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


def _torch(parts: torch.Tensor) -> torch.Tensor:
    acc = parts[0].to(torch.float32, copy=True)
    for r in range(1, parts.shape[0]):
        acc.add_(parts[r])  # promoted to the accumulator's dtype (exact), one IEEE addition per element
    return acc.to(parts.dtype)


def _triton(parts: torch.Tensor) -> torch.Tensor:
    require_triton()
    parts = parts.contiguous()
    W = parts.shape[0]
    out = torch.empty(parts.shape[1:], dtype=parts.dtype, device=parts.device)
    n = out.numel()
    if n:
        BLOCK = 1024
        _rank_sum_kernel[(triton.cdiv(n, BLOCK),)](parts, out, n, W=W, BLOCK=BLOCK, num_warps=4)
    return out


@custom_op("onpolicy::rank_sum", mutates_args=())
def _rank_sum_op(parts: torch.Tensor) -> torch.Tensor:
    return _triton(parts) if use_triton(parts) else _torch(parts)


@_rank_sum_op.register_fake
def _(parts):
    return parts.new_empty(parts.shape[1:])


def _setup(ctx, inputs, output):
    ctx.world = inputs[0].shape[0]


def _backward(ctx, grad):
    return grad.unsqueeze(0).expand(ctx.world, *grad.shape)


_rank_sum_op.register_autograd(_backward, setup_context=_setup)


def rank_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum parts [W, ...] over dim 0 in rank order, accumulated in float32, rounded once (module docstring)."""
    check_float("parts", parts)
    if parts.dim() < 1 or parts.shape[0] < 1:
        raise ValueError(f"rank_sum needs parts [W, ...] with W >= 1, got shape {tuple(parts.shape)}")
    return call(_rank_sum_op, parts)
