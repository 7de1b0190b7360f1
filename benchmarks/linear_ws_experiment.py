"""Experiment (not shipped): warp-specialized variants of the linear kernel, for issue 12.

    python3 benchmarks/linear_ws_experiment.py [--ms 64,128,256,512] [--shapes 1.7B,8B qkv]
    TRITON_INTERPRET=1 python3 benchmarks/linear_ws_experiment.py --check   # the bit checks, on a CPU

The shipped kernel is 0.83-0.90x of cuBLAS at M = 64-512 on several shapes
(benchmarks/README.md). Hopper matmuls reach cuBLAS speed with warp
specialization: producer warps issue the TMA loads while consumer warpgroups run
the wgmma, so loads and math overlap without software pipelining. Triton does
that for a loop marked `tl.range(..., warp_specialize=True)` (Hopper support
landed in 2025; whether Triton 3.6 compiles it for these kernels is part of what
this measures). It changes who loads and when, not the arithmetic: each output
tile is still one fp32 accumulator over K in order, so the bits must equal the
shipped kernel's. The script checks that first, on every shape and tile it
times, then prints per (shape, M): cuBLAS, the shipped kernel, and the best time
over the same tiles with and without warp specialization, non-persistent and
persistent (one program per SM), as cuBLAS time / ours.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


from onpolicy_kernels import linear  # noqa: E402

import onpolicy_kernels.ops.linear.triton as _LT  # the Triton kernels and their tile table
_tile_coords = _LT._tile_coords


@triton.jit
def _tile(x_desc, w_desc, o_desc, pid_m, pid_n, k_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, WS_K: tl.constexpr, OUT_BF16: tl.constexpr):
    # One output tile: one fp32 accumulator over K in order, as the shipped kernel; WS_K marks
    # the K loop itself as the warp-specialized one (the non-persistent launch).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in tl.range(k_tiles, warp_specialize=WS_K):
        a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, b.T, acc)
    if OUT_BF16:
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))
    else:
        o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.float16))


@triton.jit(do_not_specialize=["M", "num_programs"])
def _ws_kernel(x_desc, w_desc, o_desc, M, N, K, num_programs,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
               PERSISTENT: tl.constexpr, WS: tl.constexpr, OUT_BF16: tl.constexpr):
    k_tiles = tl.cdiv(K, BLOCK_K)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        # Hopper's warp specialization wants the outer loop unflattened.
        for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=False, warp_specialize=WS):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _tile(x_desc, w_desc, o_desc, pid_m, pid_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K, False, OUT_BF16)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _tile(x_desc, w_desc, o_desc, pid_m, pid_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K, WS, OUT_BF16)


# (tile, persistent, ws) -> whether the compiled kernel is warp-specialized (Triton may compile
# the loop plainly, e.g. with other than 4 warps on Hopper); None under the interpreter
WS_APPLIED: dict = {}


def ws_linear(x, w, tile, persistent: bool, ws: bool):
    """x [M, K] @ w[N, K].T with `tile` = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = tile
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if persistent:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        programs = min(sms, tiles)
    else:
        programs = tiles
    compiled = _ws_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
        TensorDescriptor.from_tensor(out, [bm, bn]), M, N, K, programs,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=persistent, WS=ws,
        OUT_BF16=x.dtype == torch.bfloat16, num_warps=warps, num_stages=stages)
    key = (tile, persistent, ws)
    if key not in WS_APPLIED:
        asm = getattr(compiled, "asm", None) or {}
        WS_APPLIED[key] = ("ttg.warp_specialize" in asm["ttgir"]) if "ttgir" in asm else None
    return out


LAUNCHES = [(False, False), (False, True), (True, False), (True, True)]  # (persistent, warp-specialized)
TILES = [(64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 256, 64, 4, 3),
         (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)]


def _bits(t):
    return t.view(torch.int16)  # compares signed zeros and NaN payloads too


def check_case(x, w, tiles, failed: set) -> tuple[int, int, list[str]]:
    """(mismatches, launches run, lines): every launch and tile vs the reference (the shipped
    kernel's SAFE_TILE, which every shipped table entry equals), and the last row alone. A launch
    that does not compile is added to `failed` (bench skips it) and counted as not run."""
    ref = _LT.linear_triton(x, w, None, _LT.SAFE_TILE)
    bad, ran, lines = 0, 0, []
    for tile in tiles:
        for persistent, ws in LAUNCHES:
            try:
                out = ws_linear(x, w, tile, persistent, ws)
                alone = ws_linear(x[-1:], w, tile, persistent, ws)
            except Exception as e:  # noqa: BLE001 - a launch Triton cannot compile here: reported, not run
                failed.add((tile, persistent, ws))
                lines.append(f"  tile={tile} persistent={persistent} ws={ws}: NOT RUN, {type(e).__name__}: "
                             f"{str(e)[:120]}")
                continue
            ran += 1
            same = torch.equal(_bits(out), _bits(ref))
            same_row = torch.equal(_bits(alone), _bits(ref[-1:]))
            bad += not (same and same_row)
            applied = WS_APPLIED.get((tile, persistent, ws))
            lines.append(f"  tile={tile} persistent={persistent} ws={ws} (warp-specialized: "
                         f"{'unknown' if applied is None else applied}): same bits as shipped {same}, "
                         f"last row alone {same_row}")
    return bad, ran, lines


