"""Shared helpers of the GPU benchmark scripts: shapes and CUDA-graph timing.

Timing: the calls are captured in a CUDA graph (many calls per graph, so launch
overhead and Python stay out of the numbers, as under vLLM's CUDA graphs) and
the graph is replayed several times; the median per-call time is reported.
Operands whose working set would fit in L2 are rotated over several copies so
weights stream from HBM as they do in a real model.
"""
from __future__ import annotations

import statistics

import torch

# (name, K, N) of the projections benchmarked (K = in features, N = out features).
QWEN3_1_7B = [("1.7B qkv", 2048, 4096), ("1.7B o", 2048, 2048), ("1.7B gate_up", 2048, 12288), ("1.7B down", 6144, 2048)]
QWEN3_8B = [("8B qkv", 4096, 6144), ("8B o", 4096, 4096), ("8B gate_up", 4096, 24576), ("8B down", 12288, 4096)]
LM_HEAD = [("lm_head", 2048, 151936)]
SHAPES = QWEN3_1_7B + QWEN3_8B + LM_HEAD
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192]
L2_BYTES = 50 * 2**20


def copies_for(nbytes: int, cap: int = 16) -> int:
    """How many copies of an operand of `nbytes` to rotate over so they do not stay in L2."""
    return max(1, min(cap, -(-3 * L2_BYTES // max(nbytes, 1))))


def _graph_timer(fns, target_ms: float):
    """A CUDA graph of `fns` (round-robin, enough repetitions for ~target_ms) and its per-call ms timer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:  # compile / warm up outside the graph
            f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    def capture(reps):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                for f in fns:
                    f()
        return g

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(g):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    g = capture(2)
    run(g)
    per_round = run(g) / 2
    reps = max(1, min(2000, int(target_ms / max(per_round, 1e-4))))
    del g
    g = capture(reps)
    run(g)
    return g, lambda: run(g) / (reps * len(fns))


def time_calls(fns, target_ms: float = 3.0, replays: int = 7) -> float:
    """Median microseconds per call of `fns` (callables, called round-robin), by CUDA-graph replay."""
    return time_interleaved([fns], target_ms, replays)[0]


def time_interleaved(fn_sets, target_ms: float = 3.0, replays: int = 7) -> list[float]:
    """Median microseconds per call of each list of callables in `fn_sets`, measured side by side.

    One CUDA graph per set; the replays alternate between the sets (set order reversed every
    other round), so a drift of the GPU's clock or power state over the run (sustained
    tensor-core load lowers the clock) weighs on every set alike instead of on whichever was
    timed last."""
    timers = [_graph_timer(fns, target_ms) for fns in fn_sets]
    times: list[list[float]] = [[] for _ in timers]
    for r in range(replays):
        order = range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))
        for i in order:
            times[i].append(timers[i][1]())
    del timers
    torch.cuda.synchronize()
    return [statistics.median(t) * 1e3 for t in times]


def copy_bandwidth(nbytes: int = 2**30) -> dict[str, float]:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), three ways.

    `copy_` of contiguous tensors is a cudaMemcpy (inside a graph: a memcpy node,
    possibly the copy engines); `add` is an SM elementwise kernel; `triton` is a
    plain vectorised Triton copy. The ceiling for a kernel is the best of them.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    n = src.numel()
    fns = {
        "copy_": lambda: dst.copy_(src),
        "add": lambda: torch.add(src, 0, out=dst),
        "triton": lambda: _copy[(triton.cdiv(n, 8192),)](src, dst, n, BLOCK=8192, num_warps=8),
    }
    return {k: 2 * nbytes / (time_calls([f], target_ms=20.0) * 1e-6) / 1e9 for k, f in fns.items()}


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    import triton

    return (f"{p.name} ({p.multi_processor_count} SMs, sm_{p.major}{p.minor}), torch {torch.__version__}, "
            f"triton {triton.__version__}")
