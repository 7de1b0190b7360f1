"""The MoE op's Triton path (GPU; the interpreter on a CPU): router, token alignment, grouped
expert GEMMs with the gated SiLU between them, combine. Five launches, no host sync, no
data-dependent shape: a call is CUDA-graph capturable at any batch size.

    route_triton(logits, k, renorm)        -> weights fp32 [T, k], ids int64 [T, k]
    expert_outputs_triton(x, ids, w13, w2) -> y [T, k, H] (model dtype)
    combine_triton(y, weights)             -> out [T, H]

Guarantee: a token's output bits (its expert ids, routing weights, every expert output and
the combined row) depend only on its own row and the weights -- not on how many tokens
share the call, where the token sits, nor how many tokens go to each expert; float32,
float16, bfloat16. Why, kernel by kernel:

* `_route_kernel`, one program per token: softmax in fp32 (max; exp elementwise; the sum by
  a fixed pairwise tree over the experts padded to a power of two with zeros, the same tree
  as the CPU's `tree_sum`; one division); top-k by probability, largest first, a tie to the
  lower expert index; an expert is never taken twice (a non-finite row, which only vLLM's
  warm-up feeds, takes the lowest experts not yet taken). With renormalize the k
  probabilities are divided by their sum taken in slot order.
* `_align_kernel` (vLLM's "moe_align_block_size" idea, written here): the (token, slot)
  pairs grouped by expert into `sorted_pairs`, each expert's group padded to a multiple of
  BLOCK_M with a sentinel (T*k), the groups laid out in expert order; `block_expert[b]` the
  expert of block b, -1 after the last used block. Buffers sized by the worst case,
  T*k + E*(BLOCK_M - 1) slots; one program per expert. Where a pair lands only decides which
  program computes it, never what it computes.
* `_experts_gate_up_kernel` / `_experts_down_kernel`: one program per (block of BLOCK_M
  pairs of one expert, BLOCK_N output columns); the grid is the worst-case number of blocks
  and a surplus block's programs exit at once. Each output element is one fp32 accumulator
  over K consumed in order in BLOCK_K steps (tl.dot), never split. The configuration
  (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) is fixed per device kind, dtype and
  weight shape (`expert_config`), never chosen by the number of tokens or an expert's
  load, so the rows beside a token in its block (other tokens, padding) never touch its
  bits. Between the GEMMs, per element: gate and up rounded to the model dtype (what the
  linear op returns), then g / (1 + exp(-g)) * u in fp32, rounded once (silu_and_mul's
  formula). The down GEMM writes each pair's row at its own (token, slot) place; padding
  rows are never written.
* `_combine_kernel`, one program per (token, column block): sum_j w[t, j] * y[t, j] in fp32,
  slot order, starting from the first product, each multiply and add rounded on its own
  (compiled without FMA contraction), one rounding to the model dtype.

The math is the CPU path's formula step by step; the bits are the GPU's (its exp, its MMA),
so sampler and trainer must both run this path (they do on one kind of GPU). Backward: not
here (ops/moe.py recomputes with standard ops).
"""
from __future__ import annotations

import torch

from .._triton import HAS_TRITON, require_triton, tl, triton
from .._cpu import next_pow2

