"""Achieved memory bandwidth of the memory-bound invariant ops, as a share of this GPU's copy bandwidth.

    python3 benchmarks/bench_memory_ops.py [--tokens 32768]

For each op: the fewest bytes it must move (each input read once, each output
written once), its time (CUDA-graph replay; tensors far larger than L2), the
achieved GB/s, that as a share of a device-to-device copy measured in the same
run (bytes read + written), and the same for the plain-PyTorch equivalent
(eager, not invariant) for context, and -- where vLLM is importable -- vLLM's own fused CUDA ops (`torch.ops._C`: rms_norm,
fused_add_rms_norm, rotary_embedding, silu_and_mul; the in-place ones run on
their buffers in place). Datasheet: H100 SXM ~3.35 TB/s, H200 ~4.8 TB/s.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth, device_line, time_calls  # noqa: E402

from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, log_softmax, rms_norm, rotary_embedding,  # noqa: E402
                              silu_and_mul, token_logprobs)


def torch_rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def torch_rotary(pos, q, k, cos, sin):
    def rot(x):
        x1, x2 = x[..., :64], x[..., 64:]
        c, s = cos[pos][:, None], sin[pos][:, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    return rot(q), rot(k)


def vllm_c_ops():
    """vLLM's compiled custom ops (torch.ops._C), or None where vLLM is not importable."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library)

        return torch.ops._C
    except Exception as e:  # noqa: BLE001
        print(f"vLLM ops not measured: {type(e).__name__}: {e}", flush=True)
        return None


