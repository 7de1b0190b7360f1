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

Modules: common (the fixed tiling, refused features), triton_kernels (GPU), cpu, fa3 (the
FlashAttention-3 route on Hopper), paged (the trainer's packed K/V as pages), backward; this
file holds the custom ops, the checks and the public functions.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import fa3
from ..._dispatch import call, check_float, custom_op, use_triton
from ..._triton import require_triton, triton
from . import triton_kernels as kernels_triton
from .backward import _backward_contig, _setup_contig, flash_max_len
from .common import MAX_HEAD_DIM, _reject_unsupported
from .cpu import _attention_cpu
from .paged import _as_pages, _copy_to_pages
from .triton_kernels import _attention_triton


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


_attention_contiguous_op.register_autograd(_backward_contig, setup_context=_setup_contig)


@custom_op("onpolicy::reshape_and_cache", mutates_args=("k_cache", "v_cache"))
def _reshape_and_cache_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    T, H, D = key.shape
    if T == 0:
        return
    if use_triton(key):
        require_triton()
        kernels_triton._cache_kernel[(T,)](
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
