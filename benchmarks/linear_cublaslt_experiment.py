"""Experiment (issue 12): cuBLASLt restricted to algorithms that never split K, vs cuBLAS and ours.

    python3 benchmarks/linear_cublaslt_experiment.py [--ms 64,256] [--shapes down] [--top 8]

Per shape and M: cuBLAS (`F.linear`, free to split K), the shipped Triton
`linear`, and every no-split algorithm cuBLASLt's heuristic offers with no
workspace (kernels/onpolicy_kernels/ops/linear/cublaslt.py). For each algorithm: whether its output is
bitwise equal to the Triton kernel's (the invariant reference) and its time.
Also what cuBLASLt picks when allowed a 32 MiB workspace (does it split K here?).
Then per M: cuBLAS time / best of (ours, bit-equal no-split cuBLASLt).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MS, SHAPES, copies_for, device_line, time_calls  # noqa: E402

from onpolicy_kernels.ops.linear import cublaslt as lt  # noqa: E402
from onpolicy_kernels import linear  # noqa: E402


def short(cfg: dict) -> str:
    return "t{tile} s{stages} c{cluster} i{inner} sw{swizzle} o{custom} a{algo}".format(**{k: cfg.get(k, "?") for k in (
        "tile", "stages", "cluster", "inner", "swizzle", "custom", "algo")})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--pool-ms", default="4096,8192", help="Ms at which every no-split algorithm seen at other Ms is tried too")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ms = [int(m) for m in args.ms.split(",")]
    args.pool_ms = {int(m) for m in args.pool_ms.split(",") if m}
    shapes = [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes.split(","))]
    print(device_line(), "| dtype", args.dtype, "| cuBLASLt", lt._library_path(), flush=True)
    print("| shape | M | cuBLAS us | ours us | no-split #1 us | no-split best us (rank) | cuBLAS/ours | cuBLAS/#1 | cuBLAS/best-of | algos (bit-equal) | best no-split config | cuBLAS w/ workspace: splitK, config |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    both: dict[int, list[float]] = {m: [] for m in ms}
    ours_r: dict[int, list[float]] = {m: [] for m in ms}
    top1_r: dict[int, list[float]] = {m: [] for m in ms}
    unequal = 0
    torch.manual_seed(0)
    for name, K, N in shapes:
        ws = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies_for(N * K * 2))]
        pool: dict[tuple, lt.Algo] = {}
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            ref = linear(x, ws[0])
            t_ref = time_calls([lambda w=w: F.linear(x, w) for w in ws])
            t_our = time_calls([lambda w=w: linear(x, w) for w in ws])
            outs = [torch.empty(M, N, device="cuda", dtype=dtype) for _ in ws]
            cands = [a for a, _ in lt.candidates(x, ws[0], outs[0])[: args.top]]
            for a in cands:
                pool.setdefault(tuple(a.data), a)
            extra = [a for k, a in pool.items() if M in args.pool_ms and k not in {tuple(c.data) for c in cands}]
            best, best_cfg, best_rank, top1, n_eq = float("inf"), "-", -1, float("nan"), 0
            for rank, algo in enumerate(cands + extra):
                try:
                    lt.run(x, ws[0], outs[0], algo)
                except RuntimeError:
                    continue  # a pooled algorithm that does not run at this M
                eq = torch.equal(outs[0], ref)
                if not eq:
                    unequal += 1
                    print(f"  UNEQUAL: {name} M={M} {short(lt.config(algo))}", flush=True)
                    continue
                n_eq += 1
                t = time_calls([lambda w=w, o=o, a=algo: lt.run(x, w, o, a) for w, o in zip(ws, outs)])
                if rank == 0:
                    top1 = t
                if t < best:
                    best, best_cfg, best_rank = t, short(lt.config(algo)), rank if rank < len(cands) else f"pool {rank}"
            dflt = lt.candidates(x, ws[0], outs[0], count=1, no_split=False)
            dcfg = lt.config(dflt[0][0]) if dflt else {}
            r_our = t_ref / t_our
            r_both = t_ref / min(t_our, best)
            ours_r[M].append(r_our)
            both[M].append(r_both)
            top1_r[M].append(t_ref / top1)
            print(f"| {name} | {M} | {t_ref:.1f} | {t_our:.1f} | {top1:.1f} | {best:.1f} ({best_rank}) | {r_our:.2f} | "
                  f"{t_ref / top1:.2f} | {r_both:.2f} | {len(cands) + len(extra)} ({n_eq}) | {best_cfg} | "
                  f"{dcfg.get('splitk', '?')}, {short(dcfg) if dcfg else '-'} |", flush=True)
            del x, outs
        del ws
        torch.cuda.empty_cache()
    print("\nper M: cuBLAS time / ours, and / best of (ours, bit-equal no-split cuBLASLt): min, geomean")
    for M in ms:
        g1 = torch.tensor(ours_r[M]).log().mean().exp().item()
        g2 = torch.tensor(both[M]).log().mean().exp().item()
        g3 = torch.tensor(top1_r[M]).log().mean().exp().item()
        print(f"  M={M:5d}: ours min {min(ours_r[M]):.2f} geo {g1:.2f} | no-split #1 min {min(top1_r[M]):.2f} geo {g3:.2f}"
              f" | best-of min {min(both[M]):.2f} geo {g2:.2f}")
    print(f"algorithms whose bits differed from the Triton kernel: {unequal}")
    # host cost of one eager call (what a caller outside CUDA graphs pays)
    K, N = 2048, 2048
    w = torch.randn(N, K, device="cuda", dtype=dtype)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    o = torch.empty(1, N, device="cuda", dtype=dtype)
    algo = lt.candidates(x, w, o)[0][0]
    t0 = time.perf_counter()
    for _ in range(200):
        lt.candidates(x, w, o)
    print(f"host time per heuristic query (16 results): {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
    for label, fn in (("F.linear", lambda: F.linear(x, w)), ("ours", lambda: linear(x, w)),
                      ("cuBLASLt run", lambda: lt.run(x, w, o, algo))):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"host time per eager call, {label}: {(t1 - t0) / 2000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
