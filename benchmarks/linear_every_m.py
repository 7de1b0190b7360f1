"""Every M a cuBLASLt algorithm can serve, bitwise against the Triton kernel (GPU; Hopper).

The chooser (kernels/onpolicy_kernels/ops/linear/chooser.py) picks one algorithm per weight shape and M
bucket and serves every M of the bucket with it. This scans, for each weight shape,
every bucket, every no-split candidate cuBLASLt offers at the bucket's upper M, and
every M of the bucket: the algorithm's output on x[:M] against the Triton kernel's
(plain random operands, and the chooser's planted probe rows), plus the Triton
kernel itself at every M 1..1024 against its own 1024-row output (row invariance
across its tile table).

    python3 benchmarks/linear_every_m.py [--shapes llama,qwen3,qwen2] [--dtype bf16]

Prints one line per (shape, bucket, algorithm) that differs at some M, and a summary.
"""
import argparse
import time

import torch

from onpolicy_kernels.ops.linear import cublaslt as lt
from onpolicy_kernels.ops.linear import chooser as C

import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table

SHAPES = {  # (N, K) of the projections without bias and the LM head
    "llama": [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)],  # Llama-3.2-1B
    "qwen3": [(4096, 2048), (2048, 2048), (12288, 2048), (2048, 6144), (151936, 2048)],  # Qwen3-1.7B
    "qwen2": [(1536, 1536), (17920, 1536), (1536, 8960), (151936, 1536)],  # Qwen2.5-1.5B (qkv has a bias)
}


def scan(N: int, K: int, dtype, top: int = C.TUNE_MAX_ROWS):
    g = torch.Generator(device="cuda").manual_seed(N + K)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    x = torch.randn(top, K, device="cuda", dtype=dtype, generator=g)
    wv, probes = C.verification_operands(N, K, top, dtype, "cuda", g)
    xp = probes[0]
    ref = LT.linear_triton(x, w, None)
    refp = LT.linear_triton(xp, wv, None)
    out = torch.empty(top, N, device="cuda", dtype=dtype)
    # Triton at every M against its own top-row output.
    tri_bad = [m for m in range(1, top + 1) if not torch.equal(LT.linear_triton(x[:m], w, None), ref[:m])]
    rows, tried, lo = [], 0, 1
    for b in C.BUCKETS:
        cands = lt.candidates(x[:b], w, out[:b])[: C.CANDIDATES]
        for algo, _ in cands:
            flags, ms, skipped = [], [], 0
            for m in range(lo, b + 1):
                if not lt.check(x[:m], w, out[:m], algo):
                    skipped += 1
                    continue
                lt.run(x[:m], w, out[:m], algo)
                f1 = (out[:m] != ref[:m]).any()
                lt.run(xp[:m], wv, out[:m], algo)
                f2 = (out[:m] != refp[:m]).any()
                flags.append(torch.stack([f1, f2]))
                ms.append(m)
            tried += len(ms)
            if flags:
                bad = torch.stack(flags).cpu()
                bad_rand = [m for m, f in zip(ms, bad[:, 0]) if f]
                bad_plant = [m for m, f in zip(ms, bad[:, 1]) if f]
                # the probe rows alone: what the chooser checks today (the bucket's upper M)
                at_top = b in ms and bool(bad[ms.index(b)].any())
                if bad_rand or bad_plant:
                    rows.append((b, lo, lt.describe(algo), lt.config(algo), len(ms), skipped, bad_rand, bad_plant,
                                 at_top))
        lo = b + 1
    return tri_bad, rows, tried


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama,qwen3,qwen2")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {dtype}", flush=True)
    total_bad = 0
    seen = set()
    for fam in a.shapes.split(","):
        for N, K in SHAPES[fam]:
            if (N, K) in seen:
                continue
            seen.add((N, K))
            t = time.time()
            tri_bad, rows, tried = scan(N, K, dtype)
            print(f"SHAPE {fam} N={N} K={K}: {tried} (algorithm, M) runs, {len(rows)} algorithm/bucket pairs differ "
                  f"at some M; Triton differs from its own 1024-row output at {len(tri_bad)} M {tri_bad[:8]} "
                  f"({time.time() - t:.1f} s)", flush=True)
            for b, lo, desc, cfg, n, skipped, br, bp, at_top in rows:
                total_bad += 1
                print(f"  DIFF bucket {lo}..{b}: {desc} {cfg}: {n} M run ({skipped} not runnable); differs on "
                      f"random operands at {len(br)} M {br[:10]}, on planted probes at {len(bp)} M {bp[:10]}; "
                      f"caught by today's check at M={b}: {at_top}", flush=True)
    print(f"SUMMARY algorithm/bucket pairs that differ at some M: {total_bad}", flush=True)


if __name__ == "__main__":
    main()
