"""Experiment (not shipped): a matmul whose K reduction is cut into FIXED chunks, for issue 12.

    python3 benchmarks/linear_kchunk_experiment.py [--ms 1,16,256,4096] [--shapes down,gate_up]
    TRITON_INTERPRET=1 python3 benchmarks/linear_kchunk_experiment.py --check   # bits, on a CPU

The shipped `linear` accumulates all of K in order in one fp32 accumulator (no
split-K), which leaves SMs idle where M x N has few tiles (decode at M = 64-512:
0.83-0.90x of cuBLAS, which splits K there). Split-K breaks batch invariance only
because cuBLAS picks the split by M. A split fixed by the weight alone does not:

    out = bf16( ((0 + S_0) + S_1) + ... + S_{C-1} ),  S_c = sum over K chunk c, in order, from 0

with the chunk size set by (N, K) only. Two launches compute exactly that:
  * "register": one program per output tile walks the chunks, summing each
    chunk's accumulator into a running total in registers (no extra traffic; for
    large M);
  * "split": one program per (tile, chunk) writes S_c in fp32, and a second
    kernel adds the chunks in order (more programs; for small and mid M).
Both must give the same bits for every tile shape (`--check` compares them, and
each tile configuration, bitwise). The bits differ from the shipped kernel's (a
different rounding order), so adopting this means changing the reference on
both sides; this script only measures whether it would pay: best time of each
launch over a few tiles vs cuBLAS and vs the shipped kernel, per shape and M.
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


@triton.jit(do_not_specialize=["M"])
def _chunk_kernel(x_ptr, w_ptr, o_ptr, p_ptr, M, N, K, CHUNK,
                  sxm, swn, som, spc, spm,
                  SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    if SPLIT:
        c = tl.program_id(2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, K), BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=mmask[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(w_ptr + rn[None, :] * swn + kk[:, None], mask=nmask[None, :] & (kk[:, None] < K), other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(p_ptr + c * spc + rm[:, None] * spm + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])
    else:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, K, CHUNK):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(c0, tl.minimum(c0 + CHUNK, K), BLOCK_K):
                kk = k0 + rk
                a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=mmask[:, None] & (kk[None, :] < K),
                            other=0.0)
                b = tl.load(w_ptr + rn[None, :] * swn + kk[:, None], mask=nmask[None, :] & (kk[:, None] < K),
                            other=0.0)
                acc = tl.dot(a, b, acc)
            total += acc
        tl.store(o_ptr + rm[:, None] * som + rn[None, :], total.to(o_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])


@triton.jit(do_not_specialize=["M"])
def _chunk_tma_kernel(x_desc, w_desc, o_ptr, p_ptr, M, N, K, CHUNK, C, som, spc, spm,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The same sums with tensor-descriptor (TMA) loads, as the shipped kernel's fast variants;
    # out-of-range rows / columns / k arrive as zeros. Split: program = (tile, chunk).
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    if SPLIT:
        c = pid % C
        pid = pid // C
    m0 = (pid // num_n) * BLOCK_M
    n0 = (pid % num_n) * BLOCK_N
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    omask = (rm < M)[:, None] & (rn < N)[None, :]
    steps = CHUNK // BLOCK_K
    if SPLIT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(c * steps, tl.minimum(c * steps + steps, tl.cdiv(K, BLOCK_K))):
            acc = tl.dot(x_desc.load([m0, ki * BLOCK_K]), w_desc.load([n0, ki * BLOCK_K]).T, acc)
        tl.store(p_ptr + c * spc + rm[:, None] * spm + rn[None, :], acc, mask=omask)
    else:
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(c0 * steps, tl.minimum(c0 * steps + steps, tl.cdiv(K, BLOCK_K))):
                acc = tl.dot(x_desc.load([m0, ki * BLOCK_K]), w_desc.load([n0, ki * BLOCK_K]).T, acc)
            total += acc
        tl.store(o_ptr + rm[:, None] * som + rn[None, :], total.to(o_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _combine_kernel(p_ptr, o_ptr, MN, C, spc, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(C):  # in chunk order, from 0: the same additions as the register launch
        total += tl.load(p_ptr + c * spc + offs, mask=mask, other=0.0)
    tl.store(o_ptr + offs, total.to(o_ptr.dtype.element_ty), mask=mask)


def chunked_linear(x, w, chunk, tile, split, tma=False):
    """x [M, K] @ w[N, K].T with K in fixed chunks of `chunk`; tile = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    M, K = x.shape
    N = w.shape[0]
    bm, bn, bk, warps, stages = tile
    assert chunk % bk == 0, "a chunk must be whole BLOCK_K steps"
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    C = triton.cdiv(K, chunk)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        part = torch.empty(C, M, N, dtype=torch.float32, device=x.device) if split else out
        _chunk_tma_kernel[(tiles * (C if split else 1),)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), out, part,
            M, N, K, chunk, C, out.stride(0), part.stride(0) if split else 0, part.stride(1) if split else 0,
            SPLIT=split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        if split:
            _combine_kernel[(triton.cdiv(M * N, 1024),)](part, out, M * N, C, part.stride(0), BLOCK=1024)
        return out
    if split:
        part = torch.empty(C, M, N, dtype=torch.float32, device=x.device)
        _chunk_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn), C)](
            x, w, out, part, M, N, K, chunk, x.stride(0), w.stride(0), out.stride(0), part.stride(0),
            part.stride(1), SPLIT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        _combine_kernel[(triton.cdiv(M * N, 1024),)](part, out, M * N, C, part.stride(0), BLOCK=1024)
    else:
        _chunk_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x, w, out, out, M, N, K, chunk, x.stride(0), w.stride(0), out.stride(0), 0, 0,
            SPLIT=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


LAUNCHES = [(False, False), (True, False), (False, True), (True, True)]  # (split, tma)
TILES = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (64, 128, 64, 4, 4),
         (64, 128, 128, 4, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3)]


