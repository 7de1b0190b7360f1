"""Batch-invariant gated activation: `silu_and_mul(x) = silu(x[..., :d]) * x[..., d:]`.

Computed in fp32 as g / (1 + exp(-g)) * u and rounded once to x.dtype.
Guarantee: an element's bits depend only on its two inputs, never on the other
rows in the call or their number; float32, float16, bfloat16. GPU: one Triton
elementwise kernel. CPU: exp on fixed 64-aligned chunks (kernels/onpolicy_kernels/_cpu.py), the
rest IEEE-exact elementwise steps. Backward: standard formula (on the GPU one
fused Triton kernel, fp32 math, not invariant: it need not be).
"""
from __future__ import annotations

import torch

from .._cpu import chunked
from .._dispatch import call, check_float, custom_op, rows, shaped, use_triton
from .._triton import HAS_TRITON, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, o_ptr, D, sx, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + D + cols, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(o_ptr + row * so + cols, y.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_bwd_kernel(x_ptr, g_ptr, dx_ptr, D, sx, sg, sd, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        a = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + D + cols, mask=mask, other=0.0).to(tl.float32)
        gr = tl.load(g_ptr + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))
        da = gr * u * s * (1.0 + a * (1.0 - s))
        du = gr * a * s
        tl.store(dx_ptr + row * sd + cols, da.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + row * sd + D + cols, du.to(dx_ptr.dtype.element_ty), mask=mask)


def _backward_triton(x, grad):
    x = x if x.stride(-1) == 1 else x.contiguous()
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    M, D2 = x.shape
    dx = torch.empty(M, D2, dtype=x.dtype, device=x.device)
    if M:
        BLOCK = 1024
        _silu_and_mul_bwd_kernel[(M, triton.cdiv(D2 // 2, BLOCK))](
            x, grad, dx, D2 // 2, x.stride(0), grad.stride(0), dx.stride(0), BLOCK=BLOCK, num_warps=4)
    return dx


def _triton(x):
    require_triton()
    if x.stride(-1) != 1:  # the kernel addresses columns with stride 1
        x = x.contiguous()
    M, D2 = x.shape
    d = D2 // 2
    out = torch.empty(M, d, dtype=x.dtype, device=x.device)
    if M:
        BLOCK = 1024
        _silu_and_mul_kernel[(M, triton.cdiv(d, BLOCK))](x, out, d, x.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


def _cpu(x):
    d = x.shape[-1] // 2
    g = x[:, :d].float()
    u = x[:, d:].float()
    return (g / (1.0 + chunked(torch.exp, -g)) * u).to(x.dtype).contiguous()


@custom_op("onpolicy::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return _triton(x) if use_triton(x) else _cpu(x)


@_silu_and_mul_op.register_fake
def _(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if use_triton(x):
        return _backward_triton(x, grad)
    d = x.shape[-1] // 2
    g, u, gr = x[:, :d].float(), x[:, d:].float(), grad.float()
    s = torch.sigmoid(g)
    silu = g * s
    dg = gr * u * s * (1 + g * (1 - s))
    du = gr * silu
    return torch.cat([dg, du], dim=-1).to(x.dtype)


_silu_and_mul_op.register_autograd(_backward, setup_context=_setup)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x [..., 2d]; one rounding (see module docstring)."""
    check_float("x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate | up), got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    return shaped(call(_silu_and_mul_op, rows(x)), lead + (x.shape[-1] // 2,))
