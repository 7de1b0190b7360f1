"""The patched forward of a transformers decoder, on onpolicy's kernels.

It mirrors how vLLM runs the same model, op for op, so every activation has the
same bits on both sides: tokens are packed into one [T, hidden] stream (padding
removed, like vLLM's flattened batch), every layer is

    x, residual = rms_norm(h) | fused_add_rms_norm(h, residual)
    q, k, v     = linear(x, [Wq; Wk; Wv]) [-> q/k rms_norm per head] -> rotary
    a           = attention (one paged kernel for prefill, decode and training)
    x, residual = fused_add_rms_norm(linear(a, Wo), residual)
    h           = linear(silu_and_mul(linear(x, [Wgate; Wup])), Wdown)

(q/k/v and gate/up each one call on the concatenated weights, as vLLM runs them;
trainer/merged.py) and the final norm is fused with the last residual. Only views, splits and
copies happen between the kernels, so no other rounding can creep in.

Tensor parallelism: a vLLM engine with tensor_parallel_size=N computes each
row-parallel layer (o_proj, down_proj) as N partial matmuls over contiguous
K-slices, one per rank, each rounded to the model dtype, then reduces them: at
N=2 vLLM's all-reduce (one rounded addition, whatever the algorithm), at N=4 and
8 onpolicy's rank-order sum (the plugin's communicator all-gathers the partials
and runs `onpolicy_kernels.rank_sum`: float32, rank order, one rounding). Its
vocab-parallel embedding adds zeros from the other ranks to each row. The patched
forward reproduces both when the model is patched with `tensor_parallel_size=N`
(see `row_parallel_linear`); column-parallel layers, attention heads and the
vocab-parallel LM head need nothing, because onpolicy's kernels give every output
element the same bits however the N dimension is split. docs/tensor-parallel.md
has the design.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import onpolicy_kernels as K

from onpolicy_kernels.ops.moe import expert_outputs

from . import lora
from .merged import merged_linear

PAGE = 16  # page size used to view contiguous K/V as a paged cache (decode with an HF cache)
SUPPORTED_TP = (1, 2, 4, 8)


def full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A parameter as one whole tensor: FSDP2 can leave the root's own parameters (final norm,
    LM head) sharded (DTensor) when they are read outside a module call; gather them here
    (differentiable; every rank runs the same forward, so the collective is matched)."""
    if t is not None and hasattr(t, "full_tensor"):
        return t.full_tensor()
    return t


@contextlib.contextmanager
def no_autocast(device):
    """Autocast off for the patched forward (TRL's default `bf16=True` runs the trainer under it).

    The weights are already in the dtype vLLM runs (the trainer checks that), and vLLM runs no
    autocast: letting autocast recast the kernels' fp32 steps (logits, log-softmax) to bf16 would
    change the trainer's bits. With autocast off the forward computes exactly what it computes
    without it, so `bf16=True` / `fp16=True` need no change in the user's config.
    """
    dev = torch.device(device).type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(device_type=dev, enabled=False):
            yield
    else:
        yield


