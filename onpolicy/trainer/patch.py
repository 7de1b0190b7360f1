"""`patch_model` / `unpatch_model`: put a transformers causal LM on onpolicy's kernels.

Patching swaps the forward of the base model, of each decoder layer, attention
and MLP block, and of the LM head, on this model instance only (the classes
are untouched), and stores the rotary cache the vLLM adapter also uses.
`unpatch_model` restores every original forward. Patches nest: patching an
already patched model counts one more level, and each `unpatch_model` undoes one
(the forwards come back with the last; `unpatch_model(model, force=True)` undoes
all at once). `patched(model)` does both as a context manager. The module names are the same for every family in
onpolicy.families, so one patch serves them all.
"""
from __future__ import annotations

import contextlib
import types
from typing import Optional

import torch

from ..families import check_supported, cos_sin_cache_for
from . import forward as F

_STATE = "_onpolicy_patch_state"


def _bind(module: torch.nn.Module, fn, saved: list) -> None:
    saved.append((module, module.__dict__.get("forward")))
    module.forward = types.MethodType(fn, module)


def is_patched(model: torch.nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


def _parts(model):
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    if base is None or head is None or not hasattr(base, "layers"):
        raise TypeError(
            f"{type(model).__name__} is not a causal LM with .model.layers and .lm_head; "
            "pass the *ForCausalLM model (e.g. Qwen3ForCausalLM)"
        )
    return base, head


def patch_model(model: torch.nn.Module, tensor_parallel_size: Optional[int] = None) -> torch.nn.Module:
    """Patch `model` in place; returns it.

    Patching an already patched model changes nothing but a nesting count: the
    model stays patched until `unpatch_model` was called once per `patch_model`
    (or once with force=True).

    tensor_parallel_size: the vLLM engine's tensor-parallel size the forward
    must mirror (1, 2, 4 or 8; see forward.row_parallel_linear). None keeps the size
    of an enclosing patch, else 1.
    """
    state = getattr(model, _STATE, None)
    if state is not None:
        if tensor_parallel_size is not None and tensor_parallel_size != state["tp"]:
            raise ValueError(f"the model is already patched for tensor_parallel_size={state['tp']}; unpatch it "
                             f"before patching for {tensor_parallel_size}")
        state["depth"] += 1
        return model
    tp = F.check_tp(1 if tensor_parallel_size is None else tensor_parallel_size)
    fam = check_supported(model.config, next(model.parameters()).dtype)
    F.check_tp_shape(model.config, tp)
    base, head = _parts(model)
    cache = cos_sin_cache_for(model.config).to(next(model.parameters()).device)
    for layer in base.layers:  # before anything is bound: a refused model stays as it was
        if F.is_moe_block(layer.mlp):
            _check_moe_block(layer.mlp, tp)
    saved: list = []
    attrs: list = [(base, "_onpolicy_tp")]  # attributes set on modules, removed by unpatch
    base._onpolicy_tp = tp
    _bind(base, F.base_model_forward, saved)
    _bind(head, F.lm_head_forward, saved)
    for layer in base.layers:
        _bind(layer, F.layer_forward, saved)
        if F.is_moe_block(layer.mlp):
            _bind(layer.mlp, F.moe_block_forward, saved)
        else:
            _bind(layer.mlp, F.mlp_forward, saved)
        attn = layer.self_attn
        if fam.qk_norm != (getattr(attn, "q_norm", None) is not None):
            raise TypeError(f"{fam.name} attention module does not have the expected q/k norm layout")
        attn._onpolicy_cos_sin = cache
        attrs.append((attn, "_onpolicy_cos_sin"))
    object.__setattr__(model, _STATE, {"saved": saved, "attrs": attrs, "depth": 1, "family": fam,
                                     "tp": tp})
    return model


def _check_moe_block(block, tp: int) -> None:
    """Refuse a sparse-MoE block that onpolicy's MoE op does not compute exactly as vLLM's layer does."""
    experts, gate = block.experts, block.gate
    problems = []
    if tp != 1:
        problems.append(f"tensor_parallel_size={tp} (MoE is mirrored for tensor_parallel_size=1 only)")
    if getattr(block, "shared_expert", None) is not None:
        problems.append("a shared expert")
    if getattr(experts, "is_transposed", False) or not getattr(experts, "has_gate", True):
        problems.append("transposed or gate-less expert weights")
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        problems.append("expert biases")
    if getattr(gate, "bias", None) is not None:
        problems.append("a router bias")
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj") or not hasattr(gate, "top_k"):
        problems.append(f"an unknown MoE block layout ({type(block).__name__})")
    if problems:
        raise TypeError("onpolicy supports Qwen3-MoE sparse blocks (top-k softmax router, routed experts with "
                        "fused gate_up_proj [E, 2I, H] / down_proj [E, H, I], no shared expert, no biases) at "
                        "tensor_parallel_size=1; this model has " + "; ".join(problems))


def unpatch_model(model: torch.nn.Module, force: bool = False) -> torch.nn.Module:
    """Undo one level of `patch_model` (all of them with force=True).

    The original forwards come back when the last level is undone: after
    patch_model twice, the first unpatch_model leaves the model patched. A
    model that is not patched is returned unchanged."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    state["depth"] -= 1
    if state["depth"] > 0 and not force:
        return model
    for module, attr in state["attrs"]:
        if attr in module.__dict__:
            delattr(module, attr)
    for module, fwd in reversed(state["saved"]):
        if "forward" in module.__dict__:
            del module.forward
        if fwd is not None:
            module.forward = fwd
    object.__delattr__(model, _STATE)
    return model


def tensor_parallel_size(model: torch.nn.Module) -> int:
    """The tensor-parallel size a patched model mirrors (1 when not patched)."""
    state = getattr(model, _STATE, None)
    return 1 if state is None else state["tp"]


@contextlib.contextmanager
def patched(model: torch.nn.Module, tensor_parallel_size: Optional[int] = None):
    """`with patched(model): ...` runs the model on onpolicy's kernels, restoring it after (nests)."""
    patch_model(model, tensor_parallel_size)
    try:
        yield model
    finally:
        unpatch_model(model)
