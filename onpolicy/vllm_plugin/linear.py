"""Every linear layer and the LM head on `onpolicy_kernels.linear`, weights kept loadable.

Mechanism: a quantization config named "onpolicy" (vLLM's official per-layer
hook, `register_quantization_config`). Its `get_quant_method` hands
  * every `LinearBase` (merged QKV, merged gate/up, o_proj, down_proj) an
    `OnpolicyLinearMethod`, and
  * every vocab embedding (the `ParallelLMHead`, and the token embedding,
    which vLLM 0.26's Qwen2/Qwen3 reuse as the tied head) an
    `OnpolicyHeadMethod` (lookup = vLLM's gather, head matmul = ours);
each routed-experts layer of an MoE model an `OnpolicyMoEMethod` (moe.py);
everything else (attention) keeps vLLM's default. Both
methods inherit vLLM's unquantized `create_weights`, so `layer.weight` stays
the same loadable parameter with the same `weight_loader` (checkpoint loading,
merged q/k/v and gate/up shards, and TRL's `model.load_weights` weight sync all
work), and both make `process_weights_after_loading` a no-op: vLLM's CPU path
would otherwise pre-pack the weight for oneDNN and replace `layer.weight` by an
empty tensor. The platform (platform.py) installs the config; users never pass
`quantization=`.

The LM head: vLLM's `LogitsProcessor` bypasses the head's method when
`head_dtype` differs from the model dtype, so an OOT `LogitsProcessor` routes
the head through our kernel always (casting to `head_dtype` first, as the
trainer must too).
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import onpolicy_kernels
import torch

from . import compat
from .errors import OnpolicyVllmError

QUANT_NAME = "onpolicy"


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return onpolicy_kernels.linear(x, weight, bias)


@functools.cache
def _cache_scale_mapper(base):
    """vLLM's KV-cache scale name mapper, built once (a WeightsMapper: `|` makes a new one, never mutates)."""
    return base.get_cache_scale_mapper()


def _make_classes() -> dict[str, type]:
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.layers.vocab_parallel_embedding import (UnquantizedEmbeddingMethod,
                                                                      VocabParallelEmbedding)

    class OnpolicyLinearMethod(UnquantizedLinearMethod):
        """vLLM's unquantized weights, computed with onpolicy's batch-invariant linear."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # Keep `layer.weight` as the loaded parameter: no CPU pre-packing, no
            # replacement. A later weight sync writes into it and is used as is.
            return None

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            return _linear(x, layer.weight, bias)

    class OnpolicyHeadMethod(UnquantizedEmbeddingMethod):
        """The LM head's weights (tied or not) on onpolicy's linear."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            return None

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            return _linear(x, layer.weight, bias)

    class OnpolicyQuantConfig(QuantizationConfig):
        """Not a quantization: the per-layer hook that puts linears on onpolicy's kernel."""

        def __init__(self) -> None:
            super().__init__()

        def __repr__(self) -> str:
            return "OnpolicyQuantConfig()"

        def get_name(self) -> str:
            return QUANT_NAME

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> "OnpolicyQuantConfig":
            return cls()

        def get_cache_scale_mapper(self):
            # vLLM's AutoWeightsLoader asks every load_weights call for this mapper, and TRL's colocate sync
            # calls load_weights once per parameter: the base class compiles its regexes each time, which
            # made the weight sync 1.2-2.2x the control's (cProfile, Qwen3-1.7B shape, H200). The base's
            # mapper, built once: the same names mapped (none occur: onpolicy refuses KV-cache scales).
            return _cache_scale_mapper(QuantizationConfig)

        def get_quant_method(self, layer: torch.nn.Module, prefix: str):
            # Every vocab embedding, not only ParallelLMHead: vLLM 0.26's Qwen2/Qwen3
            # tie the head by *reusing* the token embedding module
            # (v26:models/qwen3.py:298-299, qwen2.py:464), so the token embedding
            # may be the LM head. Its lookup stays vLLM's gather (inherited
            # `embedding`); only the head matmul (`apply`) is ours.
            if isinstance(layer, VocabParallelEmbedding):
                return OnpolicyHeadMethod()
            from . import moe  # the routed experts of an MoE layer (moe.py)

            method = moe.quant_method_for(layer, prefix)
            if method is not None:
                return method
            if isinstance(layer, LinearBase):
                return OnpolicyLinearMethod()
            return None

    class OnpolicyLogitsProcessor(LogitsProcessor):
        """LM head always through the head's (onpolicy) method, also with an fp32 head_dtype."""

        def _apply_head(self, lm_head, hidden_states: torch.Tensor, embedding_bias: Optional[torch.Tensor]):
            method = getattr(lm_head, "quant_method", None)
            if not isinstance(method, OnpolicyHeadMethod):
                raise OnpolicyVllmError(
                    f"the LM head uses {type(method).__name__}, not onpolicy's method (was the model built "
                    "with the onpolicy quantization config?)"
                )
            if self.soft_cap is not None or self.scale != 1.0:
                raise OnpolicyVllmError("logit soft-capping / logit scaling is not supported")
            dt = self.head_dtype
            if dt is None or dt == hidden_states.dtype:
                graphs = getattr(self, "_onpolicy_graphs", None)  # decode steps from CUDA graphs (graphs.py)
                if graphs is not None and embedding_bias is None:
                    return graphs(hidden_states, extra=(lm_head.weight,))
                return method.apply(lm_head, hidden_states, bias=embedding_bias)
            bias = embedding_bias.to(dt) if embedding_bias is not None else None
            return _linear(hidden_states.to(dt), lm_head.weight.to(dt), bias)

    return {c.__name__: c for c in (OnpolicyLinearMethod, OnpolicyHeadMethod, OnpolicyQuantConfig,
                                    OnpolicyLogitsProcessor)}


# Classes are built lazily (they subclass vLLM's); `linear.OnpolicyQuantConfig` resolves them,
# also for unpickling a config in another process.
classes, __getattr__ = compat.lazy_classes(__name__, _make_classes, ("OnpolicyLinearMethod", "OnpolicyHeadMethod",
                                                                    "OnpolicyQuantConfig", "OnpolicyLogitsProcessor"))


def make_quant_config():
    return classes()["OnpolicyQuantConfig"]()


_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
    from vllm.model_executor.layers.quantization import register_quantization_config

    cls = classes()
    register_quantization_config(QUANT_NAME)(cls["OnpolicyQuantConfig"])
    existing = op_registry_oot.get("LogitsProcessor")
    if existing is not None and existing is not cls["OnpolicyLogitsProcessor"]:
        raise OnpolicyVllmError(f"another plugin already replaced vLLM's LogitsProcessor with {existing.__qualname__}")
    PluggableLayer.register_oot(cls["OnpolicyLogitsProcessor"], name="LogitsProcessor")
    _registered = True
