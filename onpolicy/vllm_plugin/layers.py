"""Out-of-tree replacements (CustomOp.register_oot) for vLLM's RMSNorm, SiluAndMul and RoPE.

Each class subclasses vLLM's and overrides only the forward methods, every
`forward_*` bound to one implementation on `onpolicy_kernels`, so whichever
vLLM dispatches (forward_native under Inductor, forward_cuda/cpu otherwise) the
same kernel runs. vLLM looks replacements up by the *name of the class being
instantiated*, so each supported RoPE class is registered under its own name.
"""
from __future__ import annotations

import onpolicy_kernels
import torch

from . import compat
from .errors import OnpolicyVllmError

_FORWARDS = ("forward_native", "forward_cuda", "forward_hip", "forward_cpu", "forward_xpu", "forward_tpu",
             "forward_oot")


class OnpolicyOp:
    """Marker for layers that run on onpolicy's kernels (checked by the post-load audit)."""


def _bind_all(cls, fn):
    for name in _FORWARDS:
        setattr(cls, name, fn)
    return cls


def _rms_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    if getattr(self, "variance_size_override", None) is not None or not getattr(self, "has_weight", True):
        raise OnpolicyVllmError("RMSNorm with var_hidden_size or without weight is not supported")
    K = onpolicy_kernels
    if residual is None:
        return K.rms_norm(x, self.weight, self.variance_epsilon)
    return K.fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)


def _silu_and_mul_forward(self, x: torch.Tensor) -> torch.Tensor:
    return onpolicy_kernels.silu_and_mul(x)


def _rotary_forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                    *args, **kwargs):
    if key is None or args or kwargs:
        raise OnpolicyVllmError("rotary embedding without key, or with offsets, is not supported")
    cache = self._onpolicy_cos_sin_cache
    if cache.device != query.device:  # moved with the module normally; guard for odd loaders
        cache = cache.to(query.device)
    return compat.rotary_embedding(positions.flatten(), query, key, cache, self.head_size, self.is_neox_style)


def _attach_cos_sin_cache(self) -> None:
    """Build onpolicy's fp32 cos/sin cache exactly as the trainer does (onpolicy.families)."""
    from onpolicy.families import cos_sin_cache_for, rope_spec

    hf_config = compat.current_vllm_config().model_config.hf_config
    if self.rotary_dim != self.head_size:
        raise OnpolicyVllmError(f"partial rotary (rotary_dim {self.rotary_dim} < head_size {self.head_size}) "
                                "is not supported")
    base, _ = rope_spec(hf_config)
    if float(base) != float(self.base):
        raise OnpolicyVllmError(f"RoPE base mismatch: vLLM layer uses {self.base}, the model config {base}")
    # Build on the CPU whatever device context vLLM builds the model under (a
    # CUDA default device would compute cos/sin on the GPU: other bits than the
    # trainer's), then place it beside vLLM's own cache.
    with torch.device("cpu"):
        cache = cos_sin_cache_for(hf_config, max_position=self.max_position_embeddings)
    device = self.cos_sin_cache.device if isinstance(getattr(self, "cos_sin_cache", None), torch.Tensor) else "cpu"
    self.register_buffer("_onpolicy_cos_sin_cache", cache.to(device), persistent=False)


def _rope_init(base):
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        _attach_cos_sin_cache(self)

    return __init__


def _make_classes():
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm

    classes = {}

    class OnpolicyRMSNorm(RMSNorm, OnpolicyOp):
        pass

    classes["RMSNorm"] = _bind_all(OnpolicyRMSNorm, _rms_norm_forward)

    class OnpolicySiluAndMul(SiluAndMul, OnpolicyOp):
        pass

    classes["SiluAndMul"] = _bind_all(OnpolicySiluAndMul, _silu_and_mul_forward)

    for name in compat.ROPE_CLASSES:
        base = compat.rope_class(name)
        cls = type(f"Onpolicy{name}", (base, OnpolicyOp), {"__init__": _rope_init(base), "__module__": __name__})
        classes[name] = _bind_all(cls, _rotary_forward)
    for cls in classes.values():
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return classes


_CLASSES: dict = {}


def register() -> None:
    """Register the OOT classes with vLLM (once per process)."""
    if _CLASSES:
        return
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot

    for name, cls in _make_classes().items():
        existing = op_registry_oot.get(name)
        if existing is not None and existing is not cls:
            raise OnpolicyVllmError(f"another plugin already replaced vLLM's {name} with {existing.__qualname__}")
        CustomOp.register_oot(cls, name=name)
        _CLASSES[name] = cls
