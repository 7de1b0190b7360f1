"""The trainer's contiguous (packed) K/V as the sampler's paged layout, so both run one kernel."""
from __future__ import annotations

import torch

MAX_TABLE = 1 << 24  # attention_contiguous: largest block table built without a host sync


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
