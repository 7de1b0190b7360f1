"""Batch-invariant linear layer: `linear(x, weight, bias=None)` = x @ weight.T + bias.

Guarantee: an output row's bits depend only on that input row, the weight and
the bias -- not on how many other rows share the call (1 to thousands), nor on
where the row sits -- and an output column's bits depend only on its weight row
(so a merged QKV or gate/up projection gives the same bits as separate ones).
Holds in float32, float16 and bfloat16. Each output is one fp32 dot product over
K accumulated in order (no split-K), plus the bias in fp32, rounded once.

GPU: a Triton matmul (pointer loads, or on Hopper TMA tensor-descriptor loads,
optionally persistent). Its tile configuration is picked per M bucket and N
class (HOPPER_TABLE): on Hopper neither the tile shape, the warps, the pipeline
depth nor the load path changes the bits -- only split-K would, and this kernel
never splits K (tests/gpu/test_linear_tiles.py proves every table entry
bitwise equal to SAFE_TILE). Other GPUs use SAFE_TILE for every M.
On Hopper a bf16/fp16 call without bias (M <= 1024) may instead run a cuBLASLt
algorithm that never splits K, chosen per weight shape and M bucket for speed, and
used only after its output was checked bitwise equal to this kernel's, per
algorithm and bucket, on seeded operands built to expose any other summation
order (linear_choice.py).
CPU: BLAS on fixed [16, K] x [K, 256] tiles in fp32 (kernels/onpolicy_kernels/_cpu.py).
Backward: standard matmuls (fast, not invariant: only the forward must be).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from . import chooser as linear_choice
from ..._cpu import tiled_matmul
from ..._dispatch import call, check_float, check_same, custom_op, rows, shaped, use_triton
from ..._triton import HAS_TRITON, num_sms, require_triton, tl, triton

# A tile configuration is (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
# or the same with a 7th field, the kernel variant: "ptr" (the default: pointer
# loads), "tma" (tensor-descriptor loads/stores) or "persistent" (TMA, one
# program per SM looping over output tiles). Every variant computes each output
# tile the same way: one fp32 accumulator, K consumed in order, never split;
# only the loads and the order in which tiles are visited differ.
#
# HOPPER_TABLE is the table for sm_90: rows (max N, tiles); the first row whose
# max N >= N gives `tiles`, then its first tile whose max M >= M is used. N (a
# property of the weight, never of the batch) may steer the choice freely:
# narrow projections need small tiles to give every SM work without split-K.
# Fitted on an H200 by benchmarks/fit_tile_table.py from benchmarks/tune_linear.py
# sweeps (numbers: benchmarks/README.md).
# Every entry gives the same bits as SAFE_TILE (no split-K); the GPU test
# tests/gpu/test_linear_tiles.py proves it for each entry of HOPPER_TILES, and
# the interpreter tests (tests/kernels/test_triton_interpret.py) check every
# entry the CPU can run.
HOPPER_TABLE = (
    (2048, (
        (32, 16, 32, 256, 4, 5),
        (64, 64, 16, 128, 4, 5, "persistent"),
        (128, 64, 32, 128, 4, 5, "tma"),
        (256, 64, 64, 128, 4, 5, "tma"),
        (512, 64, 128, 128, 4, 4, "persistent"),
        (1024, 128, 128, 64, 4, 5, "persistent"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
    (4096, (
        (16, 16, 32, 256, 4, 5),
        (32, 32, 32, 256, 4, 5),
        (64, 64, 32, 128, 4, 5, "tma"),
        (128, 64, 64, 128, 4, 5, "tma"),
        (256, 64, 128, 128, 4, 4, "tma"),
        (512, 128, 128, 64, 4, 5, "tma"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
    (6144, (
        (16, 16, 64, 256, 4, 5),
        (32, 16, 32, 256, 4, 4, "tma"),
        (64, 64, 64, 128, 4, 5, "tma"),
        (128, 64, 128, 128, 4, 4, "persistent"),
        (256, 128, 128, 64, 4, 5, "persistent"),
        (512, 64, 128, 128, 4, 4, "persistent"),
        (1024, 128, 128, 64, 4, 5, "persistent"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
    (12288, (
        (16, 16, 128, 128, 4, 4, "tma"),
        (32, 32, 32, 128, 4, 4, "tma"),
        (64, 64, 128, 128, 4, 4, "persistent"),
        (128, 128, 128, 64, 4, 5, "tma"),
        (256, 64, 128, 128, 4, 4, "persistent"),
        (512, 128, 128, 64, 4, 5, "persistent"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
    (24576, (
        (16, 16, 64, 128, 4, 3),
        (32, 32, 64, 128, 4, 4),
        (64, 64, 64, 128, 4, 5, "persistent"),
        (128, 64, 128, 128, 4, 4, "persistent"),
        (256, 128, 128, 64, 4, 5, "persistent"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
    (1 << 62, (
        (16, 16, 128, 128, 4, 3),
        (32, 32, 64, 128, 4, 4),
        (64, 64, 128, 128, 4, 4, "persistent"),
        (256, 128, 128, 64, 4, 5, "persistent"),
        (1 << 62, 128, 256, 64, 8, 3, "persistent"),
    )),
)
# Every configuration the table can pick.
HOPPER_TILES = tuple(dict.fromkeys(t for _, tiles in HOPPER_TABLE for t in tiles))
# Other GPUs and the interpreter: one safe configuration (also the reference
# that every table entry is compared with).
SAFE_TILE = (1 << 62, 64, 64, 32, 4, 3)
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


def linear_cpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return tiled_matmul(x, w, b).to(x.dtype)


def _chooser(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]):
    """The Hopper kernel chooser (linear_choice.py) when it may serve this call, else None."""
    if not x.is_cuda or 0 in (x.shape[0], x.shape[1], w.shape[0]):
        return None
    if not linear_choice.enabled(x.device, _is_hopper(x.device.index if x.device.index is not None
                                                       else torch.cuda.current_device())):
        return None
    ch = linear_choice.chooser(_triton_reference)
    return ch if ch is not None and ch.eligible(x, w, b) else None


def _triton_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return linear_triton(x, w, None)


def linear_gpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """The GPU path on a 2-D x: a verified no-split cuBLASLt algorithm where the chooser
    found one faster for this weight and M bucket, else the Triton kernel. Same bits either way."""
    ch = _chooser(x, w, b)
    if ch is None:
        return linear_triton(x, w, b)
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    algo = ch.pick(x, w, out)
    if algo is None:
        return linear_triton(x, w, b, out=out)
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        with torch.cuda.device(x.device):  # cuBLASLt launches on the current device's context
            return ch.lt.run(x, w, out, algo)
    return ch.lt.run(x, w, out, algo)


def path_for(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> str:
    """What ran (or would run) `linear(x, w, b)` on a 2-D x: a cuBLASLt algorithm or a Triton tile."""
    ch = _chooser(x, w, b)
    label = ch.label(x, w) if ch is not None else None
    if label and label.startswith("cuBLASLt"):
        return label
    return f"triton {tile_for(x.shape[0], x.device, w.shape[0], w.shape[1])[1:]}"


@custom_op("onpolicy::linear", mutates_args=())
def _linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if use_triton(x):
        return linear_gpu(x, weight, bias)
    return linear_cpu(x, weight, bias)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    gx = grad @ weight if ctx.needs_input_grad[0] else None
    gw = grad.t() @ x if ctx.needs_input_grad[1] else None
    gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


_linear_op.register_autograd(_backward, setup_context=_setup)


def warm_up_rows(n: int, max_rows: int, device: torch.device, buckets: bool = False) -> list[int]:
    """Row counts that make `linear` run every tile configuration it can pick for an
    [n, K] weight and 1..max_rows rows on `device`: the smallest M of each M bucket;
    with `buckets`, also one M per bucket of the cuBLASLt chooser (linear_choice.py),
    so that each is tuned. Empty off CUDA (nothing to compile)."""
    if torch.device(device).type != "cuda" or max_rows < 1:
        return []
    rows, seen, m = [], set(), 1
    while m <= max_rows:
        tile = tile_for(m, device, n)
        if tile not in seen:
            seen.add(tile)
            rows.append(m)
        m = tile[0] + 1
    if buckets:
        rows = sorted(set(rows) | set(linear_choice.warm_up_rows(max_rows)))
    return rows


def warm_up(weight: torch.Tensor, bias: Optional[torch.Tensor], max_rows: int) -> int:
    """Compile (by running once, on zeros) every kernel `linear(x, weight, bias)` can
    launch for 1..max_rows rows of a contiguous x, and tune the cuBLASLt choice of each
    M bucket (on random rows), so that neither happens later inside a timed or
    CUDA-graph-captured run. Returns the number of calls made."""
    probe = weight.new_zeros(1, weight.shape[1])
    buckets = _chooser(probe, weight, bias) is not None
    rows = warm_up_rows(weight.shape[0], max_rows, weight.device, buckets)
    with torch.no_grad():
        for m in rows:
            linear(weight.new_zeros(m, weight.shape[1]), weight, bias)
    return len(rows)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch-invariant `torch.nn.functional.linear`: x [..., K], weight [N, K], bias [N]."""
    check_float("x", x)
    check_same("x", x, "weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1] if x.dim() else None}) must equal weight's K ({weight.shape[1]})")
    if bias is not None:
        check_same("x", x, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    out = call(_linear_op, rows(x), weight, bias)
    return shaped(out, x.shape[:-1] + (weight.shape[0],))
