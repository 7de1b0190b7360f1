"""Search tile configurations of the invariant linear kernel per (shape, M) on this GPU.

    python3 benchmarks/tune_linear.py [--budget-s 300] [--json out.json] [--ms ...] [--shapes ...]

For every (shape, M) it times cuBLAS and each candidate tile (CUDA-graph replay,
weights rotated out of L2), checks each candidate's output bitwise against
SAFE_TILE on the same inputs (a candidate that differs is reported and never
proposed), and prints the fastest bit-identical candidate. Used to fill
HOPPER_TILES in kernels/onpolicy_kernels/ops/linear/__init__.py; the table itself is then proven by
tests/gpu/test_linear_tiles.py. Stops early (printing what it has) when the
time budget runs out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MS, SHAPES, copies_for, device_line, time_calls  # noqa: E402

from onpolicy_kernels.ops.linear.triton_kernels import SAFE_TILE, linear_triton, tile_for  # noqa: E402

SMEM_LIMIT = 227 * 1024


def smem_ok(c) -> bool:
    _, bm, bn, bk, _, stages = c[:6]
    stage = (bm * bk + bn * bk) * 2
    epi = bm * bn * 2 if len(c) > 6 and c[6] != "ptr" else 0
    return stages * stage + epi <= SMEM_LIMIT - 8 * 1024


def _menu(bm: int, bn: int) -> list[tuple]:
    """A few (BLOCK_K, warps, stages) choices for a tile shape."""
    bk = 256 if bm + bn <= 64 else (128 if bm + bn <= 192 else 64)
    warps = 4 if bm * bn <= 128 * 128 else 8
    out = []
    for st in (5, 4, 3):
        c = (0, bm, bn, bk, warps, st, "tma")
        if smem_ok(c):
            out.append((bk, warps, st))
            break
    out.append((bk, warps, 3))
    if bk > 64:
        out.append((bk // 2, warps, 4))
    return list(dict.fromkeys(out))


def candidates(M: int, N: int) -> list[tuple]:
    """Tile shapes whose tile count suits (M, N), each with a few pipelines and load variants."""
    c: list[tuple] = []
    for bm in (16, 32, 64, 128, 256):
        if bm > max(16, 2 * M) or (bm == 256 and M < 1024):
            continue
        for bn in (16, 32, 64, 128, 256):
            tiles = -(-M // bm) * -(-N // bn)
            if bm * bn > 128 * 256 or (tiles > 1200 and bm * bn < 128 * 128):
                continue
            menu = _menu(bm, bn)
            bk, warps, st = menu[0]
            c.append((0, bm, bn, bk, warps, st, "tma"))
            c.append((0, bm, bn, bk, warps, st) if bm <= 32 else (0, bm, bn, bk, warps, st, "persistent"))
            bk2, warps2, st2 = menu[-1]
            c.append((0, bm, bn, bk2, warps2, st2, "tma"))
    return [x for x in dict.fromkeys(c) if smem_ok(x)]


def model_cost(c: tuple, M: int, N: int, K: int, sms: int = 132) -> float:
    """Rough time model used only to prune the search: without split-K each SM streams
    (rows + cols of its tiles) x K from L2 (~90 GB/s per SM seen) and runs its tiles'
    MMAs (small tiles use the tensor cores less well)."""
    _, bm, bn = c[:3]
    tiles = -(-M // bm) * -(-N // bn)
    waves = -(-tiles // sms)
    t_mem = waves * (min(bm, M) + bn) * K * 2 / 90e9
    eff = (0.45 if bm < 64 else 0.8) * min(1.0, bn / 128) ** 0.5
    t_mma = waves * 2 * bm * bn * K / (5.3e12 * eff)
    return max(t_mem, t_mma)


def pruned_candidates(M: int, N: int, K: int, keep: int) -> list[tuple]:
    cs = candidates(M, N)
    shapes = sorted({c[1:3] for c in cs}, key=lambda s: model_cost((0,) + s, M, N, K))[: max(1, keep // 3)]
    return [c for c in cs if c[1:3] in shapes]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--json", default="")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="")
    ap.add_argument("--keep", type=int, default=24, help="candidates per point (best tile shapes by the model)")
    args = ap.parse_args()
    t_end = time.time() + args.budget_s
    ms = [int(m) for m in args.ms.split(",")]
    # Most informative first, so a budget cut drops the least useful points.
    order = [256, 1024, 8192, 1, 16, 64, 128, 32, 4096, 512, 8, 2, 4]
    ms = sorted(ms, key=lambda m: order.index(m) if m in order else len(order))
    shapes = [s for s in SHAPES if not args.shapes or any(p in s[0] for p in args.shapes.split(","))]
    print(device_line(), flush=True)
    results = []
    bad = set()
    torch.manual_seed(0)
    weights = {}
    for M in ms:
        for name, K, N in shapes:
            if time.time() > t_end:
                print("budget exhausted", flush=True)
                break
            if (K, N) not in weights:
                weights.clear()
                torch.cuda.empty_cache()
                weights[(K, N)] = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
                                   for _ in range(copies_for(N * K * 2))]
            ws = weights[(K, N)]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = linear_triton(x, ws[0], None, SAFE_TILE)
            t_cub = time_calls([lambda w=w: F.linear(x, w) for w in ws])
            timed = []
            extra = [tile_for(M, x.device, N, K)]
            for c in pruned_candidates(M, N, K, args.keep) + [tuple(e) for e in extra]:
                if c in bad or time.time() > t_end:
                    continue
                try:
                    same = torch.equal(linear_triton(x, ws[0], None, c), ref)
                    if not same:
                        print(f"  BITS DIFFER: {c} at {name} M={M}", flush=True)
                        bad.add(c)
                        continue
                    timed.append((time_calls([lambda w=w, c=c: linear_triton(x, w, None, c) for w in ws], target_ms=1.5), c))
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  skip {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    bad.add(c)
            timed.sort()
            top = timed[:3]
            line = " | ".join(f"{t:8.1f}us {t_cub / t:5.2f}x {c[1:]}" for t, c in top)
            print(f"{name:14s} M={M:5d} cuBLAS {t_cub:8.1f}us | {line}", flush=True)
            results.append({"shape": name, "K": K, "N": N, "M": M, "cublas_us": t_cub,
                            "timed": [[t, list(c)] for t, c in timed]})
            del x, ref
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_line(), "results": results, "bad": [list(c) for c in bad]}, f)


if __name__ == "__main__":
    main()
