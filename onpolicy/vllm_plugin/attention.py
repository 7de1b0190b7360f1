"""vLLM attention backend (the CUSTOM slot) on `onpolicy_kernels.attention`.

One kernel for prefill, chunked prefill and decode, invariant to the batch, the
block size and the block placement, and the same kernel the trainer runs on its
packed sequences (`attention_contiguous`): our Triton kernel, or on Hopper
FlashAttention-3 with one KV split (`onpolicy_kernels.ops.attention.fa3`, chosen by the
same rule on both sides; vLLM's `max_query_len` sizes its grid). The KV cache update is a separate
call (`do_kv_cache_update` -> `reshape_and_cache`), as vLLM's CPU and
FlexAttention backends do. Both run inside vLLM's opaque `unified_*` custom
ops, so torch.compile never traces them.

Layout: vLLM gives each layer a [num_blocks, Hkv, block_size, 2*D] tensor (K
then V in the last dim); we ask for the NHD physical order in both versions
(compat) and pass the kernel [num_blocks, block_size, Hkv, D] views of K and V.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from . import compat
from .errors import OnpolicyVllmError

BACKEND_QUALNAME = f"{__name__}.OnpolicyAttentionBackend"


class OnpolicyAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the AttentionBackendEnum slot it is registered in

    @staticmethod
    def get_impl_cls():
        return OnpolicyAttentionImpl

    @staticmethod
    def get_builder_cls():
        return OnpolicyAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(*args, **kwargs):
        return [compat.multiple_of(compat.KERNEL_BLOCK_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(range(16, 257, 16))

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    # 0.26: shape + physical order. 0.32: supported layouts. (compat)
    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        return compat.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        return compat.kv_cache_stride_order(include_num_layers_dimension)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return compat.kv_cache_layouts()

    @staticmethod
    def use_cascade_attention(*args, **kwargs) -> bool:
        return False


@dataclass
class OnpolicyAttentionMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    max_query_len: int = 0  # host int: sizes the FA3 route's grid only (0: the token count)
    # Work the layers' calls share (FA3's tile schedule; None where the route needs none),
    # computed by the step's first attention call for the head/cache shapes in `schedule_key`.
    schedule: Optional[torch.Tensor] = None
    schedule_key: Optional[tuple] = None


class OnpolicyAttentionMetadataBuilder(AttentionMetadataBuilder[OnpolicyAttentionMetadata]):
    # Full CUDA graphs for uniform (decode) batches: the kernel reads every per-step value
    # (query_start_loc, seq_lens, block_table) from vLLM's persistent device buffers, and
    # its grid depends only on the padded token count and the padded request count, which
    # a captured graph fixes. vLLM pads the extra requests to zero-length queries with
    # seq_len 0 and the extra tokens to slot -1, which the kernels skip. A row's bits do
    # not depend on the grid, so graph replay == eager. Mixed prefill/decode batches stay
    # piecewise (eager attention between captured pieces).
    # `build` returns a NEW metadata object every step, and the builder never reuses one
    # (`supports_update_block_table` stays False): the forward caches the step's shared
    # schedule on the object (OnpolicyAttentionMetadata.schedule), which a reused object would
    # carry into the next step stale.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH
    supports_update_block_table: ClassVar[bool] = False
    reorder_batch_threshold: Optional[int] = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> OnpolicyAttentionMetadata:
        cm = common_attn_metadata
        if common_prefix_len:
            raise OnpolicyVllmError("cascade (shared-prefix) attention is not supported")
        if isinstance(cm.causal, torch.Tensor) or not cm.causal:
            raise OnpolicyVllmError("non-causal attention is not supported")
        n = cm.num_reqs
        return OnpolicyAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=n,
            query_start_loc=cm.query_start_loc[: n + 1],
            seq_lens=cm.seq_lens[:n],
            block_table=cm.block_table_tensor[:n],
            slot_mapping=cm.slot_mapping,
            max_query_len=int(cm.max_query_len),
        )

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        return False


class OnpolicyAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: Optional[int] = None,
                 alibi_slopes: Optional[list] = None, sliding_window: Optional[int] = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: Optional[float] = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: Optional[str] = None,
                 **extra) -> None:
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None and sliding_window > 0:
            problems.append(f"sliding window ({sliding_window})")
        if logits_soft_cap:
            problems.append(f"logit soft-capping ({logits_soft_cap})")
        if kv_cache_dtype not in ("auto", None):
            problems.append(f"kv_cache_dtype={kv_cache_dtype!r}")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("cross-layer KV sharing")
        if extra.get("sinks") is not None:
            problems.append("attention sinks")
        if problems:
            raise OnpolicyVllmError("attention with " + ", ".join(problems) + " is not supported")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.sliding_window = None
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Optional[OnpolicyAttentionMetadata], output: torch.Tensor,
                output_scale: Optional[torch.Tensor] = None, output_block_scale: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise OnpolicyVllmError("fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run without a KV cache
            return output
        attention, _, attention_schedule = compat.attention_ops()
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache = compat.split_kv_cache(kv_cache, self.head_size)
        q = query[:n]
        md = attn_metadata
        out = None
        if output.dtype == q.dtype:  # vLLM's output buffer: the kernel writes into it (no copy per layer)
            try:
                out = output[:n].view(q.shape)
            except RuntimeError:  # not viewable as [n, Hq, D]: written via a copy below
                pass
        if out is None:
            res = attention(q, k_cache, v_cache, md.block_table, md.query_start_loc, md.seq_lens, self.scale,
                            max_seqlen_q=md.max_query_len)
            output[:n].copy_(res.view(output[:n].shape))
            return output
        key = (q.shape[1:], q.dtype, k_cache.shape[1:])
        if md.schedule_key != key:  # once per step: one metadata object serves every layer (under a
            # full CUDA graph the first layer's call is captured, so every replay recomputes it)
            md.schedule = attention_schedule(q, k_cache, md.block_table, md.query_start_loc, md.seq_lens,
                                             md.max_query_len)
            md.schedule_key = key
        attention(q, k_cache, v_cache, md.block_table, md.query_start_loc, md.seq_lens, self.scale,
                  max_seqlen_q=md.max_query_len, out=out, schedule=md.schedule)
        return output

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        _, reshape_and_cache, _ = compat.attention_ops()
        k_cache, v_cache = compat.split_kv_cache(kv_cache, self.head_size)
        n = min(key.shape[0], slot_mapping.shape[0])
        reshape_and_cache(key[:n], value[:n], k_cache, v_cache, slot_mapping[:n])


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.CUSTOM.is_overridden():
        current = AttentionBackendEnum.CUSTOM.get_path()
        if current != BACKEND_QUALNAME:
            raise OnpolicyVllmError(f"the CUSTOM attention backend slot is already taken by {current}")
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_QUALNAME)
    _registered = True