def check_tp(tp: int) -> int:
    """Validate a tensor-parallel size the trainer can mirror bitwise."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp not in SUPPORTED_TP:
        raise ValueError(
            f"tensor_parallel_size={tp!r} is not supported: onpolicy mirrors vLLM's tensor parallelism bitwise "
            "for sizes 1, 2, 4 and 8 (at 4 and 8 the plugin replaces vLLM's all-reduce with a rank-order sum); "
            "run vLLM with tensor_parallel_size 1, 2, 4 or 8")
    return tp


def check_tp_shape(config, tp: int) -> None:
    """Refuse a model whose layers vLLM cannot split over `tp` ranks (vLLM would refuse it too), so
    the mirror never emulates a sharding that no engine runs."""
    if tp == 1:
        return
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    inter = getattr(config, "intermediate_size", None)
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads} is not a multiple of {tp}")
    if kv % tp and tp % kv:
        problems.append(f"num_key_value_heads={kv} neither divides nor is a multiple of {tp}")
    if inter is not None and inter % tp:
        problems.append(f"intermediate_size={inter} is not a multiple of {tp}")
    if problems:
        raise ValueError(f"this model cannot be split into tensor_parallel_size={tp} ranks as vLLM splits it: "
                         + "; ".join(problems) + "; use a tensor_parallel_size that divides the head counts")


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tp: int) -> torch.Tensor:
    """What a vLLM RowParallelLinear computes with `tp` ranks under onpolicy, in one process.

    vLLM gives rank r the r-th contiguous K/tp slice of the input and of the weight
    (for o_proj that is the rank's heads, num_heads/tp of them, in order); rank r
    multiplies them (onpolicy `linear`, output in the model dtype; the bias only on
    rank 0), then the ranks' partial outputs are reduced:

    * tp=2: vLLM's own all-reduce. Two terms make one correctly rounded addition
      whatever the algorithm (NCCL, vLLM's custom all-reduce, the CPU's shared-memory
      one): round(p0 + p1), which is what the model-dtype `+` below computes.
    * tp=4, 8: onpolicy's communicator all-gathers the partials and sums them in rank
      order in float32, rounding once (`onpolicy_kernels.rank_sum`); the same op here.
    """
    if tp == 1:
        return K.linear(x, weight, bias)
    k = x.shape[-1]
    if k % tp:
        raise ValueError(f"input size {k} does not split into {tp} tensor-parallel ranks")
    s = k // tp
    parts = [K.linear(x[:, r * s:(r + 1) * s].contiguous(), weight[:, r * s:(r + 1) * s].contiguous(),
                      bias if r == 0 else None) for r in range(tp)]
    if tp == 2:
        return parts[0] + parts[1]
    return K.rank_sum(torch.stack(parts))


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
    max_len: int = 0  # a bound on the longest sequence (host int, no sync): sizes attention grids
    tap: Optional[Callable[[str, torch.Tensor], None]] = None  # `onpolicy check` records activations here
    tp: int = 1  # vLLM tensor-parallel size the forward mirrors (row_parallel_linear)
    router_logits: Optional[list] = None  # MoE: each sparse layer's router logits [T, E], when asked for

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
        return TokenPlan(B, L, idx, pos.reshape(-1)[idx], cu, max_len=L)
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
            return TokenPlan(B, L, idx, pos, torch.tensor(bounds, dtype=torch.int32, device=device),
                             max_len=max(b - a for a, b in zip(bounds, bounds[1:])))
    else:
        pos = (ar + past_len).repeat(B)
    cu = torch.arange(B + 1, dtype=torch.int32, device=device) * L
    return TokenPlan(B, L, idx, pos, cu, past_len, max_len=L)


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
    projections = (self.q_proj, self.k_proj, self.v_proj)
    qkv = plan.record(f"{name}.qkv_proj", merged_linear(x, projections))
    q, k, v = qkv.split([p.weight.shape[0] for p in projections], dim=-1)
    q, k, v = q.view(T, -1, hd), k.view(T, -1, hd), v.view(T, -1, hd)
    if getattr(self, "q_norm", None) is not None:
        q = K.rms_norm(q, self.q_norm.weight, self.q_norm.variance_epsilon)
        k = K.rms_norm(k, self.k_norm.weight, self.k_norm.variance_epsilon)
    cache = self._onpolicy_cos_sin
    if cache.device != q.device:  # the model moved after patching (accelerate / FSDP2 place it on the GPU later)
        cache = self._onpolicy_cos_sin = cache.to(q.device)
    q, k = K.rotary_embedding(plan.positions, q, k, cache, is_neox=True)
    from onpolicy_kernels.ops.attention import attention, attention_contiguous  # noqa: PLC0415

    if plan.cache is None:
        o = attention_contiguous(q, k, v, plan.cu_seqlens, self.scaling, max_seqlen=plan.max_len)
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
    out = row_parallel_linear(o, lora.weight_of(self.o_proj), self.o_proj.bias, plan.tp)
    return plan.record(f"{name}.o_proj", out)


def mlp_forward(self, x: torch.Tensor, plan: Optional[TokenPlan] = None, name: str = "mlp") -> torch.Tensor:
    gate_up = merged_linear(x, (self.gate_proj, self.up_proj))
    act = K.silu_and_mul(gate_up)
    out = row_parallel_linear(act, lora.weight_of(self.down_proj), self.down_proj.bias,
                              plan.tp if plan is not None else 1)
    if plan is not None and plan.tap is not None:
        plan.record(f"{name}.gate_up_proj", gate_up)
        plan.record(f"{name}.act_fn", act)
        plan.record(f"{name}.down_proj", out)
    return out


def is_moe_block(mlp) -> bool:
    """A transformers sparse-MoE block (Qwen3MoeSparseMoeBlock: `.gate` router and `.experts`)."""
    return getattr(mlp, "experts", None) is not None and getattr(mlp, "gate", None) is not None


def moe_block_forward(self, x: torch.Tensor, plan: Optional[TokenPlan] = None, name: str = "mlp") -> torch.Tensor:
    """A Qwen3-MoE sparse block on onpolicy's MoE op, as vLLM's MoE layer runs it with the plugin:
    router logits from the gate's linear, `moe_route` (top-k, norm_topk_prob), `moe_experts`."""
    gate, experts = self.gate, self.experts
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    logits = K.linear(x2, full(lora.weight_of(gate)))
    weights, ids = K.moe_route(logits, gate.top_k, bool(gate.norm_topk_prob))
    y = expert_outputs(x2, ids, full(experts.gate_up_proj), full(experts.down_proj))
    out = K.moe_combine(y, weights)
    if plan is not None:
        if plan.router_logits is not None:
            plan.router_logits.append(logits)
        if plan.tap is not None:
            plan.record(f"{name}.gate", logits)
            plan.record(f"{name}.router", torch.cat([weights, ids.to(torch.float32)], dim=-1))
            plan.record(f"{name}.experts", y.reshape(y.shape[0], -1))
            plan.record(f"{name}.combine", out)
    return out if x.dim() == 2 else out.view(shape)


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
    mlp = moe_block_forward if is_moe_block(self.mlp) else mlp_forward
    return mlp(self.mlp, x, plan, f"{name}.mlp"), residual


@contextlib.contextmanager
def router_logits_of(base_model):
    """Collect the router logits of every patched forward of `base_model` run inside: one entry per
    forward, a tuple with one [B*L, E] tensor per MoE layer (transformers' `router_logits` layout,
    padding rows zero). For callers that reach the forward through functions without a
    router-logits argument (onpolicy's fused LM head for TRL)."""
    calls: list = []
    base_model._onpolicy_router_sink = calls
    try:
        yield calls
    finally:
        del base_model._onpolicy_router_sink


def scatter_router_logits(plan: "TokenPlan", collected: list) -> tuple:
    """Packed per-layer router logits [T, E] -> transformers' [B*L, E] (padding rows zero)."""
    return tuple(lg.new_zeros(plan.B * plan.L, lg.shape[-1]).index_copy(0, plan.idx, lg) for lg in collected)


def packed_hidden(model, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, use_cache=False, tap=None, router_logits=None):
    """Run the patched base model; returns (final hidden [T, hidden] packed, plan, cache). Autocast is
    off inside (see `no_autocast`). router_logits: a list that collects each MoE layer's router
    logits [T, E] (packed tokens), or None."""
    with no_autocast(model.embed_tokens.weight.device):
        return _packed_hidden(model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
                              use_cache, tap, router_logits)


def _packed_hidden(model, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, tap,
                   router_logits=None):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    tp = getattr(model, "_onpolicy_tp", 1)
    if inputs_embeds is not None:
        emb = inputs_embeds
    elif hasattr(model.embed_tokens.weight, "full_tensor"):  # left sharded by FSDP2 (see `full`)
        emb = torch.nn.functional.embedding(input_ids, full(model.embed_tokens.weight), model.embed_tokens.padding_idx)
    else:
        emb = model.embed_tokens(input_ids)
    if tp > 1 and inputs_embeds is None:
        emb = emb + 0.0  # vLLM's vocab-parallel lookup sums the other ranks' zeros in (-0.0 -> +0.0; rank_sum too)
    B, L = emb.shape[:2]
    if use_cache and past_key_values is None:
        from transformers import DynamicCache

        past_key_values = DynamicCache(config=model.config)
    past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
    plan = plan_tokens(B, L, attention_mask, position_ids, past_len, emb.device)
    plan.tap = tap
    plan.tp = tp
    sink = getattr(model, "_onpolicy_router_sink", None)
    if router_logits is None and sink is not None:
        router_logits = []
    plan.router_logits = router_logits
    if past_key_values is not None:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise NotImplementedError("onpolicy's patched forward supports a KV cache only for unpadded batches")
        plan.cache = past_key_values
        plan.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=emb.device) * L
    hidden = emb.reshape(B * L, -1)[plan.idx]
    residual = None
    for layer in model.layers[: model.config.num_hidden_layers]:
        hidden, residual = layer(hidden, residual, plan)
    if sink is not None:
        sink.append(scatter_router_logits(plan, router_logits))
    norm = model.norm
    hidden, _ = K.fused_add_rms_norm(hidden, residual, full(norm.weight), norm.variance_epsilon)
    return plan.record("norm", hidden), plan, past_key_values


