"""The attention on the CPU: the same fixed KV tiles and fold order in fp32 torch ops."""
from __future__ import annotations


import torch

from ..._cpu import ATTN_ROW_TILE, chunked, next_pow2, round_up
from .common import KV_TILE, _qk_scale


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


class _Plan:
    """What a call's metadata fixes, whatever the layer: the row layout and, per key tile, the rows,
    the cache slots and the visibility mask. Every layer of a model step attends with the same
    metadata, so the plan is built once per step (see _plan) -- only index bookkeeping, no arithmetic
    on q, k or v, so it cannot change any bits."""

    def __init__(self, cu_q, seq_lens, block_table, T, G, bs, causal):
        N = KV_TILE
        B = seq_lens.shape[0]
        cu = cu_q.tolist()
        sl = seq_lens.tolist()
        q_lens = [cu[b + 1] - cu[b] for b in range(B)]
        ntiles = [-(-sl[b] // N) if q_lens[b] else 0 for b in range(B)]  # the last query sees them all
        order = sorted((b for b in range(B) if q_lens[b]), key=lambda b: -ntiles[b])
        self.empty = not order
        if self.empty:
            return
        # Global rows: sequence after sequence (in `order`), each padded to ATTN_ROW_TILE rows.
        R = [q_lens[b] * G for b in order]
        Rp = [round_up(r, ATTN_ROW_TILE) for r in R]
        offs = [0]
        for rp in Rp:
            offs.append(offs[-1] + rp)
        self.Rtot = Rtot = offs[-1]
        Rp_t = torch.tensor(Rp)
        ridx = torch.arange(Rtot) - torch.repeat_interleave(torch.tensor(offs[:-1]), Rp_t)  # row in its sequence

        def per_row(values):
            return torch.repeat_interleave(torch.tensor(values), Rp_t)

        valid = ridx < per_row(R)
        pos = ridx // G
        tok = torch.where(valid, per_row([cu[b] for b in order]) + pos, -1)
        row_ctx = per_row([sl[b] - q_lens[b] for b in order])
        qpos = torch.where(valid, row_ctx + pos, -1)
        row_len = torch.where(valid, per_row([sl[b] for b in order]), 0)
        self.real = valid.nonzero().squeeze(1)  # the rows that hold a query (the rest are padding)
        self.tok = tok[self.real]
        self.grp = (ridx % G)[self.real]
        grp_seq = torch.repeat_interleave(torch.arange(len(order)), torch.tensor(Rp) // ATTN_ROW_TILE)  # group -> i
        bt = block_table.long()
        max_blocks = bt.shape[1]
        cols = torch.arange(N)
        seq_ids = torch.tensor(order, dtype=torch.long)
        lens_t = torch.tensor([sl[b] for b in order], dtype=torch.long)
        self.tiles = []
        n_act = len(order)
        for j in range(ntiles[order[0]]):
            while ntiles[order[n_act - 1]] <= j:
                n_act -= 1
            R_act = offs[n_act]
            ng = R_act // ATTN_ROW_TILE
            kpos = j * N + cols
            kv_ok = kpos[None, :] < lens_t[:n_act, None]  # [n_act, N]
            blk = (kpos // bs).clamp(max=max_blocks - 1)
            page = torch.where(kv_ok, bt[seq_ids[:n_act, None], blk[None, :]], 0)
            slot = page * bs + kpos % bs
            g = grp_seq[:ng]  # each row group's sequence
            visible = (kpos[None, :] < row_len[:R_act, None]) & (tok[:R_act, None] >= 0)
            if causal:
                visible &= kpos[None, :] <= qpos[:R_act, None]
                # Row groups that cannot see tile j yet (computed with the others): masked out too.
                lo_row = ((j * N - row_ctx[:R_act]).clamp(min=0) * G) // ATTN_ROW_TILE * ATTN_ROW_TILE
                visible &= (ridx[:R_act] >= lo_row)[:, None]
            self.tiles.append((R_act, ng, slot[g], (~kv_ok[g]).view(-1).nonzero().squeeze(1), visible[None]))


_last_plan: list = []  # [(key tensors, shapes, plan)]: the previous call's plan


def _plan(cu_q, seq_lens, block_table, T, G, bs, causal) -> _Plan:
    """The plan of these metadata: the previous call's when its metadata are equal (the next layer of
    the same step), compared by value -- never by identity, which a new step's tensors may reuse."""
    shapes = (T, G, bs, causal, tuple(cu_q.shape), tuple(seq_lens.shape), tuple(block_table.shape))
    if _last_plan:
        (c, s, b), sh, plan = _last_plan[0]
        if sh == shapes and torch.equal(c, cu_q) and torch.equal(s, seq_lens) and torch.equal(b, block_table):
            return plan
    plan = _Plan(cu_q, seq_lens, block_table, T, G, bs, causal)
    _last_plan[:] = [((cu_q.clone(), seq_lens.clone(), block_table.clone()), shapes, plan)]
    return plan


def _attention_cpu(q, k_cache, v_cache, block_table, cu_q, seq_lens, scale, causal):
    """The kernel's loop on the CPU: fixed-shape BLAS tiles and elementwise IEEE steps.

    Rows are (query position, head of the group) of one sequence and KV head,
    padded to groups of ATTN_ROW_TILE = 16. Every product is one item of one
    batched BLAS product over the row groups, each item of one fixed shape and
    layout, [16, D] x [D, KV_TILE] for q.k and [16, KV_TILE] x [KV_TILE, D] for
    p @ v, on fp32 copies (bf16/fp16 products are exact in fp32), so a row's bits
    depend only on that row and the key tile (the rule kernels/onpolicy_kernels/_cpu.py's
    tiled_matmul relies on, plus: an item's bits do not depend on how many items
    share the call; tests/kernels/test_attention.py checks both).
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
    if T == 0 or seq_lens.shape[0] == 0:
        return out
    plan = _plan(cu_q, seq_lens, block_table, T, G, bs, causal)
    if plan.empty:
        return out
    Rtot = plan.Rtot
    q4 = q.view(T, Hkv, G, D)
    Q = torch.zeros(Rtot, Hkv, D)
    Q.index_copy_(0, plan.real, q4[plan.tok, :, plan.grp, :].float())
    Q = Q.permute(1, 0, 2).contiguous()  # [Hkv, Rtot, D]
    Qg = Q.view(Hkv, Rtot // ATTN_ROW_TILE, ATTN_ROW_TILE, D)  # row groups
    k_flat = k_cache.reshape(nb * bs, Hkv, D)
    v_flat = v_cache.reshape(nb * bs, Hkv, D)
    qk_scale = _qk_scale(scale)
    ninf = float("-inf")
    m = torch.full((Hkv, Rtot), ninf)
    l = torch.zeros(Hkv, Rtot)
    acc = torch.zeros(Hkv, Rtot, D)
    # fp32 tiles of K and V, gathered and converted in one copy each, for the most row groups a tile has
    # (the first's: every sequence still runs); a later tile uses a contiguous prefix
    kbuf, vbuf = torch.empty(2, Hkv * plan.tiles[0][1] * N * D)
    for R_act, ng, slot, kv_bad, visible in plan.tiles:
        # Every row group of the active sequences against its sequence's key tile: one batched product
        # of [16, D] x [D, N] items in one fixed layout (an item's bits do not depend on the batch; the
        # keys are held as [N, D] rows, the product takes their transpose). Keys past a sequence's end
        # hold anything (even NaN): their scores become -inf below; values are zeroed (0 * NaN would be NaN).
        size = Hkv * ng * N * D
        Kg = kbuf[:size].view(Hkv, ng, N, D).copy_(k_flat[slot].permute(2, 0, 1, 3))
        S_act = torch.matmul(Qg[:, :ng], Kg.transpose(-1, -2))  # [Hkv, ng, 16, N]
        s = S_act.view(Hkv, R_act, N) * qk_scale
        sT = torch.where(visible, s, ninf).permute(2, 0, 1).contiguous()  # [N, Hkv, R_act]
        m_old = m[:, :R_act]
        m_new = torch.maximum(m_old, _tree0(sT, torch.maximum, ninf))
        m_use = torch.where(m_new == ninf, 0.0, m_new)
        alpha = torch.where(m_new == m_old, 1.0, _exp2(m_old - m_use))
        pT = _exp2(sT - m_use)  # [N, Hkv, R_act]
        l[:, :R_act] = l[:, :R_act] * alpha + _tree0(pT, torch.add, 0.0)
        P = pT.to(v_cache.dtype).float().permute(1, 2, 0).contiguous()  # rounded like the GPU's p
        V = v_flat[slot]  # [ng, N, Hkv, D]
        V.view(ng * N, Hkv, D).index_fill_(0, kv_bad, 0)
        Vg = vbuf[:size].view(Hkv, ng, N, D).copy_(V.permute(2, 0, 1, 3))
        PV = torch.matmul(P.view(Hkv, ng, ATTN_ROW_TILE, N), Vg).view(Hkv, R_act, D)
        acc[:, :R_act] = acc[:, :R_act] * alpha[..., None] + PV
        m[:, :R_act] = m_new
    o = (acc / l[..., None]).permute(1, 0, 2)  # [Rtot, Hkv, D]
    out.view(T, Hkv, G, D)[plan.tok, :, plan.grp, :] = o[plan.real].to(q.dtype)
    return out
