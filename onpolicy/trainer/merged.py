"""One linear for the projections that read the same input (q/k/v, gate/up), as vLLM runs them.

vLLM multiplies by the concatenated weight (QKVParallelLinear,
MergedColumnParallelLinear). onpolicy's `linear` gives every output column the
bits of its own weight row whatever else shares the call, so the merged product
equals the separate ones bitwise; merging saves a training step two thirds of
the launches and host time of those projections, forward and backward.

The concatenated weight is not kept for the backward (it would hold a second
copy of every layer's projection weights until then): the backward concatenates
again. The backward is standard (one matmul for the input's gradient, one for
all the weights'), like `linear`'s.
"""
from __future__ import annotations

from typing import Sequence

import torch

import onpolicy_kernels as K

from . import lora


class _MergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n, *params):  # params: n weights, then n biases or none
        ws, bs = params[:n], params[n:]
        out = K.linear(x, torch.cat(ws), torch.cat(bs) if bs else None)
        ctx.save_for_backward(x, *ws)
        ctx.n, ctx.has_bias = n, bool(bs)
        return out

    @staticmethod
    def backward(ctx, g):
        x, *ws = ctx.saved_tensors
        n, need = ctx.n, ctx.needs_input_grad
        sizes = [w.shape[0] for w in ws]
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        gx = g @ torch.cat(ws) if need[0] else None
        gws = [None] * n
        if any(need[2 : 2 + n]):
            parts = (g2.t() @ x2).split(sizes, 0)
            gws = [p if need[2 + i] else None for i, p in enumerate(parts)]
        gbs = []
        if ctx.has_bias:
            parts = g2.sum(0).split(sizes)
            gbs = [p if need[2 + n + i] else None for i, p in enumerate(parts)]
        return (gx, None, *gws, *gbs)


def merged_linear(x: torch.Tensor, modules: Sequence[torch.nn.Module]) -> torch.Tensor:
    """cat([linear(x, m.weight, m.bias) for m in modules], -1), bitwise, from one linear call.

    Modules with some biases but not all run separately, and their outputs are
    concatenated (adding a zero bias would turn a -0.0 into +0.0)."""
    ws = [lora.weight_of(m) for m in modules]  # a LoRA layer: its merged weight (trainer/lora.py)
    bs = [m.bias for m in modules]
    if any(b is None for b in bs) and not all(b is None for b in bs):
        return torch.cat([K.linear(x, w, b) for w, b in zip(ws, bs)], dim=-1)
    return _MergedLinear.apply(x, len(ws), *ws, *([] if bs[0] is None else bs))