def base_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, use_cache=None, **kwargs):
    """Drop-in forward for the transformers base model (Qwen3Model, Qwen2Model, LlamaModel)."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    want_router = bool(kwargs.pop("output_router_logits", False))
    unsupported = {k for k, v in kwargs.items() if v not in (None, False) and k not in ("return_dict", "cache_position")}
    if unsupported:
        raise NotImplementedError(f"onpolicy's patched forward does not support: {', '.join(sorted(unsupported))}")
    moe = any(is_moe_block(layer.mlp) for layer in self.layers)
    if want_router and not moe:
        raise NotImplementedError("output_router_logits needs a mixture-of-experts model")
    collected = [] if want_router else None
    hidden, plan, cache = packed_hidden(self, input_ids, attention_mask, position_ids, past_key_values,
                                        inputs_embeds, bool(use_cache), router_logits=collected)
    out = hidden.new_zeros(plan.B * plan.L, hidden.shape[-1])
    out = out.index_copy(0, plan.idx, hidden).view(plan.B, plan.L, -1)
    if not moe:
        return BaseModelOutputWithPast(last_hidden_state=out, past_key_values=cache if use_cache else None)
    from transformers.modeling_outputs import MoeModelOutputWithPast

    router = None
    if want_router:  # transformers' layout: one [B*L, E] per sparse layer; padding rows are zeros (the
        # attention mask leaves them out of the auxiliary loss)
        router = scatter_router_logits(plan, collected)
    return MoeModelOutputWithPast(last_hidden_state=out, past_key_values=cache if use_cache else None,
                                  router_logits=router)


def lm_head_forward(self, x: torch.Tensor) -> torch.Tensor:
    with no_autocast(x.device):
        return K.linear(x, full(self.weight), full(self.bias))
