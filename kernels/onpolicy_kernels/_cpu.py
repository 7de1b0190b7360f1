"""Building blocks of the portable CPU path, each invariant by construction.

Plain CPU torch is not batch-invariant: a GEMM picks blocking and threading by its
shape, a reduction may split a long row across threads, and a vectorised
transcendental (exp, log) handles the tail of a buffer with a scalar loop whose
rounding can differ. The CPU path therefore only ever uses three kinds of step:

* IEEE-exact elementwise arithmetic (+, -, *, /, sqrt, max): correctly rounded
  wherever and however it runs, so a value's bits depend only on its inputs;
* reductions written as a fixed binary tree of such elementwise steps
  (`tree_sum`, `tree_max`): the order is fixed by the row length alone;
* calls whose shape never depends on the batch: BLAS on fixed row/column tiles
  (`tiled_matmul`), transcendentals on fixed-size, 64-aligned chunks
  (`chunked`), each below torch's parallel grain so one thread runs it.
"""
from __future__ import annotations

import torch

# Rows of one GEMM call of tiled_matmul; columns of one weight tile. 64 rows: a weight tile is packed
# once per 64 rows rather than per 16 (1.6-1.8x faster from a few hundred rows, 1.3x slower at 8 rows).
ROW_TILE = 64
# Rows of one GEMM call of the CPU attention (decode rows are few per sequence: small tiles waste less).
ATTN_ROW_TILE = 16
COL_TILE = 256
# Elementwise transcendental chunk: a multiple of 64 (every SIMD width divides
# it, so no scalar tail) and below at::internal::GRAIN_SIZE (32768), so torch
# never splits a chunk across threads.
CHUNK = 16384
ALIGN = 64


def round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_last(x: torch.Tensor, width: int, value: float = 0.0) -> torch.Tensor:
    """Contiguous copy of `x` with its last dim padded to `width` with `value`."""
    n = x.shape[-1]
    if n == width:
        return x.contiguous()
    out = x.new_full((*x.shape[:-1], width), value)
    out[..., :n] = x
    return out


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by pairwise halving; the order depends only on its length."""
    x = pad_last(x, next_pow2(x.shape[-1]), 0.0)
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x


def tree_max(x: torch.Tensor) -> torch.Tensor:
    """Max over the last dim (exact in any order; halving keeps it cheap), keepdim."""
    x = pad_last(x, next_pow2(x.shape[-1]), float("-inf"))
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = torch.maximum(x[..., :h], x[..., h:])
    return x


def chunked(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise `fn` (exp, log, ...) so every element takes the same code path.

    The last dim is padded to a multiple of 64 and the flat buffer is processed
    in CHUNK-sized pieces: each element sits at a fixed SIMD lane (its column
    mod 64), never in a scalar tail, and each call runs on one thread.
    """
    n = x.shape[-1]
    xp = pad_last(x, round_up(n, ALIGN), 0.0)
    flat = xp.reshape(-1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), CHUNK):
        out[s : s + CHUNK] = fn(flat[s : s + CHUNK])
    return out.view(xp.shape)[..., :n]


def tiled_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 `x @ w.T + bias` for x [M, K], w [N, K], via BLAS on fixed [64, K] x [K, 256] tiles.

    Every BLAS product has the same shape whatever M and N are (partial tiles are
    zero-padded), so a row's result cannot depend on the other rows, nor a
    column's on the other columns. The row tiles of one weight tile go to BLAS as
    one batched product (`torch.bmm`, the weight tile broadcast), whose items have
    the bits of the same product made alone, wherever they sit and however many
    share the call (tests/kernels/test_linear.py checks it). Operands are upcast to
    fp32 (bf16/fp16 products are exact in fp32), so the bias is added before the one
    rounding.
    """
    M, K = x.shape
    N = w.shape[0]
    T = max(1, -(-M // ROW_TILE))
    xf = torch.zeros(T * ROW_TILE, K, dtype=torch.float32)
    xf[:M] = x
    tiles = xf.view(T, ROW_TILE, K)
    out = torch.empty(T * ROW_TILE, N, dtype=torch.float32)
    wt = torch.zeros(COL_TILE, K, dtype=torch.float32)
    for n0 in range(0, N, COL_TILE):
        nn = min(COL_TILE, N - n0)
        wt[:nn] = w[n0 : n0 + nn]
        if nn < COL_TILE:
            wt[nn:] = 0
        prod = torch.bmm(tiles, wt.t().expand(T, K, COL_TILE))
        out[:, n0 : n0 + nn] = prod.view(T * ROW_TILE, COL_TILE)[:, :nn]
    out = out[:M]
    if bias is not None:
        out += bias.float()
    return out
