"""Batch-invariant RMSNorm and fused residual-add RMSNorm.

    rms_norm(x, w, eps)           = round(round(x * rsqrt(mean(x^2) + eps)) * w)
    fused_add_rms_norm(x, r, w)   -> (rms_norm(h, w, eps), h)  with h = round(x + r)

computed in fp32 and rounded to the input dtype where written (the inner
rounding is the one transformers' Llama/Qwen RMSNorm makes before the weight
multiply). `h` is rounded *before* the norm, which is what transformers computes
for the residual stream, so trainer and sampler can both use this op.

Guarantee: a row's output bits depend only on that row (and w, eps): not on how
many rows share the call, nor where the row sits; float32, float16, bfloat16.
GPU: one Triton program per row, the whole row in one block, one fixed
reduction tree. CPU: elementwise IEEE steps and a fixed pairwise tree
(kernels/_cpu.py). Backward: standard fp32 formulas.
"""
from __future__ import annotations

import torch

from ._cpu import tree_sum
from ._dispatch import check_float, check_same, custom_op, use_triton
from ._triton import HAS_TRITON, require_triton, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, h_ptr, N, sx, sr, so, sh, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
        if HAS_RES:
            h = (x.to(tl.float32) + tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0).to(tl.float32))
            h = h.to(x.dtype)
            tl.store(h_ptr + row * sh + cols, h, mask=mask)
            x = h
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / N
        inv = 1.0 / tl.sqrt_rn(var + eps)
        y = (xf * inv).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * so + cols, (y * w).to(o_ptr.dtype.element_ty), mask=mask)


def _triton(x, residual, weight, eps):
    require_triton()
    # The kernel addresses columns with stride 1: make the last dims contiguous.
    x, weight = _unit_stride(x), weight.contiguous()
    residual = _unit_stride(residual) if residual is not None else None
    M, N = x.shape
    out = x.new_empty(x.shape)
    h = x.new_empty(x.shape) if residual is not None else out
    if M:
        BLOCK = triton.next_power_of_2(N)
        _rms_norm_kernel[(M,)](
            x, residual if residual is not None else x, weight, out, h, N,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), h.stride(0), eps,
            HAS_RES=residual is not None, BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)),
        )
    return out, h


def _unit_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _cpu(x, residual, weight, eps):
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    var = tree_sum(xf * xf) / xf.shape[-1]
    inv = 1.0 / torch.sqrt(var + eps)
    y = (xf * inv).to(x.dtype).float()
    return (y * weight.float()).to(x.dtype).contiguous(), x.contiguous()


@custom_op("onpolicy::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return (_triton if use_triton(x) else _cpu)(x, None, weight, eps)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape)


@custom_op("onpolicy::fused_add_rms_norm", mutates_args=())
def _fused_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, h = (_triton if use_triton(x) else _cpu)(x, residual, weight, eps)
    return out, h


@_fused_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _norm_backward(h, weight, eps, g):
    """d/dh and d/dw of rms_norm(h) * w, standard fp32 math (the rounding is ignored)."""
    hf, gf, wf = h.float(), g.float(), weight.float()
    inv = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    n = hf * inv
    gn = gf * wf
    gh = inv * (gn - n * (gn * n).mean(-1, keepdim=True))
    gw = (gf * n).sum(0)
    return gh, gw


def _setup_norm(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward_norm(ctx, g):
    x, weight = ctx.saved_tensors
    gh, gw = _norm_backward(x, weight, ctx.eps, g)
    return gh.to(x.dtype), gw.to(weight.dtype), None


_rms_norm_op.register_autograd(_backward_norm, setup_context=_setup_norm)


def _setup_fused(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _backward_fused(ctx, g_out, g_h):
    h, weight = ctx.saved_tensors
    gh, gw = _norm_backward(h, weight, ctx.eps, g_out)
    if g_h is not None:
        gh = gh + g_h.float()
    gh = gh.to(h.dtype)
    return gh, gh, gw.to(weight.dtype), None


_fused_op.register_autograd(_backward_fused, setup_context=_setup_fused)


def _check(x, weight, residual=None):
    check_float("x", x)
    check_same("x", x, "weight", weight)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")
    if residual is not None:
        check_same("x", x, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Batch-invariant RMSNorm over the last dim of x [..., N] (see module docstring)."""
    _check(x, weight)
    shape = x.shape
    return _rms_norm_op(x.reshape(-1, shape[-1]), weight, float(eps)).view(shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype before the norm."""
    _check(x, weight, residual)
    shape = x.shape
    out, h = _fused_op(x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]), weight, float(eps))
    return out.view(shape), h.view(shape)
