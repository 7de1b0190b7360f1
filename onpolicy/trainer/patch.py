"""`patch_model` / `unpatch_model`: put a transformers causal LM on onpolicy's kernels.

Patching swaps the forward of the base model, of each decoder layer, attention
and MLP block, and of the LM head, on this model instance only (the classes
are untouched), and stores the rotary cache the vLLM adapter also uses.
`unpatch_model` restores every original forward. `patched(model)` does both as
a context manager and nests. The module names are the same for every family in
onpolicy.families, so one patch serves them all.
"""
from __future__ import annotations

import contextlib
import types

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


def patch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Patch `model` in place (idempotent: patching twice is a no-op); returns it."""
    state = getattr(model, _STATE, None)
    if state is not None:
        state["depth"] += 1
        return model
    fam = check_supported(model.config, next(model.parameters()).dtype)
    base, head = _parts(model)
    cache = cos_sin_cache_for(model.config).to(next(model.parameters()).device)
    saved: list = []
    _bind(base, F.base_model_forward, saved)
    _bind(head, F.lm_head_forward, saved)
    for layer in base.layers:
        _bind(layer, F.layer_forward, saved)
        _bind(layer.mlp, F.mlp_forward, saved)
        attn = layer.self_attn
        if fam.qk_norm != (getattr(attn, "q_norm", None) is not None):
            raise TypeError(f"{fam.name} attention module does not have the expected q/k norm layout")
        attn._onpolicy_cos_sin = cache
        saved.append((attn, None))  # marks the cache attribute for removal
    object.__setattr__(model, _STATE, {"saved": saved, "depth": 1, "family": fam})
    return model


def unpatch_model(model: torch.nn.Module, force: bool = False) -> torch.nn.Module:
    """Undo one `patch_model` (all of them with force=True); restores the original forwards."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    state["depth"] -= 1
    if state["depth"] > 0 and not force:
        return model
    for module, fwd in reversed(state["saved"]):
        if hasattr(module, "_onpolicy_cos_sin"):
            del module._onpolicy_cos_sin
        if "forward" in module.__dict__:
            del module.forward
        if fwd is not None:
            module.forward = fwd
    object.__delattr__(model, _STATE)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module):
    """`with patched(model): ...` runs the model on onpolicy's kernels, restoring it after (nests)."""
    patch_model(model)
    try:
        yield model
    finally:
        unpatch_model(model)
