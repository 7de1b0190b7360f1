"""Batch-invariant mixture-of-experts (top-k softmax routing, gated SiLU experts, no shared expert).

    logits          = linear(x, W_gate)                              (model dtype, the gate's linear)
    weights, ids    = moe_route(logits, top_k, renormalize)          (fp32 weights, int64 ids)
    out             = moe_experts(x, weights, ids, W13, W2)          (model dtype)

where moe_experts computes, for every token t and slot j (expert e = ids[t, j]),

    y[t, j] = linear(silu_and_mul(linear(x[t], W13[e])), W2[e])      (model dtype)
    out[t]  = round(((w[t,0] * y[t,0]) + w[t,1] * y[t,1]) + ...)     (fp32, slot order, one rounding)

`moe(x, W_gate, W13, W2, top_k, renormalize)` runs the three steps and also returns the logits
(the trainer's router auxiliary loss reads them). The layouts are vLLM's and transformers 5's:
W13 [E, 2I, H] (gate rows then up rows), W2 [E, H, I].

Guarantee: a token's output bits (and its expert choice and routing weights) depend only on its
own hidden state and the weights -- not on how many tokens share the call, where the token sits,
nor how many tokens go to each expert; float32, float16, bfloat16.

* Router: softmax over the experts in fp32 from the logits upcast to fp32 (max by a fixed tree,
  exp elementwise -- on the CPU on fixed 64-aligned chunks --, sum by a fixed pairwise tree,
  one division); top-k by probability, largest first, **a tie goes to the lower expert index**
  (the slot order is this order); with `renormalize` (`norm_topk_prob`) the k probabilities
  are divided by their sum taken in slot order in fp32. Non-finite logits raise.
* Experts: tokens are grouped by expert (the permutation only moves rows), and each expert's
  rows run through onpolicy's row-invariant `linear` and `silu_and_mul`; a row's bits do not
  depend on the rows beside it, so neither on the expert's load nor on the grouping.
* Combine: the k expert outputs are upcast to fp32, multiplied by their fp32 weights and added
  in slot order, each step an IEEE-exact elementwise op, then rounded once to the model dtype.

Paths: CPU tensors run the composition above (linear is BLAS on fixed tiles, see _cpu.py; the
router's exp on fixed chunks). CUDA tensors (and ONPOLICY_KERNELS_BACKEND=triton) run
moe_triton.py: a Triton router (the same softmax tree and tie rule), an on-device alignment of
the (token, slot) pairs by expert into worst-case-sized buffers, grouped gate/up+SiLU and down
GEMMs with one fixed tile configuration per device kind, dtype and weight shape, and a Triton
combine -- five launches, no host sync, no data-dependent shape (CUDA-graph capturable); the
same formula step by step (gate/up rounded to the model dtype, g / (1 + exp(-g)) * u in fp32
rounded once, the down GEMM, the fp32 slot-order combine), with the GPU's exp and MMA bits.
Tested under the interpreter (tests/kernels/test_moe_triton.py) and on CUDA
(tests/gpu/test_moe_gpu.py). Backward: standard ops (the router's by recomputing a plain
softmax / gather / renormalise under autograd; on the CPU the experts' through linear and
silu_and_mul's own formulas, on CUDA a per-expert recomputation in the model dtype; the
combine's by its two-line formula).
"""
from __future__ import annotations

import torch