def check(failed: set) -> int:
    g = torch.Generator().manual_seed(0)
    if torch.cuda.is_available():
        cases, tiles, dev, dtype = ((5, 2048, 6144), (300, 4096, 2048), (64, 12288, 2048)), TILES, "cuda", torch.bfloat16
    else:  # the interpreter's dot sums one BLOCK_K slice in numpy's order: only tiles of the shipped
        # SAFE_TILE's BLOCK_K (32) can agree bitwise there (as in the shipped kernel's interpreter tests)
        cases, tiles, dev, dtype = ((5, 40, 96), (33, 72, 64)), [(16, 32, 32, 4, 1), (32, 64, 32, 4, 1)], "cpu", \
            torch.float16
    bad, ran, total = 0, 0, 0
    for M, N, K in cases:
        x = torch.randn(M, K, generator=g).to(dtype).to(dev)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(dev)
        b, r, lines = check_case(x, w, tiles, failed)
        print(f"M={M} N={N} K={K}:", flush=True)
        print("\n".join(lines), flush=True)
        bad, ran, total = bad + b, ran + r, total + len(tiles) * len(LAUNCHES)
    plain_ws = sorted(k for k, v in WS_APPLIED.items() if k[2] and v is False)
    if plain_ws:
        print(f"warp specialization requested but not applied by Triton for {len(plain_ws)} launches: "
              f"{plain_ws}", flush=True)
    print(("ALL EQUAL" if bad == 0 else f"{bad} MISMATCHES") + f" ({ran} of {total} launches ran)", flush=True)
    return bad


def bench(ms, shape_filter, failed: set):
    from _common import SHAPES, copies_for, device_line, time_calls

    print(device_line(), "| bf16 | times in us, median of CUDA-graph replays; ratio = cuBLAS time / ours; "
          "ws columns count only kernels Triton warp-specialized", flush=True)
    names = [f"{'persistent' if p else 'tiles'}{'+ws' if ws else ''}" for p, ws in LAUNCHES]
    print("| shape | M | cuBLAS | shipped | " + " | ".join(f"{n} best (tile)" for n in names)
          + " | shipped ratio | best ws ratio | best ratio |", flush=True)
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|", flush=True)

    def ratio(ref, t):
        return f"{ref / t:.2f}" if t < float("inf") else "n/a"

    for name, K, N in SHAPES:
        if shape_filter and not any(p in name for p in shape_filter):
            continue
        ws_ = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies_for(N * K * 2))]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_ref = time_calls([lambda w=w: F.linear(x, w) for w in ws_])
            t_our = time_calls([lambda w=w: linear(x, w) for w in ws_])
            best = []
            for persistent, ws in LAUNCHES:
                b = (float("inf"), None)
                for tile in TILES:
                    key = (tile, persistent, ws)
                    if key in failed or (ws and WS_APPLIED.get(key) is False):
                        continue
                    try:
                        t = time_calls([lambda w=w: ws_linear(x, w, tile, persistent, ws) for w in ws_])
                    except Exception as e:  # noqa: BLE001 - out of resources for this tile
                        failed.add(key)
                        print(f"  {tile} persistent={persistent} ws={ws}: {type(e).__name__}", file=sys.stderr)
                        continue
                    if ws and WS_APPLIED.get(key) is False:  # learned on this first call
                        continue
                    b = min(b, (t, tile))
                best.append(b)
            cells = " | ".join(f"{t:.1f} {tile}" if tile else "n/a" for t, tile in best)
            t_ws = min(t for (t, _), (_, ws) in zip(best, LAUNCHES) if ws)
            t_all = min(t for t, _ in best)
            print(f"| {name} | {M} | {t_ref:.1f} | {t_our:.1f} | {cells} | {ratio(t_ref, t_our)} | "
                  f"{ratio(t_ref, t_ws)} | {ratio(t_ref, t_all)} |", flush=True)
            del x
        del ws_
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only the bitwise checks")
    ap.add_argument("--ms", default="64,128,256,512")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape names (default: all)")
    a = ap.parse_args()
    failed: set = set()
    bad = check(failed)
    if a.check or not torch.cuda.is_available():
        sys.exit(1 if bad else 0)
    if bad:
        print("not timing: the bits differ", flush=True)
        sys.exit(1)
    bench([int(m) for m in a.ms.split(",")], [s for s in a.shapes.split(",") if s], failed)


if __name__ == "__main__":
    main()
