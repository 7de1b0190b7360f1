"""Host time per call of the ops a vLLM decode step runs eagerly, outside its CUDA graph (issue 12).

    python3 benchmarks/bench_host_overhead.py [--rows 8,256] [--calls 200]

vLLM replays a decode step's model as one CUDA graph, then runs the LM head and the
sampler eagerly: their cost on the host (Python, dispatch, kernel launch) is paid at
every step, and the engine is host-bound at the loads issue 12 measures (bench_vllm.py
timeline). This prints, per op, the median host time of one call -- from the call to
its return, the GPU idle before it (a synchronize) so that no queue wait is counted --
for onpolicy's op, its parts (the registered custom op, the implementation called
directly) and the PyTorch op the default engine runs in its place. Runs on the CPU too
(there the "host time" includes the computation).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import onpolicy_kernels as K  # noqa: E402
from onpolicy.vllm_plugin.graphs import RowGraphs  # noqa: E402

# the modules (the package's `linear` / `log_softmax` attributes are the functions)
import onpolicy_kernels.ops.linear as L
import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table
import onpolicy_kernels.ops.logprobs as P

HIDDEN, VOCAB = 2048, 151936  # Qwen3-1.7B


def host_us(fn, calls: int, sync) -> float:
    """Median microseconds from calling `fn` to its return, the device idle before each call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    sync()
    return statistics.median(times) * 1e6


def profile(title: str, fn, calls: int, sync, top: int = 14) -> None:
    """cProfile over `calls` calls of fn (the device idle before each): microseconds per call by function."""
    import cProfile
    import pstats

    for _ in range(5):
        fn()
    pr = cProfile.Profile()
    for _ in range(calls):
        sync()
        pr.enable()
        fn()
        pr.disable()
    sync()
    st = pstats.Stats(pr)
    print(f"\n{title}: host us per call by function (cProfile adds its own overhead; compare rows, not totals)")
    print("| function | own us | with callees us |")
    print("|---|---|---|")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own time
    for (file, line, func), (_cc, _nc, tt, ct, _callers) in rows:
        where = f"{os.path.basename(file)}:{line}" if line else file
        print(f"| {func} ({where}) | {tt / calls * 1e6:.1f} | {ct / calls * 1e6:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8,256", help="decode batch sizes (rows of the LM head and sampler)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=VOCAB, help="smaller on a CPU")
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the API calls (LM head, log-softmax): where their host time goes, by function")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dt = torch.bfloat16
    w = torch.randn(a.vocab, HIDDEN, device=dev, dtype=dt) / HIDDEN**0.5
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__} | host us per call, "
          f"median of {a.calls} | LM head {a.vocab}x{HIDDEN} bf16, logits fp32", flush=True)
    print("| rows | op | host us |")
    print("|---|---|---|")
    impl = LT.linear_triton if cuda else L.linear_cpu
    # rows past the graphs' largest bucket run eagerly (the same as the API rows)
    head_graphs = RowGraphs(lambda x, w: K.linear(x, w), "LM head")
    soft_graphs = RowGraphs(lambda lg, t: K.log_softmax(lg, t), "log_softmax")
    with torch.inference_mode():
        for m in (int(r) for r in a.rows.split(",")):
            x = torch.randn(m, HIDDEN, device=dev, dtype=dt)
            logits = torch.randn(m, a.vocab, device=dev, dtype=torch.float32) * 4
            t = torch.ones(m, device=dev)
            idx = torch.arange(m, device=dev)  # the step's expanded_idx_mapping, already on the device
            rows = [
                ("LM head: onpolicy_kernels.linear", lambda: K.linear(x, w)),
                ("LM head: onpolicy's decode graph (vLLM plugin, graphs.py)", lambda: head_graphs(x, extra=(w,))),
                ("LM head: the custom op (torch.ops.onpolicy.linear)", lambda: torch.ops.onpolicy.linear(x, w, None)),
                ("LM head: the implementation, called directly", lambda: impl(x, w, None)),
                ("LM head: F.linear (the default engine)", lambda: F.linear(x, w)),
                ("log_softmax(logits, t): onpolicy_kernels, per-row t", lambda: K.log_softmax(logits, t)),
                ("log_softmax(logits, 1.0): onpolicy_kernels, float t", lambda: K.log_softmax(logits, 1.0)),
                ("log_softmax: onpolicy's decode graph, float t", lambda: soft_graphs(logits, extra=(1.0,))),
                ("log_softmax: onpolicy's decode graph, per-row t", lambda: soft_graphs(logits, t)),
                ("log_softmax: the custom op", lambda: torch.ops.onpolicy.log_softmax(logits, t)),
                ("log_softmax: the implementation, called directly", lambda: P._log_softmax_impl(logits, t)),
                ("torch.log_softmax (fp32)", lambda: torch.log_softmax(logits, dim=-1)),
                ("per-row temperature: gather, compare, select (onpolicy's V2 sampler before the fast path)",
                 lambda: torch.where(t[idx] == 0.0, torch.ones_like(t), t)),
            ]
            for name, fn in rows:
                print(f"| {m} | {name} | {host_us(fn, a.calls, sync):.1f} |", flush=True)
            if a.profile:
                for name, fn in (("LM head: onpolicy_kernels.linear", lambda: K.linear(x, w)),
                                 ("log_softmax(logits, 1.0): onpolicy_kernels", lambda: K.log_softmax(logits, 1.0))):
                    profile(f"{name}, {m} rows", fn, a.calls, sync)


if __name__ == "__main__":
    main()