def launches() -> None:
    """log_softmax / token_logprobs: the split and the rows launch side by side (same bits), the
    numbers behind kernels/onpolicy_kernels/ops/logprobs.py's SPLIT_MAX_ROWS."""
    import onpolicy_kernels.ops.logprobs as LP
    V = 151936
    print(device_line(), f"| V = {V} | us per call (CUDA-graph replays)")
    print("| logits | M | log_softmax split | log_softmax rows | token_logprobs split | token_logprobs rows |")
    print("|---|---|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        for M in (8, 64, 128, 256, 512, 1024, 2048, 4096):
            x = (torch.randn(M, V, device="cuda") * 4).to(dt)
            t = torch.full((M,), 0.8, device="cuda")
            ids = torch.randint(0, V, (M,), device="cuda")
            r = [time_calls([lambda s=s: LP._log_softmax_impl(x, t, split=s)]) for s in (True, False)]
            r += [time_calls([lambda s=s: LP._token_logprobs_impl(x, ids, t, split=s)]) for s in (True, False)]
            print(f"| {str(dt).split('.')[-1]} | {M} | " + " | ".join(f"{v:.1f}" for v in r) + " |", flush=True)
            del x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--launches", action="store_true", help="only the log-softmax launch comparison")
    args = ap.parse_args()
    if args.launches:
        return launches()
    T = args.tokens
    dt = torch.bfloat16
    dev = "cuda"
    torch.manual_seed(0)
    print(device_line(), flush=True)
    copies = copy_bandwidth()
    copy = max(copies.values())
    print("device-to-device copy of 1 GiB, GB/s (read + write): "
          + ", ".join(f"{k} {v:.0f}" for k, v in copies.items()) + f"; ceiling used: {copy:.0f}\n", flush=True)
    rows = []

    C = vllm_c_ops()

    def add(name, nbytes, ours, ref=None, vllm=None):
        t = time_calls([ours], target_ms=10.0)
        bw = nbytes / (t * 1e-6) / 1e9
        line = f"{name:38s} {nbytes / 2**20:9.1f} {t:9.1f} {bw:8.0f} {bw / copy:7.1%}"
        for other in (ref, vllm):
            try:
                tr = time_calls([other], target_ms=10.0) if other is not None else None
            except Exception as e:  # noqa: BLE001 - a vLLM op that refuses this layout
                print(f"  {name}: comparison failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                tr, vllm = None, None
            if tr is None:
                line += f" {'-':>10s} {'-':>8s}"
                continue
            line += f" {tr:10.1f} {nbytes / (tr * 1e-6) / 1e9 / copy:8.1%}"
        if vllm is not None:
            line += f" {tr / t:9.2f}x"
        rows.append(line)
        print(line, flush=True)

    header = (f"{'op (bf16)':38s} {'MiB':>9s} {'us':>9s} {'GB/s':>8s} {'of copy':>7s} {'torch us':>10s} {'of copy':>8s}"
              f" {'vLLM us':>10s} {'of copy':>8s} {'vLLM/ours':>10s}")
    print(header)
    for H in (2048, 4096):
        x = torch.randn(T, H, device=dev, dtype=dt)
        r = torch.randn(T, H, device=dev, dtype=dt)
        w = torch.randn(H, device=dev, dtype=dt)
        o = torch.empty_like(x)
        add(f"rms_norm T={T} H={H}", 2 * T * H * 2, lambda: rms_norm(x, w, 1e-6), lambda: torch_rms(x, w),
            C and (lambda: C.rms_norm(o, x, w, 1e-6)))
        xi, ri = x.clone(), r.clone()
        add(f"fused_add_rms_norm T={T} H={H}", 4 * T * H * 2, lambda: fused_add_rms_norm(x, r, w, 1e-6),
            lambda: (torch_rms(x + r, w), x + r), C and (lambda: C.fused_add_rms_norm(xi, ri, w, 1e-6)))
        del o, xi, ri
        del x, r
    # Qwen3's q/k norms: per-head views [T, 16, 128] of the fused QKV output (read in place),
    # at a decode batch (256 tokens) and at T; the torch column copies the view first as the
    # plugin's old path did (reshape of a strided view)
    for t in (256, T):
        qkv = torch.randn(t, 32 * 128, device=dev, dtype=dt)
        qv = qkv[:, : 16 * 128].view(t, 16, 128)
        wq = torch.randn(128, device=dev, dtype=dt)
        oq = torch.empty(t, 16, 128, device=dev, dtype=dt)
        add(f"rms_norm per-head q view T={t} 16x128", 2 * t * 16 * 128 * 2, lambda: rms_norm(qv, wq, 1e-6),
            lambda: rms_norm(qv.reshape(-1, 128), wq, 1e-6), C and (lambda: C.rms_norm(oq, qv, wq, 1e-6)))
        del qkv
    # rotary, Qwen3 (16 q heads, 8 kv heads, head 128), positions spread over 32k
    cache = build_cos_sin_cache(128, 128, 40960, 1e6).to(dev)
    cos, sin = cache[:, :64].to(dt), cache[:, 64:].to(dt)
    q = torch.randn(T, 16, 128, device=dev, dtype=dt)
    k = torch.randn(T, 8, 128, device=dev, dtype=dt)
    pos = torch.randint(0, 32768, (T,), device=dev)
    nbytes = 2 * (q.numel() + k.numel()) * 2 + T * 8 + T * 128 * 4
    cache_dt, qi, ki = cache.to(dt), q.clone(), k.clone()
    add(f"rotary_embedding T={T} 16q+8kv x128", nbytes, lambda: rotary_embedding(pos, q, k, cache),
        lambda: torch_rotary(pos, q, k, cos, sin), C and (lambda: C.rotary_embedding(pos, qi, ki, 128, cache_dt, True)))
    del q, k
    for D in (6144, 12288):
        x = torch.randn(T // 2, 2 * D, device=dev, dtype=dt)
        o = torch.empty(T // 2, D, device=dev, dtype=dt)
        add(f"silu_and_mul T={T // 2} d={D}", 3 * (T // 2) * D * 2, lambda: silu_and_mul(x),
            lambda: F.silu(x[:, :D]) * x[:, D:], C and (lambda: C.silu_and_mul(o, x)))
        del x
    V = 151936
    for M in (8, 64, 128, 256, 2048):  # the launch each M takes (--launches times both)
        logits = torch.randn(M, V, device=dev, dtype=dt) * 4
        ids = torch.randint(0, V, (M,), device=dev)
        add(f"log_softmax M={M} V={V} (fp32 out)", M * V * (2 + 4), lambda: log_softmax(logits, 0.8),
            lambda: torch.log_softmax(logits.float() / 0.8, -1))
        add(f"token_logprobs M={M} V={V}", M * V * 2 + M * 12, lambda: token_logprobs(logits, ids, 0.8),
            lambda: torch.log_softmax(logits.float() / 0.8, -1).gather(1, ids[:, None]))
        del logits
    print(f"\nsummary ({device_line()}; copy ceiling {copy:.0f} GB/s = best of "
          + ", ".join(f"{k} {v:.0f}" for k, v in copies.items()) + ")")
    print(header)
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