from .._cpu import chunked, tree_max, tree_sum
from .._dispatch import _eager_grad, call, check_float, check_same, custom_op, use_triton
from .activation import silu_and_mul
from .linear import linear
from .moe_triton import combine_triton, expert_outputs_triton, route_triton


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x) if x.is_cuda else chunked(torch.exp, x)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax of each row, every step row-local (see the module docstring)."""
    lf = logits.float()
    e = _exp(lf - tree_max(lf))
    return e / tree_sum(e)


# --------------------------------------------------------------------------- router

@custom_op("onpolicy::moe_route", mutates_args=())
def _route_op(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(logits):
        return route_triton(logits, top_k, renormalize)
    p = _probs(logits)
    T, E = p.shape
    q = p.clone()
    ids = torch.empty(T, top_k, dtype=torch.int64, device=p.device)
    vals = torch.empty(T, top_k, dtype=torch.float32, device=p.device)
    for j in range(top_k):
        # argmax returns the first (lowest-index) maximum: the tie rule. Taken experts are set to
        # -1, below every probability (all >= 0).
        i = q.argmax(dim=-1, keepdim=True)
        ids[:, j : j + 1] = i
        vals[:, j : j + 1] = p.gather(1, i)
        q.scatter_(1, i, -1.0)
    if renormalize:
        s = vals[:, 0:1]
        for j in range(1, top_k):
            s = s + vals[:, j : j + 1]
        vals = vals / s
    return vals, ids


@_route_op.register_fake
def _(logits, top_k, renormalize):
    T = logits.shape[0]
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int64))


def _route_setup(ctx, inputs, output):
    logits, _, renormalize = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.renormalize = renormalize


def _route_backward(ctx, grad_w, grad_ids):
    logits, ids = ctx.saved_tensors
    with torch.enable_grad():
        lf = logits.detach().float().requires_grad_(True)
        w = torch.softmax(lf, dim=-1).gather(1, ids)
        if ctx.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        (g,) = torch.autograd.grad(w, lf, grad_w.float())
    return g.to(logits.dtype), None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True,
              check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k], expert ids int64 [T, k]) from router logits [T, E]; slots ordered by
    probability, largest first, ties to the lower expert index (module docstring).

    check_finite: raise on NaN/inf logits (one host sync). vLLM's engine passes False: its
    warm-up and profiling runs feed uninitialised activations on purpose; a NaN row then routes
    to the experts its NaNs sit at (argmax takes NaN as the maximum), and the token's logprobs
    are NaN anyway."""
    check_float("router_logits", router_logits)
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be 2-D [tokens, experts], got shape {tuple(router_logits.shape)}")
    E = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in 1..{E} (the number of experts), got {top_k!r}")
    if check_finite and router_logits.numel() and not bool(torch.isfinite(router_logits).all()):
        raise ValueError("router_logits hold NaN or inf: the expert choice would be arbitrary; check the model's "
                         "weights and inputs (a diverged training step?)")
    return call(_route_op, router_logits, int(top_k), bool(renormalize))


# --------------------------------------------------------------------------- combine

