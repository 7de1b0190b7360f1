"""The table of supported model families, shared by the trainer and the vLLM adapter.

Qwen3, Qwen2 (incl. 2.5) and Llama (3.x) share one decoder structure (RMSNorm,
GQA attention with rotary, gated SiLU MLP, LM head) and the same module names
in transformers; a family only says what differs: q/k RMSNorm (Qwen3) and which
vLLM architecture serves it. Everything else is read off the model's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from onpolicy_kernels import build_cos_sin_cache
from onpolicy_kernels.ops.rotary import SUPPORTED_ROPE_TYPES


@dataclass(frozen=True)
class Family:
    name: str
    hf_architecture: str
    vllm_architecture: str
    qk_norm: bool
    moe: bool = False  # sparse MoE blocks (top-k softmax router, routed experts, no shared expert)


FAMILIES = {
    "qwen3": Family("Qwen3", "Qwen3ForCausalLM", "Qwen3ForCausalLM", qk_norm=True),
    "qwen2": Family("Qwen2 / Qwen2.5", "Qwen2ForCausalLM", "Qwen2ForCausalLM", qk_norm=False),
    "llama": Family("Llama 3.x", "LlamaForCausalLM", "LlamaForCausalLM", qk_norm=False),
    "qwen3_moe": Family("Qwen3-MoE", "Qwen3MoeForCausalLM", "Qwen3MoeForCausalLM", qk_norm=True, moe=True),
}
# Other MoE designs, named in the error so that the user knows what is not covered.
OTHER_MOE = {"qwen2_moe": "Qwen2-MoE (shared expert)", "deepseek_v2": "DeepSeek-V2 (shared experts, grouped "
             "routing)", "deepseek_v3": "DeepSeek-V3 (shared experts, grouped routing)", "mixtral": "Mixtral",
             "qwen3_next": "Qwen3-Next (shared expert, hybrid attention)", "gpt_oss": "gpt-oss",
             "olmoe": "OLMoE"}
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class UnsupportedModelError(ValueError):
    """The model, dtype or setting is outside what onpolicy's kernels cover."""


def supported_list() -> str:
    return ", ".join(f"{f.name} (model_type {k!r})" for k, f in FAMILIES.items())


def family_of(config) -> Family:
    mt = getattr(config, "model_type", None)
    if mt in OTHER_MOE:
        raise UnsupportedModelError(
            f"onpolicy does not support the mixture-of-experts design of {OTHER_MOE[mt]} (model_type {mt!r}); the "
            "supported MoE is Qwen3-MoE (model_type 'qwen3_moe': top-k softmax routing, no shared expert); "
            f"supported families: {supported_list()}")
    if mt not in FAMILIES:
        raise UnsupportedModelError(
            f"onpolicy does not support model_type {mt!r}; supported families: {supported_list()}"
        )
    return FAMILIES[mt]


def rope_spec(config) -> tuple[float, Optional[dict]]:
    """(base, scaling dict or None) of the model's rotary embedding, for transformers 4 and 5 configs."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rtype = params.get("rope_type", params.get("type", "default"))
        return float(base), (None if rtype in (None, "default") else dict(params))
    scaling = getattr(config, "rope_scaling", None)
    base = float(getattr(config, "rope_theta", 10000.0))
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        return base, dict(scaling)
    return base, None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def cos_sin_cache_for(config, max_position: Optional[int] = None) -> torch.Tensor:
    """The fp32 rotary cache both sides use for this config (rows depend only on the position)."""
    base, scaling = rope_spec(config)
    hd = head_dim_of(config)
    return build_cos_sin_cache(hd, hd, max_position or config.max_position_embeddings, base, scaling)


def check_supported(config, dtype: Optional[torch.dtype] = None) -> Family:
    """Raise UnsupportedModelError naming the problem (and what is supported); return the family."""
    fam = family_of(config)
    problems = []
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        problems.append(f"dtype {dtype} (supported: bfloat16, float16, float32)")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act {act!r} (supported: 'silu')")
    _, scaling = rope_spec(config)
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type"))
        if rtype not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope type {rtype!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        problems.append("sliding-window attention (supported: full causal attention)")
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) != 0.0:
        problems.append("attention_dropout > 0 (supported: 0)")
    if getattr(config, "mlp_bias", False):
        problems.append("mlp_bias=True (supported: no MLP bias)")
    if getattr(config, "num_attention_heads", 1) % getattr(config, "num_key_value_heads", 1):
        problems.append("num_attention_heads not a multiple of num_key_value_heads")
    if fam.moe:
        problems += moe_problems(config)
    if problems:
        raise UnsupportedModelError(f"{fam.name} model not supported by onpolicy: " + "; ".join(problems))
    return fam


def moe_problems(config) -> list[str]:
    """What a Qwen3-MoE config asks for that onpolicy's MoE op does not compute (empty when none)."""
    problems = []
    n, k = getattr(config, "num_experts", 0) or 0, getattr(config, "num_experts_per_tok", 0) or 0
    if n < 1 or not 1 <= k <= n:
        problems.append(f"num_experts {n} / num_experts_per_tok {k} (need 1 <= top-k <= experts)")
    if getattr(config, "shared_expert_intermediate_size", 0):
        problems.append("a shared expert (supported: routed experts only, as in Qwen3-30B-A3B / 235B-A22B)")
    if getattr(config, "scoring_func", "softmax") != "softmax":
        problems.append(f"scoring_func {config.scoring_func!r} (supported: 'softmax')")
    return problems


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def load_model_config(model) -> object:
    """A local model directory's transformers config, once it is known to be usable: the directory
    exists, its config reads, the architecture is supported, and it holds weights. Else
    UnsupportedModelError naming what is wrong (for `onpolicy check` and `onpolicy bench`)."""
    from pathlib import Path

    from transformers import AutoConfig

    d = Path(model)
    if not d.exists():
        raise UnsupportedModelError(f"model path {model} does not exist (give a local directory with config.json "
                                    "and weights)")
    if not d.is_dir():
        raise UnsupportedModelError(f"model path {model} is not a directory (give a local directory with config.json "
                                    "and weights)")
    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model directory
        raise UnsupportedModelError(f"cannot read a transformers config from {model}: {e}") from None
    check_supported(cfg)
    if not any(next(d.glob(p), None) for p in WEIGHT_PATTERNS):
        raise UnsupportedModelError(f"model directory {model} holds no weights ({', '.join(WEIGHT_PATTERNS)})")
    return cfg
