"""Batch-invariant causal attention over a paged KV cache, shared by sampler and trainer.

    attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, causal=True, max_seqlen_q=0,
              out=None, schedule=None) -> out
    attention_schedule(q, k_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q=0) -> shared work or None
    reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)          (in place)
    attention_contiguous(q, k, v, cu_seqlens, scale) -> out                 (autograd)

Shapes (T = packed query tokens of B sequences, D = head size):

* q [T, Hq, D]; sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
  and are the LAST q_len_b positions of that sequence: query i of sequence b
  sits at position seq_lens[b] - q_len_b + i and (causal) sees keys 0..that
  position. A prefill has q_len == seq_len, a decode q_len == 1, a chunk of a
  chunked prefill anything in between.
* k_cache, v_cache [num_blocks, block_size, Hkv, D]: key position p of sequence
  b lives at block block_table[b, p // block_size], row p % block_size. Any
  block size works (vLLM's 16 or more; the kernel looks a block up per key).
* block_table int32 [B, max_blocks]; cu_seqlens_q int32 [B + 1];
  seq_lens int32 [B] (total KV length: context + new queries).
* out [T, Hq, D] in q's dtype. Hkv must divide Hq (grouped-query attention);
  D a multiple of 16 up to 256; float32, float16, bfloat16 (fp32 accumulation).

Guarantee (the reason this kernel exists): an output row's bits depend only on
that query, the keys/values at positions 0..seq_len-1 of its own sequence, its
position and `scale`. Not on the other sequences in the call, their number or
lengths, the row's place in the batch, how many queries of its own sequence
are in the call (prefill, chunked prefill or decode all give the same bits),
the block size or which blocks hold the keys. `attention_contiguous` runs the
very same kernel (the packed K/V viewed as a cache of one-position blocks),
so the trainer's full-sequence forward gives the sampler's bits.

Hopper: causal fp16/bf16 calls with head size 128 run FlashAttention-3's
forward with one KV split instead (attention_fa3.py: faster there, and itself
invariant); the trainer's packed call is paged the same way, so both sides
still share one kernel. `ONPOLICY_ATTENTION=triton` keeps the kernel below.

How: every query runs the same online softmax over FIXED key tiles of
KV_TILE = 64 positions, from position 0 upward; on the GPU in FIXED splits of
KV_SPLIT = 256 positions (the CPU path runs one split). Per tile, with
s = (q . k) * scale * log2(e) masked to -inf where not visible:

    m' = max(m, rowmax(s));  alpha = 1 if m' == m else exp2(m - m')
    p  = exp2(s - m');       l = l * alpha + rowsum(p)
    acc = acc * alpha + round_to_input_dtype(p) @ v;   m = m'

Each split starts from (m, l, acc) = (-inf, 0, 0) and is folded, in split
order, into the running (M, L, ACC) by one fixed formula (`_fold`); out = ACC / L.
Because each split's state depends only on its own keys, the GPU may compute
the splits in one program (prefill, large batches) or in separate programs
folded by a second kernel (decode of few sequences: split-KV), with the same bits.
A tile the query cannot see (beyond its position) leaves m, l and acc
bit-identical (alpha == 1 exactly, p == 0), so running a query alongside later
queries of the same tile changes nothing. GPU (Triton): one program per
64-row query tile of one KV head (rows = query positions x the Hq/Hkv heads of
the group), one fixed tile shape, warp count and stage count for every call,
a decode query padded into the same tile as a prefill (needed: on an H200 a
16- or 32-row query tile gave other bits than the 64-row one, see
benchmarks/bench_attention.py's variants table). CPU: the same loop with
BLAS only on fixed [16 rows] tiles, IEEE elementwise steps, fixed pairwise
trees (row max, row sums) and exp2 on fixed 64-aligned chunks
(kernels/onpolicy_kernels/_cpu.py), so invariant by construction. The two paths are different programs (bits differ between
them); sampler and trainer must run on the same path.

Not supported (a clear error names them): sliding window, logit soft-capping,
ALiBi, attention sinks, dropout, quantized (fp8) caches. Backward (only
`attention_contiguous`): a standard attention's gradient (fast, not invariant:
only the forward must be). On CUDA in fp16/bf16, PyTorch's FlashAttention
varlen kernels on the packed tensors (its forward for the log-sum-exp, then its
backward); elsewhere torch SDPA on length-bucketed padded batches
(`standard_attention`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import fa3
from ..._cpu import ROW_TILE, chunked, next_pow2, round_up
from ..._dispatch import call, check_float, custom_op, use_triton
from ..._triton import HAS_TRITON, num_sms, require_triton, tl, triton

KV_TILE = 64  # key positions per online-softmax step: fixed, part of the bits.
Q_TILE = 64  # query rows (positions x grouped heads) per GPU program: fixed.
KV_SPLIT = 256  # key positions per split (GPU): each split's softmax state starts fresh and
# the splits are folded in order, so the split-KV decode gives the one-pass bits. Fixed.
SPLIT_MAX_ELEMS = 1 << 24  # largest fp32 partial buffer of a split launch (64 MiB)
NUM_WARPS = 4  # fixed too: the same instructions for every call
NUM_STAGES = 2
MAX_HEAD_DIM = 256
MAX_TABLE = 1 << 24  # attention_contiguous: largest block table built without a host sync
LOG2E = 1.4426950408889634
# CPU path: bound the fp32 temporaries ([tokens, Hq, KV_TILE, D]); tokens are
# independent, so the chunking never changes a bit.
CPU_ELEMS = 1 << 22

_UNSUPPORTED = {
    "sliding_window": "sliding-window attention",
    "window_size": "sliding-window attention",
    "softcap": "logit soft-capping",
    "logits_soft_cap": "logit soft-capping",
    "alibi_slopes": "ALiBi",
    "sinks": "attention sinks",
    "dropout_p": "attention dropout",
    "k_scale": "quantized (fp8) KV cache",
    "v_scale": "quantized (fp8) KV cache",
}


def _is_off(name, value) -> bool:
    if value is None or value is False:
        return True
    if name in ("sliding_window", "window_size"):
        vals = value if isinstance(value, (tuple, list)) else (value,)
        return all(v is None or int(v) < 0 for v in vals)
    if name in ("softcap", "logits_soft_cap", "dropout_p"):
        return float(value) == 0.0
    if name in ("k_scale", "v_scale"):
        t = torch.as_tensor(value, dtype=torch.float64)
        return bool((t == 1.0).all())
    return False


def _reject_unsupported(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"attention() got an unexpected keyword argument {name!r}")
        if not _is_off(name, value):
            raise NotImplementedError(
                f"onpolicy attention does not support {_UNSUPPORTED[name]} ({name}={value!r}); "
                "only plain causal (or full) softmax attention is batch-invariant here"
            )


def _qk_scale(scale: float) -> float:
    """scale * log2(e) rounded to fp32 once, the same value on both paths."""
    return float(torch.tensor(float(scale) * LOG2E, dtype=torch.float32))


# ----------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _fold(M, L, ACC, m_s, l_s, acc_s):
        """Fold one KV split's online-softmax state into the running one (fixed formula;
        the single-pass kernel and the split combine both call this, in split order)."""
        M_new = tl.maximum(M, m_s)
        M_use = tl.where(M_new == float("-inf"), 0.0, M_new)
        a = tl.where(M == M_new, 1.0, tl.exp2(M - M_use))
        b = tl.where(m_s == M_new, 1.0, tl.exp2(m_s - M_use))
        L = L * a + l_s * b
        ACC = ACC * a[:, None] + acc_s * b[:, None]
        return M_new, L, ACC

    @triton.jit(do_not_specialize=["num_seqs", "block_size"])
    def _attn_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, cuq_ptr, sl_ptr,
        pm_ptr, pl_ptr, pacc_ptr,
        qk_scale, num_seqs, block_size,
        sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_t, so_h, sbt,
        sp_s, sp_t,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        CAUSAL: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PARTIAL: tl.constexpr,
    ):
        # PARTIAL = False: one program walks every KV split of its query tile and folds
        # them in order. PARTIAL = True: program_id(2) is the split; it stores the
        # split's (m, l, acc) and _combine_kernel folds them in the same order.
        # Last tiles first: in a causal prefill they are the longest, so the
        # tail of the launch is short work (the order never touches the math).
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        kvh = tl.program_id(1)
        # Sequence of this program: the last b with cu[b] * G // BLOCK_M + b <= tile
        # (each sequence owns cu[b+1]*G//BLOCK_M - cu[b]*G//BLOCK_M + 1 >= its
        # number of tiles; programs past a sequence's rows exit).
        lo = num_seqs * 0
        hi = num_seqs + 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            start = tl.load(cuq_ptr + mid) * G // BLOCK_M + mid
            lo = tl.where(start <= tile, mid, lo)
            hi = tl.where(start <= tile, hi, mid)
        b = lo
        q_start = tl.load(cuq_ptr + b)
        q_len = tl.load(cuq_ptr + b + 1) - q_start
        seq_len = tl.load(sl_ptr + b)
        local = tile - (q_start * G // BLOCK_M + b)
        row0 = local * BLOCK_M
        if row0 < q_len * G:
            ctx = seq_len - q_len
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len * G
            pos = rows // G
            head = kvh * G + rows % G
            qpos = ctx + pos
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            tok = (q_start + pos).to(tl.int64)
            if CAUSAL:
                last = tl.minimum(q_len - 1, (row0 + BLOCK_M - 1) // G)
                kv_end = ctx + last + 1
            else:
                kv_end = seq_len
            if PARTIAL:
                s_lo = tl.program_id(2) * SPLIT
                s_hi = tl.minimum(s_lo + SPLIT, kv_end)
            else:
                s_lo = 0
                s_hi = kv_end
            if s_lo < kv_end:
                q = tl.load(q_ptr + tok[:, None] * sq_t + head[:, None].to(tl.int64) * sq_h + d[None, :],
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                M = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                L = tl.zeros((BLOCK_M,), tl.float32)
                ACC = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                cols = tl.arange(0, BLOCK_N)
                for s0 in range(s_lo, s_hi, SPLIT):
                    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                    l_i = tl.zeros((BLOCK_M,), tl.float32)
                    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                    for n0 in range(s0, tl.minimum(s0 + SPLIT, s_hi), BLOCK_N):
                        kpos = n0 + cols
                        kv_ok = kpos < seq_len
                        page = tl.load(bt_ptr + b * sbt + kpos // block_size, mask=kv_ok, other=0).to(tl.int64)
                        off = (kpos % block_size).to(tl.int64)
                        kt = tl.load(k_ptr + page[None, :] * sk_b + off[None, :] * sk_s + kvh * sk_h + d[:, None],
                                     mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
                        if IEEE:
                            s = tl.dot(q, kt, input_precision="ieee")
                        else:
                            s = tl.dot(q, kt)
                        s = s * qk_scale
                        if CAUSAL:
                            visible = kv_ok[None, :] & (kpos[None, :] <= qpos[:, None])
                        else:
                            visible = kv_ok[None, :] & row_ok[:, None]
                        s = tl.where(visible, s, float("-inf"))
                        m_new = tl.maximum(m_i, tl.max(s, 1))
                        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = tl.where(m_new == m_i, 1.0, tl.exp2(m_i - m_use))
                        p = tl.exp2(s - m_use[:, None])
                        l_i = l_i * alpha + tl.sum(p, 1)
                        v = tl.load(v_ptr + page[:, None] * sv_b + off[:, None] * sv_s + kvh * sv_h + d[None, :],
                                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
                        acc = acc * alpha[:, None]
                        if IEEE:
                            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(p.to(v.dtype), v, acc)
                        m_i = m_new
                    if PARTIAL:
                        po = tl.program_id(2).to(tl.int64) * sp_s + tok * sp_t + head.to(tl.int64)
                        tl.store(pm_ptr + po, m_i, mask=row_ok)
                        tl.store(pl_ptr + po, l_i, mask=row_ok)
                        tl.store(pacc_ptr + po[:, None] * BLOCK_D + d[None, :], acc,
                                 mask=row_ok[:, None] & d_ok[None, :])
                    else:
                        M, L, ACC = _fold(M, L, ACC, m_i, l_i, acc)
                if not PARTIAL:
                    l_safe = tl.where(L == 0.0, 1.0, L)
                    out = ACC / l_safe[:, None]
                    tl.store(o_ptr + tok[:, None] * so_t + head[:, None].to(tl.int64) * so_h + d[None, :],
                             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit(do_not_specialize=["num_seqs"])
    def _combine_kernel(o_ptr, cuq_ptr, sl_ptr, pm_ptr, pl_ptr, pacc_ptr, num_seqs, Hq, so_t, so_h, sp_s, sp_t,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                        CAUSAL: tl.constexpr, SPLIT: tl.constexpr):
        # One program per query token (all its heads): fold the token's splits in order
        # with the same _fold as the single-pass kernel.
        t = tl.program_id(0)
        lo = num_seqs * 0
        hi = num_seqs + 0
        while hi - lo > 1:  # the sequence holding token t: the last b with cu[b] <= t
            mid = (lo + hi) // 2
            lo = tl.where(tl.load(cuq_ptr + mid) <= t, mid, lo)
            hi = tl.where(tl.load(cuq_ptr + mid) <= t, hi, mid)
        b = lo
        q_end = tl.load(cuq_ptr + b + 1)
        if t < q_end:  # tokens past the last sequence (padding) belong to none
            seq_len = tl.load(sl_ptr + b)
            if CAUSAL:
                visible = seq_len - (q_end - t) + 1
            else:
                visible = seq_len
            h = tl.arange(0, BLOCK_H)
            h_ok = h < Hq
            d = tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            M = tl.full((BLOCK_H,), float("-inf"), tl.float32)
            L = tl.zeros((BLOCK_H,), tl.float32)
            ACC = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
            for s0 in range(0, visible, SPLIT):
                po = t.to(tl.int64) * sp_t + (s0 // SPLIT) * sp_s + h  # int64 (the buffer is bounded)
                m_s = tl.load(pm_ptr + po, mask=h_ok, other=float("-inf"))
                l_s = tl.load(pl_ptr + po, mask=h_ok, other=0.0)
                acc_s = tl.load(pacc_ptr + po[:, None] * BLOCK_D + d[None, :], mask=h_ok[:, None] & d_ok[None, :],
                                other=0.0)
                M, L, ACC = _fold(M, L, ACC, m_s, l_s, acc_s)
            l_safe = tl.where(L == 0.0, 1.0, L)
            out = ACC / l_safe[:, None]
            tl.store(o_ptr + t.to(tl.int64) * so_t + h[:, None] * so_h + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _cache_kernel(key_ptr, val_ptr, kc_ptr, vc_ptr, slot_ptr, block_size, H,
                      skt, skh, svt, svh, sck_b, sck_s, sck_h, scv_b, scv_s, scv_h,
                      D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < H) & (d[None, :] < D) & ((h[:, None] * 0 + slot) >= 0)
        k = tl.load(key_ptr + t * skt + h[:, None] * skh + d[None, :], mask=mask)
        v = tl.load(val_ptr + t * svt + h[:, None] * svh + d[None, :], mask=mask)
        tl.store(kc_ptr + blk * sck_b + off * sck_s + h[:, None] * sck_h + d[None, :], k, mask=mask)
        tl.store(vc_ptr + blk * scv_b + off * scv_s + h[:, None] * scv_h + d[None, :], v, mask=mask)


def use_split(programs: int, n_split: int, row_elems: int, sms: int) -> bool:
    """The GPU's launch choice, from shapes only (never from lengths on the device, so a
    CUDA graph captured for a batch size fits every replay): split the KV when the one-pass
    launch (`programs` = query tiles x KV heads) would leave at least half the SMs idle, the
    cache has room for more than one split, and the fp32 partials (n_split x rows x D) stay
    small. Either choice gives the same bits."""
    return n_split > 1 and programs * 2 <= sms and n_split * row_elems <= SPLIT_MAX_ELEMS


def _attention_triton(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal, config=None, split=None,
                      out=None):
    """The Triton path. `config` = (Q_TILE, KV_TILE, num_warps, num_stages) overrides the
    fixed launch configuration, for the GPU benchmark's bitwise comparison only.

    `split`: run the KV splits in separate programs and fold them in a second kernel
    (True) or in one program (False); the bits are the same either way (both fold the
    same per-split states with `_fold`, in split order). None picks by shape alone:
    split when the one-pass launch would leave most SMs idle (decode of few sequences).
    `out`: where to write (q's shape and dtype, head dim contiguous); None: a new tensor."""
    require_triton()
    q_tile, kv_tile, warps, stages = config or (Q_TILE, KV_TILE, NUM_WARPS, NUM_STAGES)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    B = seq_lens.shape[0]
    out = q.new_empty(q.shape) if out is None else out  # new: contiguous, like the CPU path and the fake
    if T == 0 or B == 0:
        return out
    tiles = T * G // q_tile + B
    # Splits a sequence can have: from the block table's capacity (shapes only, so a
    # captured CUDA graph holds a grid that fits every replay); programs past a
    # sequence's keys exit at once.
    n_split = -(-block_table.shape[1] * k_cache.shape[1] // KV_SPLIT)
    if split is None:
        split = q.is_cuda and use_split(tiles * Hkv, n_split, T * Hq * D, num_sms(q.device))
    block_d = triton.next_power_of_2(D)
    if split:
        pm = torch.empty((n_split, T, Hq), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty((n_split, T, Hq, block_d), dtype=torch.float32, device=q.device)
        grid = (tiles, Hkv, n_split)
    else:
        pm = pl = pacc = out  # unused
        grid = (tiles, Hkv)
    _attn_kernel[grid](
        q, k_cache, v_cache, out, block_table, cu_q, seq_lens,
        pm, pl, pacc,
        _qk_scale(scale), B, k_cache.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), T * Hq, Hq,
        G=G, HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal),
        IEEE=q.dtype == torch.float32, BLOCK_M=q_tile, BLOCK_N=kv_tile, SPLIT=KV_SPLIT, PARTIAL=bool(split),
        num_warps=warps, num_stages=stages,
    )
    if split:
        _combine_kernel[(T,)](
            out, cu_q, seq_lens, pm, pl, pacc, B, Hq, out.stride(0), out.stride(1), T * Hq, Hq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_H=triton.next_power_of_2(Hq), CAUSAL=bool(causal),
            SPLIT=KV_SPLIT, num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- CPU


def _exp2(x: torch.Tensor) -> torch.Tensor:
    return chunked(torch.exp2, x)


def _tree0(x: torch.Tensor, op, pad: float) -> torch.Tensor:
    """Reduce dim 0 by pairwise halving (element i with i + n/2), padded to a power of two.

    The same fixed tree as `_cpu.tree_sum`, laid out with the reduced axis
    outermost so every step is one long contiguous elementwise op.
    """
    n = x.shape[0]
    w = next_pow2(n)
    if w != n:
        x = torch.cat([x, x.new_full((w - n, *x.shape[1:]), pad)])
    while x.shape[0] > 1:
        h = x.shape[0] // 2
        x = op(x[:h], x[h:])
    return x[0]


def _attention_cpu(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal):
    """The kernel's loop on the CPU: fixed-shape BLAS tiles and elementwise IEEE steps.

    Rows are (query position, head of the group) of one sequence and KV head,
    padded to groups of ROW_TILE = 16. Every product is one BLAS call of one
    fixed shape and layout, [16, D] x [D, KV_TILE] for q.k and [16, KV_TILE] x
    [KV_TILE, D] for p @ v, on fp32 copies (bf16/fp16 products are exact in
    fp32), so a row's bits depend only on that row and the key tile (the rule
    kernels/onpolicy_kernels/_cpu.py's tiled_matmul relies on; the property tests check it).
    All the softmax steps are elementwise or fixed pairwise trees over the
    KV_TILE axis, batched over every row of every sequence. Sequences are
    sorted by their number of key tiles, so at step j the sequences still
    running are a prefix; rows of a sequence that cannot see tile j are masked
    to -inf, which leaves them bit-identical (as in the Triton kernel).
    """
    T, Hq, D = q.shape
    nb, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    N = KV_TILE
    out = q.new_empty(q.shape)
    B = seq_lens.shape[0]
    if T == 0 or B == 0:
        return out
    cu = cu_q.tolist()
    sl = seq_lens.tolist()
    q_lens = [cu[b + 1] - cu[b] for b in range(B)]
    ntiles = [-(-sl[b] // N) if q_lens[b] else 0 for b in range(B)]  # the last query sees them all
    order = sorted((b for b in range(B) if q_lens[b]), key=lambda b: -ntiles[b])
    # Global rows: sequence after sequence (in `order`), each padded to ROW_TILE rows.
    R = [q_lens[b] * G for b in order]
    Rp = [round_up(r, ROW_TILE) for r in R]
    offs = [0]
    for rp in Rp:
        offs.append(offs[-1] + rp)
    Rtot = offs[-1]
    Rp_t = torch.tensor(Rp)
    start = torch.tensor(offs[:-1])
    ridx = torch.arange(Rtot) - torch.repeat_interleave(start, Rp_t)  # row index within its sequence

    def per_row(values):
        return torch.repeat_interleave(torch.tensor(values), Rp_t)

    valid = ridx < per_row(R)
    pos = ridx // G
    tok = torch.where(valid, per_row([cu[b] for b in order]) + pos, -1)
    g_of = ridx % G
    row_ctx = per_row([sl[b] - q_lens[b] for b in order])
    qpos = torch.where(valid, row_ctx + pos, -1)
    row_len = torch.where(valid, per_row([sl[b] for b in order]), 0)
    real = valid
    q4 = q.view(T, Hkv, G, D)
    Q = torch.zeros(Rtot, Hkv, D)
    Q[real] = q4[tok[real], :, g_of[real], :].float()
    Q = Q.permute(1, 0, 2).contiguous()  # [Hkv, Rtot, D]
    k_flat = k_cache.reshape(nb * bs, Hkv, D)
    v_flat = v_cache.reshape(nb * bs, Hkv, D)
    bt = block_table.long()
    max_blocks = bt.shape[1]
    qk_scale = _qk_scale(scale)
    ninf = float("-inf")
    cols = torch.arange(N)
    seq_ids = torch.tensor(order, dtype=torch.long)
    lens_t = torch.tensor([sl[b] for b in order], dtype=torch.long)
    m = torch.full((Hkv, Rtot), ninf)
    l = torch.zeros(Hkv, Rtot)
    acc = torch.zeros(Hkv, Rtot, D)
    S = torch.empty(Hkv, Rtot, N)
    n_act = len(order)
    for j in range(ntiles[order[0]]):
        while ntiles[order[n_act - 1]] <= j:
            n_act -= 1
        R_act = offs[n_act]
        kpos = j * N + cols
        kv_ok = kpos[None, :] < lens_t[:n_act, None]  # [n_act, N]
        blk = (kpos // bs).clamp(max=max_blocks - 1)
        page = torch.where(kv_ok, bt[seq_ids[:n_act, None], blk[None, :]], 0)
        slot = page * bs + kpos % bs
        # Keys past a sequence's end hold anything (even NaN): their scores become
        # -inf below; values are zeroed (0 * NaN would be NaN).
        Kt = k_flat[slot].float().permute(0, 2, 3, 1)  # [n_act, Hkv, D, N] (a view: one fixed layout)
        Vt = torch.where(kv_ok[:, :, None, None], v_flat[slot], 0).float().permute(0, 2, 1, 3)  # [n_act, Hkv, N, D]
        first = []  # per active sequence: the first 16-row group that can see tile j
        for i in range(n_act):
            b = order[i]
            lo = max(0, (j * N - (sl[b] - q_lens[b])) * G) if causal else 0
            first.append(offs[i] + lo // ROW_TILE * ROW_TILE)
            for h in range(Hkv):
                for r0 in range(first[i], offs[i + 1], ROW_TILE):
                    torch.mm(Q[h, r0:r0 + ROW_TILE], Kt[i, h], out=S[h, r0:r0 + ROW_TILE])
        s = S[:, :R_act] * qk_scale
        visible = (kpos[None, :] < row_len[:R_act, None]) & (tok[:R_act, None] >= 0)
        if causal:
            visible &= kpos[None, :] <= qpos[:R_act, None]
            # Rows of a group below `first` were not computed this step: masked out too.
            lo_row = ((j * N - row_ctx[:R_act]).clamp(min=0) * G) // ROW_TILE * ROW_TILE
            visible &= (ridx[:R_act] >= lo_row)[:, None]
        sT = torch.where(visible[None], s, ninf).permute(2, 0, 1).contiguous()  # [N, Hkv, R_act]
        m_old = m[:, :R_act]
        m_new = torch.maximum(m_old, _tree0(sT, torch.maximum, ninf))
        m_use = torch.where(m_new == ninf, 0.0, m_new)
        alpha = torch.where(m_new == m_old, 1.0, _exp2(m_old - m_use))
        pT = _exp2(sT - m_use)  # [N, Hkv, R_act]
        l[:, :R_act] = l[:, :R_act] * alpha + _tree0(pT, torch.add, 0.0)
        P = pT.to(v_cache.dtype).float().permute(1, 2, 0).contiguous()  # rounded like the GPU's p
        PV = torch.zeros(Hkv, R_act, D)
        for i in range(n_act):
            for h in range(Hkv):
                for r0 in range(first[i], offs[i + 1], ROW_TILE):
                    torch.mm(P[h, r0:r0 + ROW_TILE], Vt[i, h], out=PV[h, r0:r0 + ROW_TILE])
        acc[:, :R_act] = acc[:, :R_act] * alpha[..., None] + PV
        m[:, :R_act] = m_new
    o = (acc / l[..., None]).permute(1, 0, 2)  # [Rtot, Hkv, D]
    out.view(T, Hkv, G, D)[tok[real], :, g_of[real], :] = o[real].to(q.dtype)
    return out


# ----------------------------------------------------------------------------- ops


def _on_fa3(q, causal=True) -> bool:
    """The route rule, one place for the sampler's paged and the trainer's packed calls."""
    return use_triton(q) and causal and fa3.use_fa3(q)


def _attention_impl(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal, max_seqlen_q=0, out=None,
                    schedule=None):
    if _on_fa3(q, causal):
        return fa3.paged(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, max_seqlen_q or q.shape[0], out=out,
                         schedule=schedule)
    if use_triton(q):
        return _attention_triton(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal, out=out)
    result = _attention_cpu(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal)
    return result if out is None else out.copy_(result)


@custom_op("onpolicy::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool,
                  max_seqlen_q: int = 0) -> torch.Tensor:
    return _attention_impl(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, causal, max_seqlen_q)


@_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, causal, max_seqlen_q=0):
    return q.new_empty(q.shape)


@custom_op("onpolicy::attention_out", mutates_args=("out",))
def _attention_out_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool,
                      max_seqlen_q: int, out: torch.Tensor, schedule: Optional[torch.Tensor] = None) -> None:
    # The same kernels writing into the caller's buffer (vLLM's attention output): no copy.
    _attention_impl(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, causal, max_seqlen_q, out=out,
                    schedule=schedule)


@_attention_out_op.register_fake
def _(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, causal, max_seqlen_q, out, schedule=None):
    return None


def attention_schedule(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                       cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, max_seqlen_q: int = 0,
                       causal: bool = True) -> Optional[torch.Tensor]:
    """Work shared by every layer's `attention(..., schedule=)` call with these lengths, block
    table and shapes (one step of the vLLM engine: prefill, mixed or decode): FA3's tile schedule
    on the FA3 route (attention_fa3.py: `schedule`), None elsewhere (the Triton and CPU paths
    need none). It never changes a bit."""
    if not _on_fa3(q, causal) or seq_lens.shape[0] == 0:
        return None
    return fa3.schedule(q, k_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q or q.shape[0])


def longest_bound(cu: torch.Tensor, T: int, limit: int) -> int:
    """A bound on the longest of the packed sequences `cu` (T tokens in all): T itself, which
    needs no host sync, while sequences x T <= limit; above it the exact longest (one sync)."""
    if (cu.shape[0] - 1) * T <= limit:
        return T
    return int((cu[1:] - cu[:-1]).max())


def _as_pages(k, v, cu_seqlens):
    """View packed K/V [T, Hkv, D] as a paged cache of ONE-position blocks (no copy, no sync).

    Token t is block t, so sequence b's block-table row is cu[b], cu[b] + 1, ...
    (T wide; entries past its length are never read). The kernel looks up a
    block per key position whatever the block size, so this runs exactly the
    paged code on exactly the same values.
    """
    T = k.shape[0]
    cu = cu_seqlens.long()
    width = max(1, longest_bound(cu, T, MAX_TABLE))  # many long sequences: the widest (syncs)
    block_table = (cu[:-1, None] + torch.arange(width, device=k.device)[None, :]).to(torch.int32)
    return k.unsqueeze(1), v.unsqueeze(1), block_table, (cu[1:] - cu[:-1]).to(torch.int32)


def _copy_to_pages(k, v, cu_seqlens, bsz=16, max_len=0):
    """Packed K/V copied into blocks of `bsz` (one pass over K/V, no sync): the FA3 route's
    layout for the trainer, and for our kernel the same bits as `_as_pages`. `max_len` (a
    bound on the longest sequence; 0: the token count) sets the block table's width."""
    T, Hkv, D = k.shape
    B = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    npages = (lens + bsz - 1) // bsz
    first = torch.cumsum(npages, 0) - npages
    total = T // bsz + B + 1  # >= sum(npages)
    max_blocks = max(1, ((max_len or T) + bsz - 1) // bsz)
    # Entries past a sequence's blocks are never used; clamped so that every id is a block.
    block_table = (first[:, None] + torch.arange(max_blocks, device=k.device)[None, :]).clamp_(max=total - 1)
    block_table = block_table.to(torch.int32)
    tok = torch.arange(T, device=k.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    slot = first[seq] * bsz + tok - cu[seq]
    kc = k.new_zeros(total * bsz, Hkv, D).index_copy_(0, slot, k)
    vc = v.new_zeros(total * bsz, Hkv, D).index_copy_(0, slot, v)
    return kc.view(total, bsz, Hkv, D), vc.view(total, bsz, Hkv, D), block_table, lens.to(torch.int32)


@custom_op("onpolicy::attention_contiguous", mutates_args=())
def _attention_contiguous_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                             scale: float, max_seqlen: int = 0) -> torch.Tensor:
    if _on_fa3(q):  # FA3 reads pages of 16 (attention_fa3.py)
        max_len = max_seqlen or flash_max_len(cu_seqlens, q.shape[0])
        kc, vc, bt, seq_lens = _copy_to_pages(k, v, cu_seqlens, fa3.PAGE, max_len)
        return fa3.paged(q, kc, vc, bt, cu_seqlens, seq_lens, scale, max_len)
    kc, vc, bt, seq_lens = _as_pages(k, v, cu_seqlens)
    return _attention_impl(q, kc, vc, bt, cu_seqlens, seq_lens, scale, True)


@_attention_contiguous_op.register_fake
def _(q, k, v, cu_seqlens, scale, max_seqlen=0):
    return q.new_empty(q.shape)


def standard_attention(q, k, v, cu_seqlens, scale, dtype: Optional[torch.dtype] = None):
    """Standard causal attention of packed sequences (differentiable; NOT invariant).

    torch SDPA (flash on CUDA) on zero-padded batches [n, H, L_max, D] with
    grouped K/V, one call per bucket of sequences of similar length (padding
    at most doubles a bucket's tokens). Exact for causal attention: padding
    sits after each sequence's last token, so no real query sees it and no
    gradient reaches it. Computed in `dtype` (default: q's dtype on CUDA, fp32
    on CPU). The backward of attention_contiguous backpropagates through this.
    """
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    if dtype is None:
        dtype = q.dtype if q.is_cuda else torch.float32
    bounds = cu_seqlens.tolist()
    lens = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    order = sorted((i for i in range(len(lens)) if lens[i] > 0), key=lambda i: -lens[i])
    buckets, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lens[cur[0]] > 2 * (sum(lens[j] for j in cur) + lens[i]):
            buckets.append(cur)
            cur = []
        cur.append(i)
    if cur:
        buckets.append(cur)
    rows, ids = [], []
    for bucket in buckets:
        L = lens[bucket[0]]
        pos = torch.arange(L)
        idx = torch.tensor([bounds[i] for i in bucket])[:, None] + pos[None, :]
        valid = pos[None, :] < torch.tensor([lens[i] for i in bucket])[:, None]
        idx = torch.where(valid, idx, 0).to(q.device)
        valid = valid.to(q.device)
        pad = [torch.where(valid[:, :, None, None], t[idx].to(dtype), 0).transpose(1, 2) for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*pad, is_causal=True, scale=scale, enable_gqa=G > 1)
        rows.append(o.transpose(1, 2)[valid])
        ids.append(idx[valid])
    out = q.new_zeros(T, Hq, D, dtype=dtype)
    if rows:
        out = out.index_copy(0, torch.cat(ids), torch.cat(rows))
    return out


def _setup_contig(ctx, inputs, output):
    q, k, v, cu, scale, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.scale = scale
    ctx.max_seqlen = max_seqlen


def _flash_ok(q: torch.Tensor) -> bool:
    """Whether PyTorch's FlashAttention (varlen, GQA) can take the backward."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and torch.cuda.get_device_capability(q.device)[0] >= 8
            and hasattr(torch.ops.aten, "_flash_attention_backward"))


FLASH_GRID_MAX = 1 << 20  # sequences x tokens up to which the flash backward's grid is sized by T


def flash_max_len(cu: torch.Tensor, T: int) -> int:
    """The max sequence length handed to FlashAttention's varlen kernels: T (blocks past a
    sequence's end exit at once; no sync per layer to stall the backward on the CPU) up to
    FLASH_GRID_MAX sequence-tokens, above it the exact longest length (mostly empty grid)."""
    return longest_bound(cu, T, FLASH_GRID_MAX)


def _flash_backward(q, k, v, cu, scale, g, max_len):
    """d(q, k, v) by FlashAttention's varlen kernels on the packed tensors: its forward
    (for the log-sum-exp its backward needs) then its backward. No padding, no copies."""
    cu = cu.to(torch.int32)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale)
    return torch.ops.aten._flash_attention_backward(
        g.contiguous(), q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused, scale=scale)


def _backward_contig(ctx, g):
    q, k, v, cu = ctx.saved_tensors
    # max_len 1 is left to SDPA: FlashAttention's one-query path regroups heads by the
    # number of sequences and fails with GQA when some sequence is empty.
    max_len = (ctx.max_seqlen or flash_max_len(cu, q.shape[0])) if _flash_ok(q) else 0
    if max_len > 1:
        gq, gk, gv = _flash_backward(q, k, v, cu, ctx.scale, g.to(q.dtype), max_len)
        return gq, gk, gv, None, None, None
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = standard_attention(qd, kd, vd, cu, ctx.scale)
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), g.to(out.dtype))
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None


_attention_contiguous_op.register_autograd(_backward_contig, setup_context=_setup_contig)


@custom_op("onpolicy::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def _reshape_and_cache_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    T, H, D = key.shape
    if T == 0:
        return
    if use_triton(key):
        require_triton()
        _cache_kernel[(T,)](
            key, value, k_cache, v_cache, slot_mapping, k_cache.shape[1], H,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            D=D, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
        )
        return
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    bs = k_cache.shape[1]
    blk, off = slots // bs, slots % bs
    k_cache[blk, off] = key[keep]
    v_cache[blk, off] = value[keep]


@_reshape_and_cache_op.register_fake
def _(key, value, k_cache, v_cache, slot_mapping):
    return None


# ----------------------------------------------------------------------------- checks


def _check_common(q, kk, vv, kname, scale):
    check_float("q", q)
    for name, t in ((kname[0], kk), (kname[1], vv)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}; onpolicy attention needs one dtype "
                            "(quantized KV caches are not supported)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, num_heads, head_size], got shape {tuple(q.shape)}")
    D = q.shape[2]
    if D % 16 or not 16 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head size {D} is not supported: it must be a multiple of 16 in [16, {MAX_HEAD_DIM}]")
    if kk.shape[-1] != D or vv.shape[-1] != D:
        raise ValueError(f"{kname[0]}/{kname[1]} head size ({kk.shape[-1]}, {vv.shape[-1]}) must equal q's ({D})")
    if kk.shape != vv.shape:
        raise ValueError(f"{kname[0]} shape {tuple(kk.shape)} must equal {kname[1]} shape {tuple(vv.shape)}")
    Hq, Hkv = q.shape[1], kk.shape[-2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"num_heads ({Hq}) must be a multiple of num_kv_heads ({Hkv})")
    if q.stride(-1) != 1 or kk.stride(-1) != 1 or vv.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous in the head dim (stride 1)")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite float, got {scale!r}")


def _check_int(name, t, dim, device):
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_values(t: torch.Tensor) -> bool:
    """Whether to check tensor values: CPU tensors in eager mode only (on the GPU a
    check needs a host sync, and under torch.compile it would break the graph)."""
    return not t.is_cuda and not torch.compiler.is_compiling()


def _check_cu(name, cu, T):
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries")
    if not _check_values(cu):
        return
    if int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(f"{name} must start at 0 and end at the number of tokens ({T}), got {cu.tolist()}")
    if cu.shape[0] > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, causal: bool = True,
              max_seqlen_q: int = 0, out: Optional[torch.Tensor] = None, schedule: Optional[torch.Tensor] = None,
              **unsupported) -> torch.Tensor:
    """Batch-invariant paged attention (see the module docstring for shapes and guarantee).

    `max_seqlen_q`: an upper bound on any sequence's query count (vLLM's max_query_len),
    which only sizes the FA3 route's grid (attention_fa3.py); 0 means the token count.
    `out`: a [T, Hq, D] tensor of q's dtype and device, head dim contiguous, to write the
    result into (the same bits) and return; None: a new tensor. `schedule`: from
    `attention_schedule` with the same arguments (vLLM's backend: once per step for all
    layers; only with `out`); None: computed by the call itself where needed.

    Keyword arguments naming features this kernel lacks (sliding_window,
    window_size, softcap, logits_soft_cap, alibi_slopes, sinks, dropout_p,
    k_scale, v_scale) are accepted only when off, and raise NotImplementedError
    naming the feature otherwise.
    """
    _reject_unsupported(unsupported)
    _check_common(q, k_cache, v_cache, ("k_cache", "v_cache"), scale)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [num_blocks, block_size, num_kv_heads, head_size], got {tuple(k_cache.shape)}")
    _check_int("block_table", block_table, 2, q.device)
    _check_int("cu_seqlens_q", cu_seqlens_q, 1, q.device)
    _check_int("seq_lens", seq_lens, 1, q.device)
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1 or block_table.shape[0] < B:
        raise ValueError(f"for B = {B} sequences (seq_lens), cu_seqlens_q needs B + 1 entries "
                         f"(got {cu_seqlens_q.shape[0]}) and block_table >= B rows (got {block_table.shape[0]})")
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0 (0: the token count), got {max_seqlen_q}")
    if _check_values(q) and B:
        q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        if max_seqlen_q and int(q_lens.max()) > max_seqlen_q:
            raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest query count ({int(q_lens.max())}); "
                             "pass an upper bound (vLLM's max_query_len) or 0")
        if bool((q_lens > seq_lens).any()):
            raise ValueError("every sequence needs q_len <= seq_len (queries are the last q_len positions); "
                             f"got q_lens {q_lens.tolist()} and seq_lens {seq_lens.tolist()}")
        bs = k_cache.shape[1]
        need = (seq_lens.long() + bs - 1) // bs
        if int(need.max()) > block_table.shape[1]:
            raise ValueError(f"block_table has {block_table.shape[1]} columns but a sequence of "
                             f"{int(seq_lens.max())} tokens needs {int(need.max())} blocks of {bs}")
        used = torch.arange(block_table.shape[1])[None, :] < need[:, None]
        ids = block_table[:B][used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise ValueError(f"block_table holds block ids outside [0, {k_cache.shape[0]}) for used blocks")
    if schedule is not None and (schedule.dtype != torch.int32 or schedule.dim() != 1
                                 or schedule.device != q.device):
        raise ValueError(f"schedule must be what attention_schedule(...) returned for this call's arguments "
                         f"(a 1-D int32 tensor on {q.device}), got {schedule.dtype} {tuple(schedule.shape)} on "
                         f"{schedule.device}; pass that, or schedule=None")
    if out is None:
        if schedule is not None:
            raise ValueError("schedule= is accepted together with out= only (the vLLM backend's call): "
                             "pass out= as well, or leave schedule=None")
        return _attention_op(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, float(scale), bool(causal),
                             int(max_seqlen_q))
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device} with a contiguous head dim "
                         f"(like q); got {tuple(out.shape)} {out.dtype} on {out.device}, strides {tuple(out.stride())}")
    _attention_out_op(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, float(scale), bool(causal),
                      int(max_seqlen_q), out, schedule)
    return out


def attention_contiguous(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float, max_seqlen: int = 0, **unsupported) -> torch.Tensor:
    """The trainer's layout: q [T, Hq, D], k/v [T, Hkv, D] of packed sequences, causal in each.

    Runs the paged kernel itself, viewing K/V as a cache of one-position blocks
    (no copy), so the result is bitwise `attention(...)` on the same sequences
    however the sampler paged them (on the FA3 route: copied into pages of 16).
    Differentiable: the backward is a standard attention's (FlashAttention varlen
    on CUDA, else SDPA). `max_seqlen`: an upper bound on the longest sequence, known
    to the caller without a sync (the trainer's padded width); it sizes the FA3
    route's and the backward's grids. 0: a bound from the shapes.
    """
    _reject_unsupported(unsupported)
    _check_common(q, k, v, ("k", "v"), scale)
    if k.dim() != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(f"k and v must be [tokens, num_kv_heads, head_size] with q's {q.shape[0]} tokens, "
                         f"got {tuple(k.shape)}")
    _check_int("cu_seqlens", cu_seqlens, 1, q.device)
    _check_cu("cu_seqlens", cu_seqlens, q.shape[0])
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0 (0: a bound from the shapes), got {max_seqlen}")
    if _check_values(cu_seqlens) and max_seqlen and cu_seqlens.shape[0] > 1:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({longest} tokens)")
    return call(_attention_contiguous_op, q, k, v, cu_seqlens, float(scale), int(max_seqlen))


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into the paged caches in place: token t goes to
    block slot_mapping[t] // block_size, row slot_mapping[t] % block_size; a
    negative slot (vLLM's padding, -1) is skipped. A pure copy (no rounding).
    """
    for name, t, c in (("key", key, k_cache), ("value", value, v_cache)):
        if t.dtype != c.dtype:
            raise TypeError(f"{name} is {t.dtype} but its cache is {c.dtype}; quantized (fp8) KV caches are not supported")
        if t.dim() != 3 or c.dim() != 4 or t.shape[1:] != c.shape[2:]:
            raise ValueError(f"{name} {tuple(t.shape)} must be [T, Hkv, D] matching the cache "
                             f"[num_blocks, block_size, Hkv, D] {tuple(c.shape)}")
        if t.device != c.device or slot_mapping.device != c.device:
            raise ValueError("key, value, caches and slot_mapping must be on one device")
        if t.stride(-1) != 1 or c.stride(-1) != 1:
            raise ValueError(f"{name} and its cache must be contiguous in the head dim")
    if key.shape != value.shape or k_cache.shape != v_cache.shape:
        raise ValueError("key/value shapes and k_cache/v_cache shapes must match")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [T] = [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int64 (or int32), got {slot_mapping.dtype}")
    if _check_values(slot_mapping) and slot_mapping.numel():
        cap = k_cache.shape[0] * k_cache.shape[1]
        if int(slot_mapping.max()) >= cap:
            raise ValueError(f"slot_mapping holds a slot >= {cap} (num_blocks * block_size)")
    _reshape_and_cache_op(key, value, k_cache, v_cache, slot_mapping)
