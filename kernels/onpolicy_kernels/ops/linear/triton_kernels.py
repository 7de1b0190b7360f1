"""The invariant linear's Triton kernels and their tile configurations (GPU).

Each output tile is one fp32 accumulator over K consumed in order, never split, so a
row's bits do not depend on M or on the tile configuration: the configuration is a
speed choice, per M bucket and weight width N, read from a table per GPU
architecture (configs/sm_90.json for Hopper, as vLLM keeps its tuned kernel configs
as data files); other GPUs and the interpreter use SAFE_TILE.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ..._triton import HAS_TRITON, num_sms, require_triton, tl, triton


# A tile configuration is (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# or the same with a 7th field, the kernel variant: "ptr" (the default: pointer
# loads), "tma" (tensor-descriptor loads/stores) or "persistent" (TMA, one
# program per SM looping over output tiles). Every variant computes each output
# tile the same way: one fp32 accumulator, K consumed in order, never split;
# only the loads and the order in which tiles are visited differ.
#
# HOPPER_TABLE is the table for sm_90 (configs/sm_90.json): rows (max N, tiles); the first row whose
# max N >= N gives `tiles`, then its first tile whose max M >= M is used. N (a
# property of the weight, never of the batch) may steer the choice freely:
# narrow projections need small tiles to give every SM work without split-K.
# Fitted on an H200 by benchmarks/fit_tile_table.py from benchmarks/tune_linear.py
# sweeps (numbers: benchmarks/README.md).
# Every entry gives the same bits as SAFE_TILE (no split-K); the GPU test
# tests/gpu/test_linear_tiles.py proves it for each entry of HOPPER_TILES, and
# the interpreter tests (tests/kernels/test_triton_interpret.py) check every
# entry the CPU can run.
UNBOUNDED = 1 << 62


def load_table(path: str) -> tuple:
    """A tile table from its JSON file: ((max N, (tile, ...)), ...), null bounds read as UNBOUNDED."""
    with open(path) as f:
        data = json.load(f)
    bound = lambda v: UNBOUNDED if v is None else int(v)  # noqa: E731
    return tuple((bound(e["max_n"]), tuple((bound(t[0]), *t[1:]) for t in e["tiles"])) for e in data["by_max_n"])


HOPPER_TABLE = load_table(os.path.join(os.path.dirname(__file__), "configs", "sm_90.json"))
# Every configuration the table can pick.
HOPPER_TILES = tuple(dict.fromkeys(t for _, tiles in HOPPER_TABLE for t in tiles))
# Other GPUs and the interpreter: one safe configuration (also the reference
# that every table entry is compared with).
SAFE_TILE = (UNBOUNDED, 64, 64, 32, 4, 3)
VARIANTS = ("ptr", "tma", "persistent")


def variant_of(tile: tuple) -> str:
    v = tile[6] if len(tile) > 6 else "ptr"
    if v not in VARIANTS:
        raise ValueError(f"unknown linear kernel variant {v!r}; expected one of {VARIANTS}")
    return v


@functools.lru_cache(maxsize=None)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def tile_for(m: int, device: torch.device, n: Optional[int] = None, k: Optional[int] = None) -> tuple:
    """The tile configuration the kernel uses for M rows (of an [N, K] weight) on `device`.

    The choice may depend on M, N and K freely: every configuration gives the
    same bits, so a row's result does not depend on which one M selected.
    """
    device = torch.device(device)
    if device.type == "cuda" and _is_hopper(device.index if device.index is not None else torch.cuda.current_device()):
        n = n if n is not None else 1 << 62
        for max_n, tiles in HOPPER_TABLE:
            if n <= max_n:
                for row in tiles:
                    if m <= row[0]:
                        return row
    return SAFE_TILE


if HAS_TRITON:

    @triton.jit
    def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Swizzled tile order (groups of GROUP_M row tiles) for L2 reuse; the
        # order of tiles never affects a tile's arithmetic.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        gsize = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % gsize
        pid_n = (pid % group) // gsize
        return pid_m, pid_n

    # M and the persistent program count vary with the batch: not specialized, so one
    # compiled kernel per tile configuration serves every M (no JIT compile when a
    # new batch size first arrives, e.g. inside a timed rollout).
    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(
        x_ptr, w_ptr, b_ptr, o_ptr, M, N, K,
        sxm, sxk, swn, swk, som, son,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        # 64-bit tile origins (M*N and N*K may exceed 2**31); 32-bit offsets inside a tile.
        m0 = pid_m.to(tl.int64) * BLOCK_M
        n0 = pid_n.to(tl.int64) * BLOCK_N
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mmask = rm < M - m0
        nmask = rn < N - n0
        xb = x_ptr + m0 * sxm
        wb = w_ptr + n0 * swn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(xb + rm[:, None] * sxm + kk[None, :] * sxk,
                        mask=mmask[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(wb + rn[None, :] * swn + kk[:, None] * swk,
                        mask=nmask[None, :] & (kk[:, None] < K), other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n0 + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        ob = o_ptr + m0 * som + n0 * son
        tl.store(ob + rm[:, None] * som + rn[None, :] * son, acc.to(o_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    @triton.jit(do_not_specialize=["M", "NUM_PROGRAMS"])
    def _linear_tma_kernel(
        x_desc, w_desc, o_desc, b_ptr, M, N, K,
        HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        NUM_PROGRAMS,
    ):
        # Tensor-descriptor (TMA) loads: out-of-range rows/cols/k arrive as
        # zeros, so every tile computes exactly what the pointer kernel does.
        # With NUM_PROGRAMS < number of tiles this is the persistent variant.
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            m0 = pid_m * BLOCK_M
            n0 = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = x_desc.load([m0, ki * BLOCK_K])
                b = w_desc.load([n0, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
            if HAS_BIAS:
                rn = n0 + tl.arange(0, BLOCK_N)
                acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if OUT_BF16:
                o_desc.store([m0, n0], acc.to(tl.bfloat16))
            else:
                o_desc.store([m0, n0], acc.to(tl.float16))


SMEM_BUDGET = 200 * 1024  # bytes of shared memory a tile's pipeline may use (sm_90 has 227 KiB)


def _fit_smem(bm: int, bn: int, bk: int, stages: int, elem: int) -> tuple[int, int]:
    """(BLOCK_K, stages) shrunk until the pipeline fits in shared memory (fp32 operands
    take twice the bytes of the bf16 the table was tuned for). BLOCK_K and stages never
    change the bits: K is still consumed in order into one accumulator."""
    while stages > 2 and stages * (bm + bn) * bk * elem > SMEM_BUDGET:
        stages -= 1
    while bk > 16 and stages * (bm + bn) * bk * elem > SMEM_BUDGET:
        bk //= 2
    return bk, stages


def _tma_ok(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether tensor descriptors can address these operands (else the pointer kernel runs)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    for t in (x, w, out):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def linear_triton(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], tile: Optional[tuple] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The Triton path on a 2-D x; `tile` overrides the table (for the bitwise tile tests);
    `out` is a contiguous [M, N] tensor to write into (else a new one).

    A "tma"/"persistent" tile falls back to the pointer kernel with the same
    block sizes where descriptors cannot address the operands (fp32, odd
    strides or alignment); the bits are the same either way.
    """
    require_triton()
    M, K = x.shape
    N = w.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(b.expand(M, N)) if b is not None else out.zero_()
    if b is not None:
        b = b.contiguous()
    tile = tile or tile_for(M, x.device, N, K)
    _, bm, bn, bk, warps, stages = tile[:6]
    bk, stages = _fit_smem(bm, bn, bk, stages, x.element_size())
    variant = variant_of(tile)
    num_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if variant != "ptr" and _tma_ok(x, w, out):
        from triton.tools.tensor_descriptor import TensorDescriptor

        if variant == "persistent":
            sms = num_sms(x.device) if x.is_cuda else 4
            programs = min(sms, num_tiles)
        else:
            programs = num_tiles
        _linear_tma_kernel[(programs,)](
            TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
            TensorDescriptor.from_tensor(out, [bm, bn]), b if b is not None else x, M, N, K,
            HAS_BIAS=b is not None, OUT_BF16=x.dtype == torch.bfloat16,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, NUM_PROGRAMS=programs,
            num_warps=warps, num_stages=stages,
        )
        return out
    _linear_kernel[(num_tiles,)](
        x, w, b if b is not None else x, out, M, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=b is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out
