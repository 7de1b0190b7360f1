"""Experiment (not shipped): where the decode attention's time goes at few sequences, for issue 12.

    python3 benchmarks/attention_decode_experiment.py            # GPU: bits, then times
    TRITON_INTERPRET=1 ONPOLICY_KERNELS_BACKEND=triton python3 benchmarks/attention_decode_experiment.py --dry

At 8 prompts x 2500 tokens onpolicy's rollout runs 0.88x of default vLLM (README). On Hopper
the library decodes with FlashAttention-3 at num_splits=1, which gives each (sequence, KV head)
one CTA: 64 CTAs on 132 SMs at 8 sequences. Default vLLM lets FA3 split the keys. FA3 cannot
split invariantly (its splits are a share of each call's key range, so a decode and the
trainer's prefill split a row's keys differently), and `pack_gqa=False` cannot add CTAs here
(FA3 compiles paged, non-TMA calls with PackGQA always on). The library's Triton kernel does
split invariantly (fixed 256-key splits, folded in order), so this measures, per decode shape:

  fa3 ns=1     the shipped Hopper route (invariant)
  fa3 ns=auto  FA3's own split heuristic, as default vLLM runs it (not invariant: the target)
  triton       the shipped Triton kernel (split-KV below half the SMs), its split kernel and
               its combine alone
  variants     the Triton split kernel at other (q_tile, warps, stages) and a combine with one
               program per (token, head) instead of per token

Every Triton variant's decode output is first compared bitwise with the shipped Triton
kernel's PREFILL of the same sequences (the property that matters: decode == trainer); a
variant that differs is reported and not timed. Times: median us per call over CUDA-graph
replays, rotating several caches so the keys stream from HBM as in a 28-layer model.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import paged_cache  # noqa: E402

import onpolicy_kernels.ops.attention as A
import onpolicy_kernels.ops.attention.fa3 as FA
triton, tl = A.triton, A.tl

if A.HAS_TRITON:
    _fold = A._fold

    @triton.jit
    def _combine_per_head(o_ptr, cuq_ptr, sl_ptr, pm_ptr, pl_ptr, pacc_ptr, num_seqs, Hq, so_t, so_h, sp_s, sp_t,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, SPLIT: tl.constexpr):
        # The shipped _combine_kernel's fold (same _fold, same split order, causal), but
        # program (t, hb) folds only heads hb*BLOCK_H..: the fold is elementwise per head row.
        t = tl.program_id(0)
        lo = num_seqs * 0
        hi = num_seqs + 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo = tl.where(tl.load(cuq_ptr + mid) <= t, mid, lo)
            hi = tl.where(tl.load(cuq_ptr + mid) <= t, hi, mid)
        b = lo
        q_end = tl.load(cuq_ptr + b + 1)
        if t < q_end:
            visible = tl.load(sl_ptr + b) - (q_end - t) + 1
            h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
            h_ok = h < Hq
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            M = tl.full((BLOCK_H,), float("-inf"), tl.float32)
            L = tl.zeros((BLOCK_H,), tl.float32)
            ACC = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
            for s0 in range(0, visible, SPLIT):
                po = t.to(tl.int64) * sp_t + (s0 // SPLIT) * sp_s + h
                m_s = tl.load(pm_ptr + po, mask=h_ok, other=float("-inf"))
                l_s = tl.load(pl_ptr + po, mask=h_ok, other=0.0)
                acc_s = tl.load(pacc_ptr + po[:, None] * BLOCK_D + d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                                other=0.0)
                M, L, ACC = _fold(M, L, ACC, m_s, l_s, acc_s)
            l_safe = tl.where(L == 0.0, 1.0, L)
            out = ACC / l_safe[:, None]
            tl.store(o_ptr + t.to(tl.int64) * so_t + h[:, None] * so_h + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])


def split_decode(q, kc, vc, bt, cu, sl, scale, config, combine_heads=0, parts="both"):
    """The shipped split-KV launch (kernels/onpolicy_kernels/ops/attention/__init__.py) with `config` = (q_tile, kv_tile, warps,
    stages) for the split kernel; combine_heads > 0 folds with _combine_per_head (that many heads
    per program). parts: "both", "split" (the split kernel only) or "combine" (the combine only,
    over partials left by an earlier "both")."""
    q_tile, kv_tile, warps, stages = config
    T, Hq, D = q.shape
    Hkv = kc.shape[2]
    G = Hq // Hkv
    B = sl.shape[0]
    key = (T, Hq, D, bt.shape[1] * kc.shape[1])
    st = _BUFS.get(key)
    if st is None:
        n_split = -(-bt.shape[1] * kc.shape[1] // A.KV_SPLIT)
        bd = triton.next_power_of_2(D)
        pm = torch.empty((n_split, T, Hq), dtype=torch.float32, device=q.device)
        st = _BUFS[key] = (n_split, bd, pm, torch.empty_like(pm),
                           torch.empty((n_split, T, Hq, bd), dtype=torch.float32, device=q.device),
                           q.new_empty(q.shape))
    n_split, bd, pm, pl, pacc, out = st
    if parts in ("both", "split"):
        A._attn_kernel[(T * G // q_tile + B, Hkv, n_split)](
            q, kc, vc, out, bt, cu, sl, pm, pl, pacc, A._qk_scale(scale), B, kc.shape[1],
            q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            vc.stride(0), vc.stride(1), vc.stride(2), out.stride(0), out.stride(1), bt.stride(0), T * Hq, Hq,
            G=G, HEAD_DIM=D, BLOCK_D=bd, CAUSAL=True, IEEE=q.dtype == torch.float32, BLOCK_M=q_tile,
            BLOCK_N=kv_tile, SPLIT=A.KV_SPLIT, PARTIAL=True, num_warps=warps, num_stages=stages)
    if parts in ("both", "combine"):
        if combine_heads:
            _combine_per_head[(T, triton.cdiv(Hq, combine_heads))](
                out, cu, sl, pm, pl, pacc, B, Hq, out.stride(0), out.stride(1), T * Hq, Hq,
                HEAD_DIM=D, BLOCK_D=bd, BLOCK_H=combine_heads, SPLIT=A.KV_SPLIT, num_warps=4 if combine_heads > 2 else 1)
        else:
            A._combine_kernel[(T,)](
                out, cu, sl, pm, pl, pacc, B, Hq, out.stride(0), out.stride(1), T * Hq, Hq,
                HEAD_DIM=D, BLOCK_D=bd, BLOCK_H=triton.next_power_of_2(Hq), CAUSAL=True, SPLIT=A.KV_SPLIT,
                num_warps=4)
    return out


_BUFS: dict = {}
SHIPPED = (A.Q_TILE, A.KV_TILE, A.NUM_WARPS, A.NUM_STAGES)
VARIANTS = [  # (label, split-kernel config, combine heads per program; 0 = the shipped per-token combine)
    ("shipped split + shipped combine", SHIPPED, 0),
    ("shipped split + combine/head", SHIPPED, 1),
    ("shipped split + combine/2 heads", SHIPPED, 2),
    ("q64 w4 s3 + combine/head", (64, 64, 4, 3), 1),
    ("q64 w4 s4 + combine/head", (64, 64, 4, 4), 1),
    ("q16 w4 s2 + combine/head", (16, 64, 4, 2), 1),
    ("q16 w4 s3 + combine/head", (16, 64, 4, 3), 1),
    ("q16 w4 s4 + combine/head", (16, 64, 4, 4), 1),
    ("q16 w2 s3 + combine/head", (16, 64, 2, 3), 1),
    ("q32 w4 s3 + combine/head", (32, 64, 4, 3), 1),
]


def decode_case(B, L, Hq, Hkv, D, dtype, dev, seed=0):
    """A paged cache of B sequences of L keys, the full sequences' queries, the shipped Triton
    PREFILL's output rows of each sequence's last position (the reference), and the decode inputs."""
    kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, dev, seed=seed)
    g = torch.Generator(device=dev).manual_seed(seed + 1)
    q_full = torch.randn(B * L, Hq, D, generator=g, device=dev).to(dtype)
    sl = torch.full((B,), L, dtype=torch.int32, device=dev)
    cu_full = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)
    ref = A._attention_triton(q_full, kc, vc, bt, cu_full, sl, D ** -0.5, True, split=False)[L - 1::L].clone()
    q = q_full[L - 1::L].contiguous()
    cu = torch.arange(0, B + 1, dtype=torch.int32, device=dev)
    del q_full
    return (q, kc, vc, bt, cu, sl, D ** -0.5), ref


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny shapes, bits only (CPU interpreter)")
    ap.add_argument("--shapes", default="8x512,8x1024,8x2500,8x4096,32x2500,256x512,256x1024")
    a = ap.parse_args()
    if a.dry:
        dev, dtype, shapes, heads = "cpu", torch.float16, [(2, 80), (3, 300)], (4, 2, 64)
    else:
        dev, dtype, heads = "cuda", torch.bfloat16, (16, 8, 128)
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
        from _common import device_line
        print(device_line(), "| bf16 | heads q/kv/D", "/".join(map(str, heads)), flush=True)
    Hq, Hkv, D = heads
    os.environ["ONPOLICY_ATTENTION"] = "triton"
    bad = 0
    results = []
    for B, L in shapes:
        args, ref = decode_case(B, L, Hq, Hkv, D, dtype, dev)
        same = {}
        shipped = A._attention_triton(*args, True)
        same["triton shipped"] = torch.equal(shipped.view(torch.int16), ref.view(torch.int16))
        for label, cfg, ch in VARIANTS:
            try:
                out = split_decode(*args, cfg, ch).clone()
                same[label] = torch.equal(out.view(torch.int16), ref.view(torch.int16))
            except Exception as e:  # noqa: BLE001 - out of resources etc.: reported, not timed
                print(f"  {B}x{L} {label}: NOT RUN, {type(e).__name__}: {str(e)[:100]}", flush=True)
                same[label] = None
        bad += sum(v is False for v in same.values())
        print(f"{B}x{L}: decode == prefill bits: " + ", ".join(f"{k}: {v}" for k, v in same.items()), flush=True)
        results.append(((B, L), args, same))
        _BUFS.clear()
    if a.dry:
        print("ALL EQUAL" if bad == 0 else f"{bad} MISMATCHES")
        sys.exit(1 if bad else 0)
    bench(results, Hq, Hkv, D, dtype)


def bench(results, Hq, Hkv, D, dtype):
    from _common import copies_for, time_calls

    fa_why = FA.unsupported(torch.empty(1, Hq, D, dtype=dtype, device="cuda"))
    fn = None if fa_why else FA._fa3()[0]
    cols = ["fa3 ns=1", "fa3 ns=auto", "triton shipped", "shipped split only", "shipped combine only"] + \
        [v[0] for v in VARIANTS]
    print("\ntimes in us (median of CUDA-graph replays over rotated caches); '-' = bits differ or not run"
          + (f"; FA3 skipped: {fa_why}" if fa_why else ""))
    print("| B x L | " + " | ".join(cols) + " | best invariant Triton / fa3 ns=1 | fa3 ns=auto / fa3 ns=1 |")
    print("|---|" + "---|" * (len(cols) + 2))
    for (B, L), args, same in results:
        q, kc, vc, bt, cu, sl, scale = args
        n = copies_for(kc.numel() * kc.element_size() * 2, cap=8)
        caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(n - 1)]
        t = {}

        def timed(name, f):
            t[name] = time_calls([lambda c=c: f(c) for c in caches])

        if fn is not None:
            timed("fa3 ns=1", lambda c: FA.paged(q, c[0], c[1], bt, cu, sl, scale, 1))
            out = torch.empty_like(q)
            timed("fa3 ns=auto", lambda c: fn(q, c[0], c[1], max_seqlen_q=1, cu_seqlens_q=cu,
                                               max_seqlen_k=bt.shape[1] * c[0].shape[1], seqused_k=sl,
                                               softmax_scale=scale, causal=True, block_table=bt, out=out,
                                               num_splits=0, fa_version=3))
        timed("triton shipped", lambda c: A._attention_triton(q, c[0], c[1], bt, cu, sl, scale, True))
        timed("shipped split only", lambda c: split_decode(q, c[0], c[1], bt, cu, sl, scale, SHIPPED, 0, "split"))
        timed("shipped combine only", lambda c: split_decode(q, c[0], c[1], bt, cu, sl, scale, SHIPPED, 0, "combine"))
        for label, cfg, ch in VARIANTS:
            if same.get(label):
                timed(label, lambda c, cfg=cfg, ch=ch: split_decode(q, c[0], c[1], bt, cu, sl, scale, cfg, ch))
        inv = [t[v[0]] for v in VARIANTS if v[0] in t] + [t["triton shipped"]]
        best = min(inv)
        cells = " | ".join(f"{t[c]:.1f}" if c in t else "-" for c in cols)
        r1 = f"{best / t['fa3 ns=1']:.2f}" if "fa3 ns=1" in t else "-"
        r2 = f"{t['fa3 ns=auto'] / t['fa3 ns=1']:.2f}" if "fa3 ns=auto" in t else "-"
        print(f"| {B} x {L} | {cells} | {r1} | {r2} |", flush=True)
        del caches
        _BUFS.clear()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