def check(dtype=torch.float16):
    """Bits: both launches and every tile give the same output; a row alone == inside a batch."""
    g = torch.Generator().manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # The interpreter's dot sums a BLOCK_K slice in numpy's order, so on the CPU only tiles of
    # one BLOCK_K can agree; on Hopper the claim is every tile (as for the shipped kernel).
    tiles = TILES if dev == "cuda" else [(16, 32, 32, 4, 1), (32, 16, 32, 4, 1), (64, 64, 32, 4, 1)]
    bad = 0
    for M, N, K, chunk in ((5, 40, 256, 128), (33, 70, 384, 128), (1, 16, 200, 64)) if dev == "cpu" else \
            ((5, 2048, 6144, 2048), (300, 4096, 2048, 1024), (1, 12288, 2048, 1024), (70, 1024, 1024, 128)):
        x = torch.randn(M, K, generator=g).to(dtype).to(dev)
        w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype).to(dev)
        ref = chunked_linear(x, w, chunk, tiles[0], split=False)
        for tile in tiles:
            if chunk % tile[2]:
                continue
            for split, tma in LAUNCHES:
                out = chunked_linear(x, w, chunk, tile, split, tma)
                same = torch.equal(out.view(torch.int16), ref.view(torch.int16))  # bits, incl. signed zeros
                alone = chunked_linear(x[-1:], w, chunk, tile, split, tma)
                same_row = torch.equal(alone.view(torch.int16), ref[-1:].view(torch.int16))
                bad += not (same and same_row)
                print(f"M={M} N={N} K={K} chunk={chunk} tile={tile} split={split} tma={tma}: same bits {same}, "
                      f"last row alone {same_row}", flush=True)
    print("ALL EQUAL" if bad == 0 else f"{bad} MISMATCHES")
    return bad


def bench(ms, shape_filter):
    from _common import SHAPES, copies_for, device_line, time_calls

    from onpolicy_kernels import linear

    print(device_line(), "| bf16 | times in us, median of CUDA-graph replays", flush=True)
    names = [f"{'split' if s else 'register'}{'-tma' if t else ''}" for s, t in LAUNCHES]
    print("| shape | M | cuBLAS | shipped | chunk | " + " | ".join(f"{n} best (tile)" for n in names)
          + " | cuBLAS/shipped | cuBLAS/best chunked |")
    print("|---|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for name, K, N in SHAPES:
        if shape_filter and not any(p in name for p in shape_filter):
            continue
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5 for _ in range(copies_for(N * K * 2))]
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_ref = time_calls([lambda w=w: F.linear(x, w) for w in ws])
            t_our = time_calls([lambda w=w: linear(x, w) for w in ws])
            for chunk in (K // 2, K // 4):  # a property of the weight: fixed for every M
                best = []
                for split, tma in LAUNCHES:
                    b = (float("inf"), None)
                    for tile in TILES:
                        if chunk % tile[2]:
                            continue
                        try:
                            t = time_calls([lambda w=w: chunked_linear(x, w, chunk, tile, split, tma) for w in ws])
                        except Exception as e:  # noqa: BLE001 - out of resources for this tile
                            print(f"  {tile} split={split} tma={tma}: {type(e).__name__}", file=sys.stderr)
                            continue
                        b = min(b, (t, tile))
                    best.append(b)
                cells = " | ".join(f"{t:.1f} {tile}" for t, tile in best)
                print(f"| {name} | {M} | {t_ref:.1f} | {t_our:.1f} | {chunk} | {cells} | {t_ref / t_our:.2f} | "
                      f"{t_ref / min(t for t, _ in best):.2f} |", flush=True)
            del x
        del ws
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="bitwise check of both launches and the tiles")
    ap.add_argument("--ms", default="16,64,128,256,512,4096")
    ap.add_argument("--shapes", default="1.7B,8B qkv,8B o")
    a = ap.parse_args()
    if a.check or not torch.cuda.is_available():
        sys.exit(1 if check() else 0)
    if check():
        sys.exit(1)
    bench([int(m) for m in a.ms.split(",")], [s for s in a.shapes.split(",") if s])


if __name__ == "__main__":
    main()
