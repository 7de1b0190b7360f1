"""The invariant MoE op vs vLLM's default fused MoE, one Qwen3-30B-A3B MoE layer (GPU; issue 31).

    python benchmarks/bench_moe.py [--tokens 1,2,4,...] [--reps 20]
    python benchmarks/bench_moe.py make MODEL_DIR [--layers 4]   # a Qwen3-30B-A3B-shaped model, random bf16

Layer: hidden 2048, 128 experts, top-8 (norm_topk_prob), moe_intermediate 768, bf16. Both sides
get the same router logits (the gate's linear is not timed) and route themselves:
onpolicy = `moe_routed` (Triton router, alignment, grouped gate/up+SiLU and down GEMMs,
combine); vLLM = `fused_topk` + `fused_experts` (vLLM 0.26's unquantized Triton path; older
vLLMs: `fused_moe`). Times are medians in microseconds, eager (each call launched from Python)
and as a CUDA graph replay (how vLLM runs decode steps); ratio = vLLM / onpolicy (> 1: onpolicy
faster). `inv` is whether the first token's output alone equals its row in the batch (torch.equal):
always for onpolicy, by construction; vLLM's column is a control.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

H, E, TOP_K, I = 2048, 128, 8, 768
TOKENS = [1 << i for i in range(14)]  # 1 .. 8192


def make(path: str, layers: int) -> None:
    """onpolicy.tiny's Qwen3-30B-A3B shape (32/4 heads of 128, vocab 151936) with `layers` layers."""
    from onpolicy.tiny import make_tiny_model

    t = time.time()
    make_tiny_model(path, family="qwen3_moe", shape="qwen3-30b-a3b", overrides={"num_hidden_layers": layers},
                    max_position_embeddings=4096)
    print(f"made a Qwen3-30B-A3B-shaped model ({layers} layers) at {path} in {time.time() - t:.0f} s", flush=True)


def vllm_moe():
    """A callable (x, logits) -> out running vLLM's default unquantized fused MoE, or (None, reason)."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import fused_topk

        def run(x, logits, w13, w2):
            w, ids, _ = fused_topk(x, logits, TOP_K, True)
            return fused_experts(x, w13, w2, w, ids)

        return run, "vLLM fused_topk + fused_experts"
    except Exception as e:  # noqa: BLE001
        first = f"{type(e).__name__}: {e}"
    try:
        from vllm.model_executor.layers.fused_moe import fused_moe

        return (lambda x, logits, w13, w2: fused_moe(x, w13, w2, logits, TOP_K, True)), "vLLM fused_moe"
    except Exception as e:  # noqa: BLE001
        return None, f"vLLM's fused MoE not importable ({first}; {type(e).__name__}: {e})"


def _median_us(fn, reps: int) -> float:
    import torch

    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times)


def _graph_us(fn, reps: int):
    """Median replay time of a CUDA graph of one call (None and the error if capture fails)."""
    import torch

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return _median_us(g.replay, reps), None
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def bench(tokens, reps: int) -> None:
    import torch

    import onpolicy_kernels as K
    from onpolicy_kernels.ops.moe_triton import expert_config

    torch.manual_seed(0)
    dev = "cuda"
    dt = torch.bfloat16
    gate = (torch.randn(E, H, device=dev) * 0.05).to(dt)
    w13 = (torch.randn(E, 2 * I, H, device=dev) * H ** -0.5).to(dt)
    w2 = (torch.randn(E, H, I, device=dev) * I ** -0.5).to(dt)
    ours = lambda x, lg: K.moe_routed(x, lg, w13, w2, TOP_K, True, check_finite=False)  # noqa: E731
    theirs, label = vllm_moe()
    if theirs is not None:  # a first call: an op vLLM's build lacks fails here, not in the middle of the table
        try:
            x1 = torch.randn(2, H, device=dev, dtype=dt)
            theirs(x1, K.linear(x1, gate), w13, w2)
        except Exception as e:  # noqa: BLE001 -- reported in the table's header, onpolicy's column still runs
            theirs, label = None, f"vLLM's fused MoE failed ({type(e).__name__}: {str(e)[:120]})"
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; onpolicy tiles (gate/up, down) "
          f"{expert_config(gate, w13)}; control: {label}", flush=True)
    hdr = (f"{'tokens':>6} | {'onpolicy us':>11} {'vLLM us':>9} {'ratio':>6} | {'graph onp':>9} {'graph vLLM':>10} "
           f"{'ratio':>6} | inv onp  inv vLLM | max|onp-vLLM|")
    print(hdr)
    print("-" * len(hdr), flush=True)
    worst = None
    for T in tokens:
        x = torch.randn(T, H, device=dev, dtype=dt)
        lg = K.linear(x, gate)
        out = ours(x, lg)
        alone = ours(x[:1], lg[:1])
        inv = torch.equal(out[:1], alone)
        e_ours = _median_us(lambda: ours(x, lg), reps)
        g_ours, g_err = _graph_us(lambda: ours(x, lg), reps)
        row = f"{T:>6} | {e_ours:>11.1f} "
        if theirs is not None:
            ref = theirs(x, lg, w13, w2)
            inv_v = torch.equal(ref[:1], theirs(x[:1], lg[:1], w13, w2))
            e_v = _median_us(lambda: theirs(x, lg, w13, w2), reps)
            g_v, gv_err = _graph_us(lambda: theirs(x, lg, w13, w2), reps)
            diff = (out.float() - ref.float()).abs().max().item()
            gr = f"{g_v / g_ours:>6.2f}" if g_ours and g_v else f"{'-':>6}"
            row += (f"{e_v:>9.1f} {e_v / e_ours:>6.2f} | {g_ours or float('nan'):>9.1f} {g_v or float('nan'):>10.1f} "
                    f"{gr} | {str(inv):>7}  {str(inv_v):>8} | {diff:.3g}")
            if g_ours and g_v:
                worst = min(worst or 1e9, g_v / g_ours)
        else:
            row += f"{'-':>9} {'-':>6} | {g_ours or float('nan'):>9.1f} {'-':>10} {'-':>6} | {str(inv):>7}  {'-':>8} |"
        print(row + (f"  graph capture failed: {g_err}" if g_err else ""), flush=True)
    if worst is not None:
        print(f"# worst graph ratio vLLM/onpolicy over the sizes: {worst:.2f} (goal >= 0.85)", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("path")
        p.add_argument("--layers", type=int, default=4)
        a = p.parse_args()
        make(a.path, a.layers)
        return
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    bench([int(t) for t in a.tokens.split(",")], a.reps)


if __name__ == "__main__":
    main()
