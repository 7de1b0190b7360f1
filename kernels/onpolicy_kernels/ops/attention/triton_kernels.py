"""The attention's Triton kernels (GPU): one pass, or fixed KV splits folded in order (the same bits)."""
from __future__ import annotations


import torch

from ..._triton import HAS_TRITON, num_sms, require_triton, tl, triton
from .common import KV_SPLIT, KV_TILE, NUM_STAGES, NUM_WARPS, Q_TILE, SPLIT_MAX_ELEMS, _qk_scale


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
