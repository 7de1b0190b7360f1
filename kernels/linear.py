"""Batch-invariant linear layer: `linear(x, weight, bias=None)` = x @ weight.T + bias.

Guarantee: an output row's bits depend only on that input row, the weight and
the bias -- not on how many other rows share the call (1 to thousands), nor on
where the row sits -- and an output column's bits depend only on its weight row
(so a merged QKV or gate/up projection gives the same bits as separate ones).
Holds in float32, float16 and bfloat16. Each output is one fp32 dot product over
K accumulated in order (no split-K), plus the bias in fp32, rounded once.

GPU: a Triton matmul. Its tile shape may be picked per M bucket (decode-sized M
to large M): on Hopper the tile shape does not change the bits, only split-K
does, which this kernel never uses (tests/gpu enumerate every table entry).
CPU: BLAS on fixed [16, K] x [K, 256] tiles in fp32 (kernels/_cpu.py).
Backward: standard matmuls (fast, not invariant: only the forward must be).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._cpu import tiled_matmul
from ._dispatch import check_float, check_same, use_triton
from ._triton import HAS_TRITON, require_triton, tl, triton

# (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for Hopper (sm_90):
# the first row whose max M >= M is used. Every entry gives the same bits
# (no split-K); tests/gpu/test_linear_tiles.py proves it for each entry.
HOPPER_TILES = (
    (16, 16, 64, 128, 4, 5),
    (32, 32, 64, 128, 4, 5),
    (64, 64, 64, 128, 4, 4),
    (128, 64, 128, 64, 4, 4),
    (256, 128, 128, 64, 8, 4),
    (1 << 62, 128, 256, 64, 8, 3),
)
# Other GPUs and the interpreter: one safe configuration.
SAFE_TILE = (1 << 62, 64, 64, 32, 4, 3)


def tile_for(m: int, device: torch.device) -> tuple:
    """The tile configuration the kernel uses for M rows on `device`."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        for row in HOPPER_TILES:
            if m <= row[0]:
                return row
    return SAFE_TILE


if HAS_TRITON:

    @triton.jit
    def _linear_kernel(
        x_ptr, w_ptr, b_ptr, o_ptr, M, N, K,
        sxm, sxk, swn, swk, som, son,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Swizzled tile order (groups of GROUP_M row tiles) for L2 reuse; order
        # of tiles never affects a tile's arithmetic.
        group = GROUP_M * num_n
        gid = pid // group
        first_m = gid * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % gsize
        pid_n = (pid % group) // gsize
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                        mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk,
                        mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(o_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_triton(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], tile: Optional[tuple] = None) -> torch.Tensor:
    """The Triton path on a 2-D x; `tile` overrides the table (for the bitwise tile tests)."""
    require_triton()
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    _, bm, bn, bk, warps, stages = tile or tile_for(M, x.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_kernel[grid](
        x, w, b if b is not None else x, out, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=b is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out


def linear_cpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return tiled_matmul(x, w, b).to(x.dtype)


@torch.library.custom_op("onpolicy::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if use_triton(x):
        return linear_triton(x, weight, bias)
    return linear_cpu(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = grad @ weight if ctx.needs_input_grad[0] else None
    gw = grad.t() @ x if ctx.needs_input_grad[1] else None
    gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


_linear_op.register_autograd(_backward, setup_context=_setup)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch-invariant `torch.nn.functional.linear`: x [..., K], weight [N, K], bias [N]."""
    check_float("x", x)
    check_same("x", x, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1] if x.dim() else None}) must equal weight's K ({weight.shape[1]})")
    if bias is not None:
        check_same("x", x, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    out = _linear_op(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*lead, weight.shape[0])
