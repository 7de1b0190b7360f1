"""FlashAttention-3's forward (vLLM's build) as the invariant attention on Hopper.

    use_fa3(q) -> bool                      whether `attention` routes this call to FA3
    paged(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, scale, max_seqlen_q, out=None,
          schedule=None) -> out
    schedule(q, k_cache, block_table, cu_seqlens_q, seq_lens, max_seqlen_q) -> FA3's tile schedule

Why: on Hopper FA3 is faster than our Triton kernel, and with `num_splits=1`
(no KV split) it is itself batch-invariant. Measured on an H200 and re-proved by
tests/gpu/test_attention_gpu.py (every property there runs for both routes):
with paged KV, causal, head size 128, an output row's bits do not depend on the
other sequences in the call, on the row's place, on prefill vs chunked prefill
vs decode, or on which blocks hold the keys. Issue 12 allows sharing FA3 on both
sides on Hopper; `attention` (the sampler's paged call) and
`attention_contiguous` (the trainer's packed call, copied into pages of
PAGE = 16 positions) both come here, so they stay bitwise equal.

When (`use_fa3`, decided from the call's shapes and the machine alone, so the
sampler and the trainer decide alike): a CUDA device of compute capability 9.x,
fp16/bf16, head size in HEAD_SIZES, and vLLM's FA3 importable
(`vllm.vllm_flash_attn`, present wherever vLLM is installed for CUDA). Other head
sizes stay on Triton: FA3 treats a one-query call as non-causal there, which
changes its KV tiling and so a decode's bits. Everything else (the CPU, other
GPUs, fp32) runs the Triton / CPU kernels of `attention.py`.

`ONPOLICY_ATTENTION` = auto (default: as above) | triton (never FA3) | fa3 (FA3
or a clear error). Sampler and trainer must see the same value and, on the FA3
route, import the same vLLM build (its FA3 kernels are part of the bits). A call
that belongs on the FA3 route in a process that cannot import vLLM's FA3 (a
trainer without vLLM on a Hopper GPU) raises, naming both fixes, rather than
switching to Triton silently. FA3 has no
backward here; the trainer's backward is unchanged (attention.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ... import envs

MODES = ("auto", "triton", "fa3")
HEAD_SIZES = (128,)  # sizes whose one-query (decode) calls keep FA3's causal KV tiling
PAGE = 16  # positions per block when the trainer's packed K/V is paged for FA3
MAX_PAGE = 64  # larger blocks are handed to FA3 as sub-blocks of this size (see small_pages)


def mode() -> str:
    return envs.ONPOLICY_ATTENTION


@functools.lru_cache(maxsize=None)
def _fa3() -> tuple[Optional[Callable], str]:
    """(vLLM's flash_attn_varlen_func, "") or (None, why it is unavailable)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func, is_fa_version_supported
    except Exception as e:  # not installed, a CPU build, or an extension that fails to load
        return None, f"vllm.vllm_flash_attn cannot be imported ({type(e).__name__}: {e})"
    if not is_fa_version_supported(3):
        return None, "vLLM's build has no FlashAttention-3 for this GPU"
    return flash_attn_varlen_func, ""


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _call_reason(q: torch.Tensor) -> str:
    """Why this call is not one for FA3 ("" if it is): device, dtype and head size only."""
    if not q.is_cuda:
        return "q is not on a CUDA device"
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    major, minor = _capability(index)
    if major != 9:
        return f"FA3 needs a Hopper GPU (compute capability 9.x), this one is {major}.{minor}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA3 runs fp16/bf16, q is {q.dtype}"
    if q.shape[-1] not in HEAD_SIZES:
        return f"head size {q.shape[-1]} is not one of {HEAD_SIZES} (FA3's decode tiling differs there)"
    return ""


def unsupported(q: torch.Tensor) -> str:
    """Why FA3 cannot take this call ("" if it can)."""
    return _call_reason(q) or _fa3()[1]


def use_fa3(q: torch.Tensor) -> bool:
    """Whether this call runs on FA3. A call that belongs on the FA3 route (Hopper, fp16/bf16,
    head size 128) in a process that cannot import vLLM's FA3 is an error, not a silent
    switch to Triton: the vLLM sampler would run FA3 there and the bits would differ."""
    m = mode()
    if m == "triton":
        return False
    why = _call_reason(q)
    if why:
        if m == "fa3":
            raise RuntimeError(f"ONPOLICY_ATTENTION=fa3 but {why}; unset ONPOLICY_ATTENTION (auto) or set it to "
                               "triton, on the sampler and the trainer alike")
        return False
    missing = _fa3()[1]
    if missing:
        raise RuntimeError(
            f"this attention call belongs on onpolicy's FA3 route (Hopper, {q.dtype}, head size {q.shape[-1]}), "
            f"where the vLLM sampler runs FlashAttention-3, but {missing}. Install the sampler's vLLM (the same "
            "build) in this process, or set ONPOLICY_ATTENTION=triton for the sampler and the trainer alike")
    return True


def paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seqlen_q: int,
          out: Optional[torch.Tensor] = None, schedule: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FA3 over a paged cache, one KV split (num_splits=1): the invariant forward.

    Same layout and meaning as `attention.attention`. `max_seqlen_q` only sizes FA3's grid
    (an upper bound is fine); FA3 reads each sequence's KV length from `seq_lens` and
    sizes nothing by it, so a captured CUDA graph fits every replay. `out`: where to write
    (q's shape and dtype); None: a new tensor. `schedule`: `schedule(...)` of these very
    arguments (the vLLM backend computes it once per step for all layers); None: FA3
    computes it in this call (one more small kernel)."""
    fn, why = _fa3()
    if fn is None:
        raise RuntimeError(why)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out
    # FA3 wants exactly one table row per sequence (our kernel accepts more).
    k_cache, v_cache, block_table = small_pages(k_cache, v_cache, block_table[: seq_lens.shape[0]])
    fn(q, k_cache, v_cache, max_seqlen_q=max(1, int(max_seqlen_q)), cu_seqlens_q=cu_seqlens_q,
       max_seqlen_k=block_table.shape[1] * k_cache.shape[1], seqused_k=seq_lens, softmax_scale=scale,
       causal=True, block_table=block_table, out=out, num_splits=1, fa_version=3, scheduler_metadata=schedule)
    return out


def schedule(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
             seq_lens: torch.Tensor, max_seqlen_q: int) -> torch.Tensor:
    """FA3's tile schedule for `paged` calls with these arguments (any layer's: they share the
    lengths, the block table and the shapes), computed on the device without a host sync.

    Why: without it every FA3 call first runs a small kernel that computes it; a decode
    step of a 28-layer model then runs 28 of them where one would do (vLLM's own FA3
    backend computes it once per step too). The bits do not change: the schedule only
    assigns (query tile, head) work items to CTAs, and with one KV split each row is
    still one CTA's walk over its keys (tests/gpu/test_attention_gpu.py checks it)."""
    from vllm.vllm_flash_attn import get_scheduler_metadata

    split = _sub_blocks(k_cache.shape[1])  # the pages `paged` hands FA3 (small_pages), from the shapes alone
    page = k_cache.shape[1] // split
    return get_scheduler_metadata(
        seq_lens.shape[0], max(1, int(max_seqlen_q)), block_table.shape[1] * split * page, q.shape[1],
        k_cache.shape[2], q.shape[2], seq_lens, qkv_dtype=q.dtype, cu_seqlens_q=cu_seqlens_q, page_size=page,
        causal=True, num_splits=1)


def _sub_blocks(bs: int) -> int:
    """How many FA3 pages one KV block of `bs` positions becomes: 1 up to MAX_PAGE, else
    bs / MAX_PAGE (see small_pages), which must then be whole."""
    if bs <= MAX_PAGE:
        return 1
    if bs % MAX_PAGE:
        raise ValueError(f"KV block size {bs} is not a multiple of {MAX_PAGE}; use one that is (vLLM's "
                         "default 16 is), or set ONPOLICY_ATTENTION=triton on the sampler and the trainer")
    return bs // MAX_PAGE


def small_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor):
    """Blocks of more than MAX_PAGE positions (vLLM's --block-size 128, 256...) as sub-blocks
    of MAX_PAGE: views of the same memory and a block table with one entry per sub-block.

    Why: FA3 loads pages whose size is a multiple of its 128-key tile by TMA in a prefill and
    gathers them in a decode; measured on an H200, a 2000-token prefill in blocks of 128 then
    gave other bits than its decodes and the trainer (and NaN from rows past the sequence's
    end, which the gather path zero-fills). Pages of 16-64 gave the same bits everywhere."""
    bs = k_cache.shape[1]
    split = _sub_blocks(bs)
    if split == 1:
        return k_cache, v_cache, block_table
    nb, _, H, D = k_cache.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(0) != bs * c.stride(1):
            raise ValueError(f"{name} strides {tuple(c.stride())}: its blocks of {bs} positions are not laid out "
                             f"position after position, so they cannot be viewed as sub-blocks of {MAX_PAGE}; "
                             "use blocks of 64 or fewer positions, or ONPOLICY_ATTENTION=triton on both sides")
    k_cache = k_cache.view(nb * split, MAX_PAGE, H, D)  # a view: raises rather than copy the cache
    v_cache = v_cache.view(nb * split, MAX_PAGE, H, D)
    sub = torch.arange(split, dtype=block_table.dtype, device=block_table.device)
    block_table = (block_table[:, :, None] * split + sub).flatten(1)
    return k_cache, v_cache, block_table