if HAS_TRITON:

    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, ids_ptr, E, s_l, TOP_K: tl.constexpr, K_P2: tl.constexpr,
                      E_P2: tl.constexpr, LOG2_E: tl.constexpr, RENORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        ar = tl.arange(0, E_P2)
        valid = ar < E
        lf = tl.load(logits_ptr + t * s_l + ar, mask=valid, other=float("-inf")).to(tl.float32)
        m = tl.max(lf, axis=0)
        ex = tl.where(valid, tl.exp(lf - m), 0.0)
        s = ex
        for _ in tl.static_range(LOG2_E):  # pairwise halving: s[:h] + s[h:], the CPU's tree
            s = tl.sum(tl.reshape(s, (2, s.shape[0] // 2)), axis=0)
        total = tl.sum(s, axis=0)  # one element left
        p = ex / total
        q = tl.where(valid, p, -1.0)
        taken = ar >= E
        ak = tl.arange(0, K_P2)
        vals = tl.zeros((K_P2,), dtype=tl.float32)
        acc = 0.0
        for j in tl.static_range(TOP_K):
            best = tl.max(q, axis=0)
            idx = tl.min(tl.where((q == best) & (~taken), ar, E_P2), axis=0)
            free = tl.min(tl.where(~taken, ar, E_P2), axis=0)  # a NaN row: lowest expert not taken
            idx = tl.where(idx < E_P2, idx, free)
            hit = ar == idx
            v = tl.sum(tl.where(hit, p, 0.0), axis=0)
            taken = taken | hit
            q = tl.where(hit, -1.0, q)
            tl.store(ids_ptr + t * TOP_K + j, idx.to(tl.int64))
            vals = tl.where(ak == j, v, vals)
            if j == 0:
                acc = v
            else:
                acc = acc + v
        if RENORM:
            vals = vals / acc
        tl.store(w_ptr + t * TOP_K + ak, vals, mask=ak < TOP_K)

    @triton.jit
    def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, N, E, NUM_BLOCKS,
                      BLOCK_M: tl.constexpr, E_P2: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr):
        e = tl.program_id(0)
        bins = tl.arange(0, BINS)
        hist = tl.zeros((BINS,), dtype=tl.int32)
        for c0 in range(0, N, CHUNK):  # every expert's count (each program counts them all)
            offs = c0 + tl.arange(0, CHUNK)
            v = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
            v = tl.where((v >= 0) & (v < E), v, E_P2)  # outside every expert: the spare bin
            hist += tl.histogram(v, BINS)
        hist = tl.where(bins < E, hist, 0)
        padded = (hist + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.cumsum(padded, axis=0) - padded
        off_e = tl.sum(tl.where(bins == e, start, 0), axis=0)
        n_e = tl.sum(tl.where(bins == e, hist, 0), axis=0)
        pad_e = tl.sum(tl.where(bins == e, padded, 0), axis=0)
        used = tl.sum(padded, axis=0) // BLOCK_M
        run = 0
        for c0 in range(0, N, CHUNK):  # this expert's pairs, in pair order
            offs = c0 + tl.arange(0, CHUNK)
            v = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
            mine = (v == e) & (offs < N)
            rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
            tl.store(sorted_ptr + off_e + run + rank, offs, mask=mine)
            run += tl.sum(mine.to(tl.int32), axis=0)
        rm = tl.arange(0, BLOCK_M)
        tl.store(sorted_ptr + off_e + n_e + rm, N, mask=rm < pad_e - n_e)  # sentinel rows
        for b in range(off_e // BLOCK_M, (off_e + pad_e) // BLOCK_M):
            tl.store(block_expert_ptr + b, e)
        for b in range(used + e, NUM_BLOCKS, E):  # surplus blocks, shared out between programs
            tl.store(block_expert_ptr + b, -1)

    # The two grouped GEMMs' shared steps (inlined by Triton: the same instructions as written out).
    @triton.jit
    def _block_of(block_expert_ptr, NUM_BLOCKS):
        """(row block, column block, its expert or -1) of this program: programs run row blocks fastest."""
        pid = tl.program_id(0)
        pid_m = pid % NUM_BLOCKS
        return pid_m, pid // NUM_BLOCKS, tl.load(block_expert_ptr + pid_m)

    @triton.jit
    def _block_pairs(sorted_ptr, pid_m, N_PAIRS, BLOCK_M: tl.constexpr):
        """(slot rows, their (token, slot) pairs, which are live -- not the alignment's padding)."""
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ptr + rows)
        return rows, pair, pair < N_PAIRS

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b in fp32; fp32 inputs as IEEE products (no TF32)."""
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit(do_not_specialize=["N_PAIRS"])
    def _experts_gate_up_kernel(x_ptr, w_ptr, act_ptr, sorted_ptr, block_expert_ptr, N_PAIRS, TOP_K, H, I,
                                sxm, sxk, swe, swn, swk, sam, NUM_BLOCKS, IEEE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, e = _block_of(block_expert_ptr, NUM_BLOCKS)
        if e < 0:  # a surplus block of the worst-case alignment
            return
        rows, pair, live = _block_pairs(sorted_ptr, pid_m, N_PAIRS, BLOCK_M)
        tok = tl.where(live, pair // TOP_K, 0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < I
        rk = tl.arange(0, BLOCK_K)
        wb = w_ptr + e.to(tl.int64) * swe
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            kmask = kk < H
            a = tl.load(x_ptr + tok[:, None] * sxm + kk[None, :] * sxk, mask=live[:, None] & kmask[None, :],
                        other=0.0)
            wmask = nmask[None, :] & kmask[:, None]
            bg = tl.load(wb + rn[None, :] * swn + kk[:, None] * swk, mask=wmask, other=0.0)
            bu = tl.load(wb + (rn[None, :] + I) * swn + kk[:, None] * swk, mask=wmask, other=0.0)
            acc_g = _dot(a, bg, acc_g, IEEE)
            acc_u = _dot(a, bu, acc_u, IEEE)
        dt = act_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)  # the gate/up linear's output, rounded to the model dtype
        u = acc_u.to(dt).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + rows[:, None] * sam + rn[None, :], h.to(dt), mask=live[:, None] & nmask[None, :])

    @triton.jit(do_not_specialize=["N_PAIRS"])
    def _experts_down_kernel(act_ptr, w_ptr, y_ptr, sorted_ptr, block_expert_ptr, N_PAIRS, H, I,
                             sam, swe, swn, swk, sym, NUM_BLOCKS, IEEE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, e = _block_of(block_expert_ptr, NUM_BLOCKS)
        if e < 0:  # a surplus block of the worst-case alignment
            return
        rows, pair, live = _block_pairs(sorted_ptr, pid_m, N_PAIRS, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < H
        rk = tl.arange(0, BLOCK_K)
        wb = w_ptr + e.to(tl.int64) * swe
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + rk
            kmask = kk < I
            a = tl.load(act_ptr + rows[:, None] * sam + kk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            b = tl.load(wb + rn[None, :] * swn + kk[:, None] * swk, mask=nmask[None, :] & kmask[:, None], other=0.0)
            acc = _dot(a, b, acc, IEEE)
        dst = tl.where(live, pair, 0).to(tl.int64)
        tl.store(y_ptr + dst[:, None] * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=live[:, None] & nmask[None, :])

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, o_ptr, H, TOP_K, syt, syj, sw, so, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        yb = y_ptr + t * syt + cols
        acc = tl.load(yb, mask=mask, other=0.0).to(tl.float32) * tl.load(w_ptr + t * sw)
        for j in range(1, TOP_K):
            acc = acc + tl.load(yb + j * syj, mask=mask, other=0.0).to(tl.float32) * tl.load(w_ptr + t * sw + j)
        tl.store(o_ptr + t * so + cols, acc.to(o_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configurations

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the gate/up and the down GEMM. One per
# device kind and dtype; BLOCK_N shrinks (never by the batch) where the weight is narrower.
_GPU_CONFIG = {2: ((64, 64, 64, 4, 4), (64, 128, 64, 4, 4)),      # bf16 / fp16
               4: ((64, 64, 32, 4, 3), (64, 64, 32, 4, 3))}       # fp32 (ieee dots: more smem per K)
_INTERPRETER_CONFIG = ((16, 32, 32, 1, 1), (16, 32, 32, 1, 1))    # small tiles: the CPU interpreter is slow
_ALIGN_CHUNK = 1024


def expert_config(x: torch.Tensor, w13: torch.Tensor) -> tuple[tuple, tuple]:
    """The two GEMMs' fixed tile configurations for these weights on x's device -- a function of
    the device kind, dtype and weight shape only, never of the number of tokens."""
    cfg = _GPU_CONFIG[x.element_size()] if x.is_cuda else _INTERPRETER_CONFIG
    I, H = w13.shape[1] // 2, w13.shape[2]
    (m1, n1, k1, w1, s1), (m2, n2, k2, w2, s2) = cfg
    n1 = min(n1, max(16, next_pow2(I)))
    n2 = min(n2, max(16, next_pow2(H)))
    return (m1, n1, k1, w1, s1), (m2, n2, k2, w2, s2)


# --------------------------------------------------------------------------- host wrappers

def route_triton(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    T, E = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        e_p2 = next_pow2(E)
        _route_kernel[(T,)](logits, w, ids, E, logits.stride(0), TOP_K=top_k, K_P2=next_pow2(top_k), E_P2=e_p2,
                            LOG2_E=e_p2.bit_length() - 1, RENORM=bool(renormalize), num_warps=4,
                            enable_fp_fusion=False)
    return w, ids


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted_pairs int32 [worst case], block_expert int32 [worst-case blocks], number of blocks)."""
    n = ids.numel()
    slots = n + num_experts * (block_m - 1)
    blocks = triton.cdiv(slots, block_m)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    _align_kernel[(num_experts,)](flat, sorted_pairs, block_expert, n, num_experts, blocks, BLOCK_M=block_m,
                                  E_P2=next_pow2(num_experts), BINS=max(2 * next_pow2(num_experts), 128),
                                  CHUNK=_ALIGN_CHUNK, num_warps=4)
    return sorted_pairs, block_expert, blocks


def expert_outputs_triton(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """y [T, k, H]: expert ids[t, j]'s gated MLP on token t (module docstring)."""
    require_triton()
    T, k = ids.shape
    E, I2, H = w13.shape
    y = torch.empty(T, k, H, dtype=x.dtype, device=x.device)
    if T * k == 0 or H == 0:
        return y
    cfg = expert_config(x, w13)
    sorted_pairs, block_expert, blocks = align(ids, E, cfg[0][0])
    act = torch.empty(blocks * cfg[0][0], I2 // 2, dtype=x.dtype, device=x.device)
    expert_gemms(x, w13, w2, k, sorted_pairs, block_expert, act, y.view(T * k, H), cfg)
    return y


def expert_gemms(x, w13, w2, top_k: int, sorted_pairs, block_expert, act, y2, cfg) -> None:
    """The two grouped GEMMs on an alignment: act [slots, I] (sorted order; live rows written) and
    y2 [T*k, H] (row = token * k + slot; every pair's row written, nothing else)."""
    (m1, n1, k1, nw1, st1), (m2, n2, k2, nw2, st2) = cfg
    if m1 != m2:
        raise AssertionError("both GEMMs share one alignment: BLOCK_M must match")
    n_pairs, H = y2.shape
    I = w13.shape[1] // 2
    blocks = block_expert.numel()
    ieee = x.dtype == torch.float32
    if I:
        _experts_gate_up_kernel[(blocks * triton.cdiv(I, n1),)](
            x, w13, act, sorted_pairs, block_expert, n_pairs, top_k, H, I, x.stride(0), x.stride(1),
            w13.stride(0), w13.stride(1), w13.stride(2), act.stride(0), blocks, IEEE=ieee,
            BLOCK_M=m1, BLOCK_N=n1, BLOCK_K=k1, num_warps=nw1, num_stages=st1)
    _experts_down_kernel[(blocks * triton.cdiv(H, n2),)](
        act, w2, y2, sorted_pairs, block_expert, n_pairs, H, I, act.stride(0),
        w2.stride(0), w2.stride(1), w2.stride(2), y2.stride(0), blocks, IEEE=ieee,
        BLOCK_M=m2, BLOCK_N=n2, BLOCK_K=k2, num_warps=nw2, num_stages=st2)


def combine_triton(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    require_triton()
    T, k, H = y.shape
    if y.stride(-1) != 1:
        y = y.contiguous()
    wf = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if T and H:
        BLOCK = 1024 if y.is_cuda else 64
        _combine_kernel[(T, triton.cdiv(H, BLOCK))](y, wf, out, H, k, y.stride(0), y.stride(1), wf.stride(0),
                                                    out.stride(0), BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
