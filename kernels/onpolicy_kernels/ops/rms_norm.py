"""Batch-invariant RMSNorm and fused residual-add RMSNorm.

    rms_norm(x, w, eps)           = round(round(x * rsqrt(mean(x^2) + eps)) * w)
    fused_add_rms_norm(x, r, w)   -> (rms_norm(h, w, eps), h)  with h = round(x + r)

computed in fp32 and rounded to the input dtype where written (the inner
rounding is the one transformers' Llama/Qwen RMSNorm makes before the weight
multiply). `h` is rounded *before* the norm, which is what transformers computes
for the residual stream, so trainer and sampler can both use this op.

Guarantee: a row's output bits depend only on that row (and w, eps): not on how
many rows share the call, nor where the row sits; float32, float16, bfloat16.
GPU: one Triton program per row (rows of up to 128 elements: 16 rows per
program, a launch shape fixed by the row width alone), the whole row in one
block, one fixed reduction tree; per-head [T, H, D] views are read in place.
CPU: elementwise IEEE steps and a fixed pairwise tree (kernels/onpolicy_kernels/_cpu.py).
Backward: standard fp32 formulas (on the GPU one Triton kernel over rows, the
weight's gradient summed from per-program partials; not invariant: it need not be).
"""
from __future__ import annotations

import torch

from .._cpu import tree_sum
from .._dispatch import call, check_float, check_same, custom_op, rows, shaped, use_triton
from .._triton import HAS_TRITON, num_sms, require_triton, tl, triton

