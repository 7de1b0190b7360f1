"""Batch-invariant linear layer: `linear(x, weight, bias=None)` = x @ weight.T + bias.

Guarantee: an output row's bits depend only on that input row, the weight and
the bias -- not on how many other rows share the call (1 to thousands), nor on
where the row sits -- and an output column's bits depend only on its weight row
(so a merged QKV or gate/up projection gives the same bits as separate ones).
Holds in float32, float16 and bfloat16. Each output is one fp32 dot product over
K accumulated in order (no split-K), plus the bias in fp32, rounded once.

GPU: a Triton matmul (pointer loads, or on Hopper TMA tensor-descriptor loads,
optionally persistent). Its tile configuration is picked per M bucket and N
class (triton_kernels.py, configs/sm_90.json): on Hopper neither the tile shape, the warps, the pipeline
depth nor the load path changes the bits -- only split-K would, and this kernel
never splits K (tests/gpu/test_linear_tiles.py proves every table entry
bitwise equal to SAFE_TILE). Other GPUs use SAFE_TILE for every M.
On Hopper a bf16/fp16 call without bias (M <= 1024) may instead run a cuBLASLt
algorithm that never splits K, chosen per weight shape and M bucket for speed, and
used only after its output was checked bitwise equal to this kernel's, per
algorithm and bucket, on seeded operands built to expose any other summation
order (chooser.py).
CPU: BLAS on fixed [64, K] x [K, 256] tiles in fp32 (kernels/onpolicy_kernels/_cpu.py).
Backward: standard matmuls (fast, not invariant: only the forward must be).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import chooser as linear_choice
from ..._dispatch import call, check_float, check_out, check_same, custom_op, rows, shaped, use_triton
from .cpu import linear_cpu
from .triton_kernels import _is_hopper, linear_triton, tile_for


def chooser_for(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]):
    """The Hopper kernel chooser (linear_choice.py) when it may serve this call, else None."""
    if not x.is_cuda or 0 in (x.shape[0], x.shape[1], w.shape[0]):
        return None
    if not linear_choice.enabled(x.device, _is_hopper(x.device.index if x.device.index is not None
                                                       else torch.cuda.current_device())):
        return None
    ch = linear_choice.chooser(_triton_reference)
    return ch if ch is not None and ch.eligible(x, w, b) else None


def _triton_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return linear_triton(x, w, None)


def linear_gpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GPU path on a 2-D x: a verified no-split cuBLASLt algorithm where the chooser
    found one faster for this weight and M bucket, else the Triton kernel. Same bits either way.
    `out`: a [M, N] tensor with contiguous rows to write into (else a new one)."""
    ch = chooser_for(x, w, b)
    if ch is None:
        return linear_triton(x, w, b, out=out)
    if out is None:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    algo = ch.pick(x, w, out)
    if algo is None:
        return linear_triton(x, w, b, out=out)
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # cuBLASLt launches on the current device's context
            return ch.lt.run(x, w, out, algo)
    return ch.lt.run(x, w, out, algo)


def path_for(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> str:
    """What ran (or would run) `linear(x, w, b)` on a 2-D x: a cuBLASLt algorithm or a Triton tile."""
    ch = chooser_for(x, w, b)
    label = ch.label(x, w) if ch is not None else None
    if label and label.startswith("cuBLASLt"):
        return label
    return f"triton {tile_for(x.shape[0], x.device, w.shape[0], w.shape[1])[1:]}"


@custom_op("onpolicy::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if use_triton(x):
        return linear_gpu(x, weight, bias)
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
    out = call(_linear_op, rows(x), weight, bias)
    return shaped(out, x.shape[:-1] + (weight.shape[0],))


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`linear(x, weight)` written into `out` and returned: x [M, K], out [M, N] of x's dtype with
    contiguous rows (e.g. the first M rows of a larger buffer, as a CUDA graph's static output).
    The same bits as `linear(x, weight)`, whatever `out` is a view of. Not differentiable."""
    check_float("x", x)
    check_same("x", x, "weight", weight)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_into takes x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    check_out(out, (x.shape[0], weight.shape[0]), x.dtype, x.device)
    if use_triton(x):
        return linear_gpu(x, weight, None, out=out)
    return out.copy_(linear_cpu(x, weight, None))
