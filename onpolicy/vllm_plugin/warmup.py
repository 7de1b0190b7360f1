"""Warming an engine up before it serves: every linear kernel compiled, every chooser bucket tuned.

vLLM's own warm-up runs a few batch sizes; the invariant linear picks its Triton tile
per M bucket (onpolicy_kernels.ops.linear.triton_kernels) and, on Hopper, a verified cuBLASLt
algorithm or the Triton kernel per M bucket (onpolicy_kernels.ops.linear.chooser). A
bucket vLLM never ran would compile or tune on first use -- seconds inside a live
rollout, or inside a CUDA-graph capture, where tuning cannot run. This plans one call
per (weight shape, bucket) for the model's linears and makes them before capture.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from onpolicy_kernels import linear
from onpolicy_kernels.ops.linear import chooser, chooser_for
from onpolicy_kernels.ops.linear.triton_kernels import tile_for

from . import compat

logger = logging.getLogger("vllm.onpolicy")


def warm_up_rows(n: int, max_rows: int, device: torch.device, buckets: bool = False) -> list[int]:
    """Row counts that make `linear` run every tile configuration it can pick for an
    [n, K] weight and 1..max_rows rows on `device`: the smallest M of each M bucket;
    with `buckets`, also one M per bucket of the cuBLASLt chooser (onpolicy_kernels.ops.linear.chooser),
    so that each is tuned. Empty off CUDA (nothing to compile)."""
    if torch.device(device).type != "cuda" or max_rows < 1:
        return []
    rows, seen, m = [], set(), 1
    while m <= max_rows:
        tile = tile_for(m, device, n)
        if tile not in seen:
            seen.add(tile)
            rows.append(m)
        m = tile[0] + 1
    if buckets:
        rows = sorted(set(rows) | set(chooser.warm_up_rows(max_rows)))
    return rows


def warm_up(weight: torch.Tensor, bias: Optional[torch.Tensor], max_rows: int) -> int:
    """Compile (by running once, on zeros) every kernel `linear(x, weight, bias)` can
    launch for 1..max_rows rows of a contiguous x, and tune the cuBLASLt choice of each
    M bucket (on random rows), so that neither happens later inside a timed or
    CUDA-graph-captured run. Returns the number of calls made."""
    probe = weight.new_zeros(1, weight.shape[1])
    buckets = chooser_for(probe, weight, bias) is not None
    rows = warm_up_rows(weight.shape[0], max_rows, weight.device, buckets)
    with torch.no_grad():
        for m in rows:
            linear(weight.new_zeros(m, weight.shape[1]), weight, bias)
    return len(rows)


def linear_warm_up_plan(model, max_tokens: int, max_seqs: int) -> list:
    """(weight, bias, max rows) per distinct onpolicy linear of `model`: the projections see up
    to max_num_batched_tokens rows, the LM head one row per sequence (max_num_seqs). Not
    covered (they compile on first use): prompt logprobs (the head on more rows) and an
    fp32 head_dtype."""
    from .linear import classes

    lin = classes()
    plan, seen = [], set()
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        head = isinstance(method, lin["OnpolicyHeadMethod"])
        if not (head or isinstance(method, lin["OnpolicyLinearMethod"])):
            continue
        w, b = m.weight, None if head else getattr(m, "bias", None)
        # A layer with a bias also runs without it (skip_bias_add, row-parallel ranks > 0).
        for bias in ((b, None) if b is not None else (None,)):
            key = (tuple(w.shape), w.dtype, bias is not None, head)
            if key not in seen:
                seen.add(key)
                plan.append((w, bias, max_seqs if head else max_tokens))
    return plan


def warm_up_linears(worker) -> None:
    """Compile every linear kernel the model can launch and tune every chooser bucket (see the
    module docstring), before vLLM captures graphs or serves; Triton caches the kernels on disk too."""
    import time

    runner = getattr(worker, "model_runner", None)
    sched = getattr(getattr(worker, "vllm_config", None), "scheduler_config", None)
    if runner is None or sched is None:
        return
    model = compat.runner_model(runner)
    plan = linear_warm_up_plan(model, sched.max_num_batched_tokens, sched.max_num_seqs)
    if not plan or not plan[0][0].is_cuda:
        return  # the CPU path compiles nothing
    start = time.perf_counter()
    calls = sum(warm_up(w, b, rows) for w, b, rows in plan)
    logger.info("onpolicy: linear kernels warmed up (%d weight shapes, %d calls, %.1f s)", len(plan), calls,
                time.perf_counter() - start)