if HAS_TRITON:

    # M (rows) varies with the batch: not specialized, one compiled kernel serves all.
    @triton.jit(do_not_specialize=["M"])
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, o_ptr, h_ptr, M, N, B, sx0, sx1, sr, so, sh, eps,
                         HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # ROWS rows per program (fixed by N alone); row i of x sits at (i // B) * sx0 +
        # (i % B) * sx1, so per-head views [T, H, D] of a fused QKV output need no copy.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + ((rows // B) * sx0 + (rows % B) * sx1)[:, None] + cols[None, :], mask=mask, other=0.0)
        if HAS_RES:
            h = x.to(tl.float32) + tl.load(r_ptr + rows[:, None] * sr + cols[None, :], mask=mask,
                                           other=0.0).to(tl.float32)
            h = h.to(x.dtype)
            tl.store(h_ptr + rows[:, None] * sh + cols[None, :], h, mask=mask)
            x = h
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=1) / N
        inv = 1.0 / tl.sqrt_rn(var + eps)
        y = (xf * inv[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(o_ptr + rows[:, None] * so + cols[None, :], (y * w[None, :]).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(h_ptr, w_ptr, g_ptr, gh_ptr, dh_ptr, dw_ptr, M, N, sh, sg, sgh, sd, eps,
                             HAS_GH: tl.constexpr, BLOCK: tl.constexpr):
        # Rows pid, pid + P, ...: d/dh of rms_norm(h) * w (plus the h output's own
        # gradient when fused), and this program's partial sum of d/dw.
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for row in range(pid, M, P):
            r = tl.cast(row, tl.int64)
            h = tl.load(h_ptr + r * sh + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + r * sg + cols, mask=mask, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
            n = h * inv
            gn = g * w
            d = inv * (gn - n * (tl.sum(gn * n, axis=0) / N))
            if HAS_GH:
                d += tl.load(gh_ptr + r * sgh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dh_ptr + r * sd + cols, d.to(dh_ptr.dtype.element_ty), mask=mask)
            dw += g * n
        tl.store(dw_ptr + pid * N + cols, dw, mask=mask)


def _backward_triton(h, weight, eps, g, g_h=None):
    """(d/dh, d/dw) on the GPU; d/dh includes g_h (the fused op's h output gradient)."""
    h, g = _unit_stride(h), _unit_stride(g)
    g_h = _unit_stride(g_h) if g_h is not None else None
    M, N = h.shape
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    programs = max(1, min(M, 4 * num_sms(h.device) if h.is_cuda else 4))
    partial = torch.empty(programs, N, dtype=torch.float32, device=h.device)
    if M:
        BLOCK = triton.next_power_of_2(N)
        _rms_norm_bwd_kernel[(programs,)](
            h, weight.contiguous(), g, g_h if g_h is not None else g, dh, partial, M, N,
            h.stride(0), g.stride(0), g_h.stride(0) if g_h is not None else 0, dh.stride(0), eps,
            HAS_GH=g_h is not None, BLOCK=BLOCK, num_warps=min(16, max(1, BLOCK // 256)),
        )
    else:
        partial.zero_()
    return dh, partial.sum(0).to(weight.dtype)


def launch_shape(n: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) of the forward kernel for rows of n elements: a function
    of n alone (never of the number of rows), so a row's reduction tree is fixed."""
    block = triton.next_power_of_2(n)
    if block >= 1024:
        return 1, block, min(16, max(1, block // 256))
    return min(16, 2048 // block), block, 4


def _triton(x, residual, weight, eps):
    """x [M, N], or [A, B, N] with any strides but a unit last one (read in place)."""
    require_triton()
    if x.dim() != 2 and (x.dim() != 3 or residual is not None):  # the kernel: 2-D rows, or 3-D without residual
        rows = _rows(x.shape)
        out, h = _triton(x.reshape(rows), residual.reshape(rows) if residual is not None else None, weight, eps)
        return out.view(x.shape), h.view(x.shape)
    # The kernel addresses columns with stride 1: make the last dims contiguous.
    x, weight = _unit_stride(x), weight.contiguous()
    residual = _unit_stride(residual) if residual is not None else None
    N = x.shape[-1]
    if x.dim() == 3:
        B, sx0, sx1 = x.shape[1], x.stride(0), x.stride(1)
    else:
        B, sx0, sx1 = 1, x.stride(0), 0
    M = x.numel() // N if N else 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if M:
        rows, block, warps = launch_shape(N)
        _rms_norm_kernel[(triton.cdiv(M, rows),)](
            x, residual if residual is not None else x, weight, out, h, M, N, B, sx0, sx1,
            residual.stride(0) if residual is not None else 0, N, N, eps,
            HAS_RES=residual is not None, ROWS=rows, BLOCK=block, num_warps=warps,
        )
    return out, h


def _rows(shape: torch.Size) -> tuple[int, int]:
    """[..., N] as (rows, N); not reshape(-1, N), which fails for N = 0."""
    return shape[:-1].numel(), shape[-1]


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
    shape = x.shape
    x, g = x.reshape(_rows(shape)), g.reshape(_rows(shape))
    if use_triton(x):
        gh, gw = _backward_triton(x, weight, ctx.eps, g)
    else:
        gh, gw = _norm_backward(x, weight, ctx.eps, g)
    return gh.to(x.dtype).view(shape), gw.to(weight.dtype), None


_rms_norm_op.register_autograd(_backward_norm, setup_context=_setup_norm)


def _setup_fused(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _backward_fused(ctx, g_out, g_h):
    h, weight = ctx.saved_tensors
    shape = h.shape
    h, g_out = h.reshape(_rows(shape)), g_out.reshape(_rows(shape))
    g_h = g_h.reshape(_rows(shape)) if g_h is not None else None
    if use_triton(h):
        gh, gw = _backward_triton(h, weight, ctx.eps, g_out, g_h)
    else:
        gh, gw = _norm_backward(h, weight, ctx.eps, g_out)
        if g_h is not None:
            gh = gh + g_h.float()
    gh = gh.to(h.dtype).view(shape)
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
    if x.dim() == 3 and x.stride(-1) == 1:  # e.g. per-head q/k views of a fused QKV output: read in place
        return call(_rms_norm_op, x, weight, float(eps))
    return shaped(call(_rms_norm_op, rows(x), weight, float(eps)), shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual), the sum rounded to x.dtype before the norm."""
    _check(x, weight, residual)
    shape = x.shape
    out, h = call(_fused_op, rows(x), rows(residual), weight, float(eps))
    return shaped(out, shape), shaped(h, shape)