@custom_op("onpolicy::moe_combine", mutates_args=())
def _combine_op(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if use_triton(y):
        return combine_triton(y, weights)
    wf = weights.float()
    acc = y[:, 0].float() * wf[:, 0:1]
    for j in range(1, y.shape[1]):
        acc = acc + y[:, j].float() * wf[:, j : j + 1]
    return acc.to(y.dtype)


@_combine_op.register_fake
def _(y, weights):
    return y.new_empty(y.shape[0], y.shape[2])


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad):
    y, weights = ctx.saved_tensors
    gf = grad.float().unsqueeze(1)
    gy = (gf * weights.float().unsqueeze(-1)).to(y.dtype) if ctx.needs_input_grad[0] else None
    gw = (gf * y.float()).sum(-1).to(weights.dtype) if ctx.needs_input_grad[1] else None
    return gy, gw


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def moe_combine(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * y[:, j] for y [T, k, H], weights [T, k]: fp32, slot order, one rounding."""
    check_float("y", y)
    check_same("y", y, "weights", weights, dtype=False)
    if y.dim() != 3 or weights.shape != y.shape[:2]:
        raise ValueError(f"moe_combine needs y [T, k, H] and weights [T, k]; got {tuple(y.shape)} and "
                         f"{tuple(weights.shape)}")
    return call(_combine_op, y, weights)


# --------------------------------------------------------------------------- experts

def _check_experts(x, ids, w13, w2):
    check_float("x", x)
    check_same("x", x, "w13", w13)
    check_same("x", x, "w2", w2)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 must be [E, 2I, H] and w2 [E, H, I]; got {tuple(w13.shape)} and {tuple(w2.shape)}")
    E, I2, H = w13.shape
    if I2 % 2 or w2.shape != (E, H, I2 // 2) or x.shape[1] != H:
        raise ValueError(f"inconsistent MoE shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, H]), "
                         f"w2 {tuple(w2.shape)} (want [E, H, I])")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"expert ids must be [tokens, top_k], got {tuple(ids.shape)} for {x.shape[0]} tokens")
    if ids.numel() and not ids.is_cuda and (int(ids.min()) < 0 or int(ids.max()) >= E):  # no host sync on CUDA
        raise ValueError(f"expert ids must lie in 0..{E - 1}; got {int(ids.min())}..{int(ids.max())}")


def expert_outputs(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y [T, k, H]: expert ids[t, j]'s gated MLP on token t, each row independent of the others.

    Triton path (CUDA): the grouped kernels of moe_triton.py through `onpolicy::moe_expert_outputs`
    (capturable, no host sync; expert ids are not range-checked there: that would sync). CPU path:
    the per-expert composition below."""
    _check_experts(x, ids, w13, w2)
    if use_triton(x):
        return call(_experts_op, x, ids, w13, w2)
    T, k = ids.shape
    H = x.shape[1]
    flat = ids.reshape(-1)
    if flat.numel() == 0:
        return x.new_zeros(T, k, H)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        xe = x.index_select(0, pairs // k)
        outs.append(linear(silu_and_mul(linear(xe, w13[e])), w2[e]))
    grouped = torch.cat(outs) if len(outs) > 1 else outs[0]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return grouped.index_select(0, inverse).view(T, k, H)


@custom_op("onpolicy::moe_expert_outputs", mutates_args=())
def _experts_op(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return expert_outputs_triton(x, ids, w13, w2)


@_experts_op.register_fake
def _(x, ids, w13, w2):
    return x.new_empty(ids.shape[0], ids.shape[1], x.shape[1])


def _experts_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _experts_backward(ctx, gy):
    """Standard ops, per expert (host loop: training is eager): the gated MLP's gradients with the
    forward recomputed in the model dtype (not invariant: it need not be). dx is summed over the
    slots in order (no atomics)."""
    x, ids, w13, w2 = ctx.saved_tensors
    T, k = ids.shape
    I = w13.shape[1] // 2
    need_x, _, need_w13, need_w2 = ctx.needs_input_grad
    dpair = x.new_zeros(T * k, x.shape[1]) if need_x else None
    dw13 = torch.zeros_like(w13) if need_w13 else None
    dw2 = torch.zeros_like(w2) if need_w2 else None
    flat = ids.reshape(-1)
    gflat = gy.reshape(T * k, -1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        xe, ge = x.index_select(0, pairs // k), gflat.index_select(0, pairs)
        h = (xe @ w13[e].t()).float()
        g, u = h[:, :I], h[:, I:]
        s = torch.sigmoid(g)
        a = (g * s * u).to(x.dtype)
        da = (ge @ w2[e]).float()
        dh = torch.cat([da * u * s * (1 + g * (1 - s)), da * g * s], dim=-1).to(x.dtype)
        if need_w2:
            dw2[e] = ge.t() @ a
        if need_w13:
            dw13[e] = dh.t() @ xe
        if need_x:
            dpair.index_copy_(0, pairs, dh @ w13[e])
    dx = dpair.view(T, k, -1).float().sum(1).to(x.dtype) if need_x else None
    return dx, None, dw13, dw2


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """The routed experts of x [T, H] combined: [T, H] in x's dtype (module docstring)."""
    if weights.shape != ids.shape:
        raise ValueError(f"routing weights {tuple(weights.shape)} and expert ids {tuple(ids.shape)} must match")
    return moe_combine(expert_outputs(x, ids, w13, w2), weights)


@custom_op("onpolicy::moe_routed", mutates_args=())
def _routed_op(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
               renormalize: bool) -> torch.Tensor:
    weights, ids = moe_route(router_logits, top_k, renormalize, check_finite=False)
    return moe_experts(x, weights, ids, w13, w2)


@_routed_op.register_fake
def _(x, router_logits, w13, w2, top_k, renormalize):
    return x.new_empty(x.shape)


def moe_routed(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
               renormalize: bool = True, check_finite: bool = True) -> torch.Tensor:
    """`moe_experts(x, *moe_route(router_logits, top_k, renormalize), w13, w2)`, callable under torch.compile.

    Routing has data-dependent shapes (tokens per expert), which Dynamo cannot trace: a traced call
    (vLLM compiles its model, on the CPU too) goes through one opaque op, `onpolicy::moe_routed`,
    whose body is the eager composition -- the same bits. No autograd through the traced op; an
    eager call (the trainer) runs the composition, differentiable. check_finite: see `moe_route`
    (a traced call never checks: the check would be a data-dependent branch)."""
    if _eager_grad((x, router_logits, w13, w2)) is None:
        return _routed_op(x, router_logits, w13, w2, int(top_k), bool(renormalize))
    weights, ids = moe_route(router_logits, top_k, renormalize, check_finite)
    return moe_experts(x, weights, ids, w13, w2)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
        renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [T, H], router logits [T, E]) of a top-k softmax MoE block on x [T, H]."""
    if gate_weight.dim() != 2 or gate_weight.shape[0] != w13.shape[0]:
        raise ValueError(f"gate_weight must be [E, H] with E = {w13.shape[0]} experts, got {tuple(gate_weight.shape)}")
    logits = linear(x, gate_weight)
    return moe_routed(x, logits, w13, w2, top_k, renormalize), logits
