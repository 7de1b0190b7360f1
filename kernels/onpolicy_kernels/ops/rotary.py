"""Batch-invariant rotary position embedding.

    rotary_embedding(positions, q, k, cos_sin_cache, head_size=None, is_neox=True) -> (q', k')

* positions: int [T]; q: [T, Hq, D] or [T, Hq*D]; k: [T, Hk, D] or [T, Hk*D]
  (`head_size` is needed only for the flattened layout); returns new tensors of
  the same shapes (inputs are not modified).
* cos_sin_cache: fp32 [max_position, rot_dim] = cat(cos, sin), from
  `build_cos_sin_cache`. Both the trainer and the sampler must use this cache
  (vLLM's own is rounded to the model dtype; transformers computes its own).
* The first rot_dim dims of each head are rotated (NeoX halves, or GPT-J
  interleaved pairs when is_neox=False); the rest pass through.
* Each output element is (x1*cos - x2*sin) or (x2*cos + x1*sin) in fp32, rounded
  once. It depends only on that token's q/k values and position: never on the
  other tokens in the call; float32, float16, bfloat16.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._cpu import chunked
from .._dispatch import call, check_float, check_same, custom_op, shaped, use_triton
from .._triton import HAS_TRITON, require_triton, tl, triton

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def _inv_freq(rotary_dim: int, base: float, rope_scaling: Optional[dict]) -> torch.Tensor:
    inv = 1.0 / (float(base) ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu") / rotary_dim))
    rtype = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default")) or "default"
    if rtype == "default":
        return inv
    if rtype == "llama3":
        f = float(rope_scaling["factor"])
        lo = float(rope_scaling.get("low_freq_factor", 1.0))
        hi = float(rope_scaling.get("high_freq_factor", 4.0))
        old = float(rope_scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
    raise NotImplementedError(
        f"rope type {rtype!r} is not supported by onpolicy; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def build_cos_sin_cache(head_dim: int, rotary_dim: int, max_position: int, base: float,
                        rope_scaling: Optional[dict] = None) -> torch.Tensor:
    """fp32 [max_position, rotary_dim] = cat(cos, sin), computed in float64 on the CPU.

    Deterministic: the same arguments give the same bits in every process
    (cos/sin run on fixed chunks), so sampler and trainer can each build it.
    """
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
    inv = _inv_freq(rotary_dim, base, rope_scaling)
    freqs = torch.arange(max_position, dtype=torch.float64, device="cpu")[:, None] * inv[None, :]
    return torch.cat([chunked(torch.cos, freqs), chunked(torch.sin, freqs)], dim=-1).float()


if HAS_TRITON:

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, t, pos, h, H, D, sxt, sxh, sot, soh, cache_ptr, scache,
                      ROT_HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
        # Heads `h` of token t: each element (x1*cos - x2*sin) or (x2*cos + x1*sin) in fp32,
        # rounded once; the same instructions for q and k heads.
        r = tl.arange(0, BLOCK_R)
        rmask = r < ROT_HALF
        cos = tl.load(cache_ptr + pos * scache + r, mask=rmask, other=0.0)
        sin = tl.load(cache_ptr + pos * scache + ROT_HALF + r, mask=rmask, other=0.0)
        if INVERSE:  # the backward: rotate by -angle
            sin = -sin
        if IS_NEOX:
            i1 = r
            i2 = r + ROT_HALF
        else:
            i1 = 2 * r
            i2 = 2 * r + 1
        m = (h[:, None] < H) & rmask[None, :]
        xb = x_ptr + t * sxt + h[:, None] * sxh
        ob = o_ptr + t * sot + h[:, None] * soh
        x1 = tl.load(xb + i1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xb + i2[None, :], mask=m, other=0.0).to(tl.float32)
        o1 = x1 * cos[None, :] - x2 * sin[None, :]
        o2 = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(ob + i1[None, :], o1.to(o_ptr.dtype.element_ty), mask=m)
        tl.store(ob + i2[None, :], o2.to(o_ptr.dtype.element_ty), mask=m)
        # pass-through dims beyond the rotary part
        d = 2 * ROT_HALF + tl.arange(0, BLOCK_D)
        pm = (h[:, None] < H) & (d[None, :] < D)
        tl.store(ob + d[None, :], tl.load(xb + d[None, :], mask=pm, other=0.0), mask=pm)

    @triton.jit
    def _rotary_kernel(q_ptr, qo_ptr, k_ptr, ko_ptr, pos_ptr, cache_ptr, Hq, Hk, D, NQB,
                       sqt, sqh, sqot, sqoh, skt, skh, skot, skoh, scache,
                       ROT_HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INVERSE: tl.constexpr):
        # q and k in ONE launch (a decode step runs this once per layer): programs
        # (t, 0..NQB-1) take BLOCK_H q heads each, the rest BLOCK_H k heads each.
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        hb = tl.program_id(1)
        if hb < NQB:
            _rotate_heads(q_ptr, qo_ptr, t, pos, hb * BLOCK_H + tl.arange(0, BLOCK_H), Hq, D, sqt, sqh, sqot, sqoh,
                          cache_ptr, scache, ROT_HALF, IS_NEOX, BLOCK_R, BLOCK_D, INVERSE)
        else:
            _rotate_heads(k_ptr, ko_ptr, t, pos, (hb - NQB) * BLOCK_H + tl.arange(0, BLOCK_H), Hk, D,
                          skt, skh, skot, skoh, cache_ptr, scache, ROT_HALF, IS_NEOX, BLOCK_R, BLOCK_D, INVERSE)


def _rotate_triton(positions, q, k, cache, is_neox, inverse=False):
    """(q', k') on the GPU in one launch; every element's arithmetic is the same whichever
    tensor, token or head it belongs to."""
    require_triton()
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernel addresses a head's dims with stride 1
    k = k if k.stride(-1) == 1 else k.contiguous()
    cache = cache.contiguous()
    T, Hq, D = q.shape
    Hk = k.shape[1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if T:
        half = cache.shape[1] // 2
        BLOCK_H = min(16, triton.next_power_of_2(max(Hq, Hk)))  # several heads per program: memory-bound
        nqb = triton.cdiv(Hq, BLOCK_H)
        _rotary_kernel[(T, nqb + triton.cdiv(Hk, BLOCK_H))](
            q, qo, k, ko, positions, cache, Hq, Hk, D, nqb,
            q.stride(0), q.stride(1), qo.stride(0), qo.stride(1), k.stride(0), k.stride(1), ko.stride(0), ko.stride(1),
            cache.stride(0), ROT_HALF=half, IS_NEOX=is_neox, BLOCK_H=BLOCK_H, BLOCK_R=triton.next_power_of_2(half),
            BLOCK_D=max(16, triton.next_power_of_2(max(D - 2 * half, 1))), INVERSE=inverse, num_warps=4,
        )
    return qo, ko


def _halves(x, rot, is_neox):
    if is_neox:
        return x[..., : rot // 2], x[..., rot // 2 : rot]
    return x[..., 0:rot:2], x[..., 1:rot:2]


def _rotate_cpu(positions, x, cache, is_neox, inverse=False):
    rot = cache.shape[1]
    cs = cache[positions.long()]
    cos = cs[:, None, : rot // 2]
    sin = cs[:, None, rot // 2 :]
    if inverse:
        sin = -sin
    x1, x2 = _halves(x.float(), rot, is_neox)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    out = x.float().clone()
    if is_neox:
        out[..., : rot // 2] = o1
        out[..., rot // 2 : rot] = o2
    else:
        out[..., 0:rot:2] = o1
        out[..., 1:rot:2] = o2
    return out.to(x.dtype).contiguous()


def _rotate(positions, q, k, cache, is_neox, inverse=False):
    if use_triton(q):
        return _rotate_triton(positions, q, k, cache, is_neox, inverse)
    return _rotate_cpu(positions, q, cache, is_neox, inverse), _rotate_cpu(positions, k, cache, is_neox, inverse)


@custom_op("onpolicy::rotary_embedding", mutates_args=())
def _rotary_op(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: torch.Tensor,
               is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Value check inside the op (it runs eagerly, also under torch.compile); skipped
    # on the GPU, where it would cost a host sync.
    if positions.numel() and not positions.is_cuda:
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cache.shape[0]:
            raise ValueError(f"positions must lie in [0, {cache.shape[0]}) (the cache's positions); got {lo}..{hi}")
    return _rotate(positions, q, k, cache, is_neox)


@_rotary_op.register_fake
def _(positions, q, k, cache, is_neox):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup(ctx, inputs, output):
    positions, _, _, cache, is_neox = inputs
    ctx.save_for_backward(positions, cache)
    ctx.is_neox = is_neox


def _backward(ctx, gq, gk):
    positions, cache = ctx.saved_tensors
    # The rotation is orthogonal: its gradient is the inverse rotation.
    gq, gk = _rotate(positions, gq, gk, cache, ctx.is_neox, inverse=True)
    return None, gq, gk, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_size: Optional[int] = None, is_neox: bool = True):
    """Rotate q and k by their positions (see module docstring); returns (q', k')."""
    check_float("q", q)
    check_same("q", q, "k", k)
    check_same("q", q, "cos_sin_cache", cos_sin_cache, dtype=False)
    check_same("q", q, "positions", positions, dtype=False)
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.dim() != 2:
        raise TypeError("cos_sin_cache must be the fp32 [max_position, rot_dim] tensor from build_cos_sin_cache")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    T = positions.shape[0]

    def as3(x, name):
        if x.dim() == 3:
            return x
        if x.dim() == 2 and head_size:
            if x.shape[1] % head_size:
                raise ValueError(f"{name} width {x.shape[1]} is not a multiple of head_size {head_size}")
            return x.view(x.shape[0], -1, head_size)
        raise ValueError(f"{name} must be [T, H, D], or [T, H*D] with head_size given; got {tuple(x.shape)}")

    q3, k3 = as3(q, "q"), as3(k, "k")
    if q3.shape[0] != T or k3.shape[0] != T:
        raise ValueError(f"q/k have {q3.shape[0]}/{k3.shape[0]} tokens but positions has {T}")
    if q3.shape[-1] != k3.shape[-1] or cos_sin_cache.shape[1] > q3.shape[-1]:
        raise ValueError("q and k must share a head size no smaller than the cache's rotary dim")
    qo, ko = call(_rotary_op, positions, q3, k3, cos_sin_cache, bool(is_neox))
    return shaped(qo, q.shape), shaped(ko, k.shape)
