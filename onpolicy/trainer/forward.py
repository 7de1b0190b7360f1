"""The patched forward of a transformers decoder, on onpolicy's kernels.

It mirrors how vLLM runs the same model, op for op, so every activation has the
same bits on both sides: tokens are packed into one [T, hidden] stream (padding
removed, like vLLM's flattened batch), every layer is

    x, residual = rms_norm(h) | fused_add_rms_norm(h, residual)
    q, k, v     = linear(x, Wq|Wk|Wv) [-> q/k rms_norm per head] -> rotary
    a           = attention (one paged kernel for prefill, decode and training)
    x, residual = fused_add_rms_norm(linear(a, Wo), residual)
    h           = linear(silu_and_mul(linear(x, Wgate) | linear(x, Wup)), Wdown)

and the final norm is fused with the last residual. Only views, splits and
copies happen between the kernels, so no other rounding can creep in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import onpolicy_kernels as K

PAGE = 16  # page size used to view contiguous K/V as a paged cache (decode with an HF cache)


@dataclass
class TokenPlan:
    """How a [B, L] batch maps to the packed token stream."""

    B: int
    L: int
    idx: torch.Tensor  # [T] flat indices (into B*L) of the real tokens, in order
    positions: torch.Tensor  # [T] rotary positions
    cu_seqlens: torch.Tensor  # int32 [S+1] packed sequence boundaries
    past_len: int = 0
    cache: object = None
    tap: Optional[Callable[[str, torch.Tensor], None]] = None  # `onpolicy check` records activations here

    def record(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.tap is not None:
            self.tap(name, t)
        return t


def plan_tokens(B: int, L: int, attention_mask, position_ids, past_len: int, device) -> TokenPlan:
    """Find the real tokens, their positions and sequence boundaries.

    * attention_mask [B, L] (1 = token, 0 = padding; left or right padding):
      positions count real tokens only (cumsum - 1), as vLLM numbers them.
    * position_ids [1, L] restarting at 0 (packed sequences, transformers'
      flattening convention): each restart begins a sequence.
    * neither: every row is one sequence at positions past_len .. past_len+L-1.
    """
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError("onpolicy's patched forward takes a 2-D [batch, seq] attention_mask, not a prepared mask dict")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [batch, seq] (1 = token, 0 = pad); got {attention_mask.dim()}-D")
    ar = torch.arange(L, device=device)
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        if past_len:
            raise NotImplementedError("onpolicy's patched forward supports a KV cache only for unpadded batches")
        valid = attention_mask.bool()
        counts = valid.sum(1)
        first = torch.where(counts > 0, valid.float().argmax(1), torch.zeros_like(counts))
        inside = (ar[None] >= first[:, None]) & (ar[None] < (first + counts)[:, None])
        contiguous = (valid & inside).sum(1) == counts
        if not bool(contiguous.all()):
            raise ValueError("each attention_mask row must hold one contiguous run of tokens (left or right padding)")
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        if position_ids is not None:
            pos = position_ids.expand(B, L)
        idx = valid.reshape(-1).nonzero().squeeze(1)
        nz = counts[counts > 0].to(torch.int32)
        cu = torch.zeros(nz.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = nz.cumsum(0)
        return TokenPlan(B, L, idx, pos.reshape(-1)[idx], cu)
    idx = torch.arange(B * L, device=device)
    if position_ids is not None:
        pos = position_ids.expand(B, L).reshape(-1)
        if B == 1 and past_len == 0:
            starts = (pos == 0).nonzero().squeeze(1).tolist()
            if not starts or starts[0] != 0:
                raise ValueError("packed position_ids must start each sequence at 0")
            bounds = starts + [L]
            if any(not torch.equal(pos[a:b], torch.arange(b - a, device=device)) for a, b in zip(bounds, bounds[1:])):
                raise ValueError("packed position_ids must count 0, 1, 2, ... within each sequence")
            return TokenPlan(B, L, idx, pos, torch.tensor(bounds, dtype=torch.int32, device=device))
    else:
        pos = (ar + past_len).repeat(B)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * L
    return TokenPlan(B, L, idx, pos, cu, past_len)


def _paged_view(kv: torch.Tensor):
    """[B, S, H, D] contiguous K or V -> pages [B*nb, PAGE, H, D] and block table [B, nb]."""
    B, S, H, D = kv.shape
    nb = (S + PAGE - 1) // PAGE
    pages = kv.new_zeros(B, nb * PAGE, H, D)
    pages[:, :S] = kv
    table = torch.arange(B * nb, dtype=torch.int32, device=kv.device).view(B, nb)
    return pages.view(B * nb, PAGE, H, D), table


def attention_forward(self, x: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """Self-attention of a (patched) transformers attention module on the packed stream x [T, hidden]."""
    T = x.shape[0]
    hd = self.head_dim
    name = f"layers.{self.layer_idx}.self_attn"
    q = K.linear(x, self.q_proj.weight, self.q_proj.bias)
    k = K.linear(x, self.k_proj.weight, self.k_proj.bias)
    v = K.linear(x, self.v_proj.weight, self.v_proj.bias)
    if plan.tap is not None:
        plan.record(f"{name}.qkv_proj", torch.cat([q, k, v], dim=-1))
    q, k, v = q.view(T, -1, hd), k.view(T, -1, hd), v.view(T, -1, hd)
    if getattr(self, "q_norm", None) is not None:
        q = K.rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon)
        k = K.rms_norm(k, self.k_norm.weight, self.k_norm.variance_epsilon)
    cache = self._onpolicy_cos_sin
    q, k = K.rotary_embedding(plan.positions, q, k, cache, is_neox=True)
    from onpolicy_kernels.attention import attention, attention_contiguous  # noqa: PLC0415

    if plan.cache is None:
        o = attention_contiguous(q, k, v, plan.cu_seqlens, self.scaling)
    else:
        B, L = plan.B, plan.L
        kf, vf = plan.cache.update(k.view(B, L, -1, hd).transpose(1, 2), v.view(B, L, -1, hd).transpose(1, 2),
                                   self.layer_idx)
        S = kf.shape[2]
        kp, table = _paged_view(kf.transpose(1, 2))
        vp, _ = _paged_view(vf.transpose(1, 2))
        seq_lens = torch.full((B,), S, dtype=torch.int32, device=x.device)
        o = attention(q, kp, vp, table, plan.cu_seqlens, seq_lens, self.scaling)
    o = plan.record(f"{name}.attn", o.reshape(T, -1))
    return plan.record(f"{name}.o_proj", K.linear(o, self.o_proj.weight, self.o_proj.bias))


def mlp_forward(self, x: torch.Tensor, plan: Optional[TokenPlan] = None, name: str = "mlp") -> torch.Tensor:
    gate = K.linear(x, self.gate_proj.weight, self.gate_proj.bias)
    up = K.linear(x, self.up_proj.weight, self.up_proj.bias)
    gate_up = torch.cat([gate, up], dim=-1)
    act = K.silu_and_mul(gate_up)
    out = K.linear(act, self.down_proj.weight, self.down_proj.bias)
    if plan is not None and plan.tap is not None:
        plan.record(f"{name}.gate_up_proj", gate_up)
        plan.record(f"{name}.act_fn", act)
        plan.record(f"{name}.down_proj", out)
    return out


def layer_forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], plan: TokenPlan):
    """One decoder layer as vLLM runs it; returns (mlp output, residual) for the next fused norm."""
    n1, n2 = self.input_layernorm, self.post_attention_layernorm
    name = f"layers.{self.self_attn.layer_idx}"
    if residual is None:
        residual = hidden
        x = K.rms_norm(hidden, n1.weight, n1.variance_epsilon)
    else:
        x, residual = K.fused_add_rms_norm(hidden, residual, n1.weight, n1.variance_epsilon)
    plan.record(f"{name}.input_layernorm", x)
    a = attention_forward(self.self_attn, x, plan)
    x, residual = K.fused_add_rms_norm(a, residual, n2.weight, n2.variance_epsilon)
    plan.record(f"{name}.post_attention_layernorm", x)
    return mlp_forward(self.mlp, x, plan, f"{name}.mlp"), residual


def packed_hidden(model, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, use_cache=False, tap=None):
    """Run the patched base model; returns (final hidden [T, hidden] packed, plan, cache)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    emb = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    B, L = emb.shape[:2]
    if use_cache and past_key_values is None:
        from transformers import DynamicCache

        past_key_values = DynamicCache(config=model.config)
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    plan = plan_tokens(B, L, attention_mask, position_ids, past_len, emb.device)
    plan.tap = tap
    if past_key_values is not None:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("onpolicy's patched forward supports a KV cache only for unpadded batches")
        plan.cache = past_key_values
        plan.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=emb.device) * L
    hidden = emb.reshape(B * L, -1)[plan.idx]
    residual = None
    for layer in model.layers[: model.config.num_hidden_layers]:
        hidden, residual = layer(hidden, residual, plan)
    norm = model.norm
    hidden, _ = K.fused_add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    return plan.record("norm", hidden), plan, past_key_values


def base_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, use_cache=None, **kwargs):
    """Drop-in forward for the transformers base model (Qwen3Model, Qwen2Model, LlamaModel)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    unsupported = {k for k, v in kwargs.items() if v not in (None, False) and k not in ("return_dict", "cache_position")}
    if unsupported:
        raise NotImplementedError(f"onpolicy's patched forward does not support: {', '.join(sorted(unsupported))}")
    hidden, plan, cache = packed_hidden(self, input_ids, attention_mask, position_ids, past_key_values,
                                        inputs_embeds, bool(use_cache))
    out = hidden.new_zeros(plan.B * plan.L, hidden.shape[-1])
    out = out.index_copy(0, plan.idx, hidden).view(plan.B, plan.L, -1)
    return BaseModelOutputWithPast(last_hidden_state=out, past_key_values=cache if use_cache else None)


def lm_head_forward(self, x: torch.Tensor) -> torch.Tensor:
    return K.linear(x, self.weight, self.bias)
