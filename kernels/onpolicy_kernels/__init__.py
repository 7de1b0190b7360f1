"""onpolicy_kernels: batch-invariant kernels shared by the vLLM sampler and the trainer.

Every op is a torch custom op (namespace `onpolicy`, opaque to torch.compile)
with a Triton GPU path and a portable CPU path. The contract, for each op: a
row's output is bitwise identical whatever other rows share the call, however
many there are, and wherever the row sits (float32, float16, bfloat16). The
forward is invariant; the backward uses standard fast kernels.
"""
from .ops.activation import silu_and_mul
from .ops.attention import attention, attention_contiguous, attention_schedule, reshape_and_cache
from .ops.linear import linear
from .ops.logprobs import log_softmax, token_logprobs
from .ops.moe import moe, moe_combine, moe_experts, moe_route, moe_routed
from .ops.reduce import rank_sum
from .ops.rms_norm import fused_add_rms_norm, rms_norm
from .ops.rotary import build_cos_sin_cache, rotary_embedding
from .ops.truncation import (truncate_logprobs, truncated_log_softmax, truncated_token_logprobs,
                             truncation_thresholds)

__all__ = [
    "linear",
    "attention",
    "attention_contiguous",
    "attention_schedule",
    "reshape_and_cache",
    "rms_norm",
    "fused_add_rms_norm",
    "silu_and_mul",
    "rotary_embedding",
    "build_cos_sin_cache",
    "log_softmax",
    "token_logprobs",
    "rank_sum",
    "moe",
    "moe_route",
    "moe_experts",
    "moe_combine",
    "moe_routed",
    "truncation_thresholds",
    "truncate_logprobs",
    "truncated_log_softmax",
    "truncated_token_logprobs",
]
