"""LoRA adapters (PEFT) on onpolicy's kernels: the trainer runs the weight vLLM is sent.

vLLM runs no adapter: at every weight sync TRL merges the adapter into the base weights
(`PeftModel.merge_adapter`), sends the merged weights under the base names, and unmerges. So the
sampler computes `linear(x, W')` with one merged matrix W', while PEFT's own forward computes
`x W^T + s * B(A(x))` -- the same function, other bits. Here the trainer's patched forward
multiplies by W' too, computed by `merged_weight` from the base weight and the adapter, with
autograd reaching A and B only (the base is frozen); and the sync computes W' with the same function
(`install_exact_merge`), out of place: PEFT's merge adds the delta into the base weight and its
unmerge subtracts it again, and in bf16 `(W + d) - d` is not W, so every sync would move the frozen
base weights a little. With `install_exact_merge` the merge swaps in a new tensor and the unmerge puts
the original one back: the base weights keep their bits for the whole run.

Supported: plain LoRA on the projections the patched forward reads (q/k/v/o, gate/up/down, a MoE
router), one active adapter, any rank / alpha / rsLoRA / rank and alpha patterns. `check_lora_config`
and `check_lora_model` refuse the rest with the fix.
"""
from __future__ import annotations

import dataclasses
import types

import torch

# The modules whose weight the patched forward reads (forward.py, merged.py): a LoRA layer elsewhere
# would be ignored by the trainer while vLLM receives it merged.
SUPPORTED_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate")


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A, rounded once to W's dtype (the delta and the sum in float32).

    The one definition of the merged weight: the weight sync sends it to vLLM and the trainer's
    forward multiplies by it, so both run the same bits. Differentiable in A and B."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return (weight.float() + delta).to(weight.dtype)


def is_lora_layer(module: torch.nn.Module) -> bool:
    return "lora_A" in module._modules


def _active(module) -> str | None:
    names = [a for a in module.active_adapters if a in module.lora_A]
    if len(names) > 1:
        raise NotImplementedError(f"onpolicy runs one active LoRA adapter per layer, this one has {names}")
    return names[0] if names else None


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """The weight a linear module multiplies by: its own, or for a LoRA layer the merged weight (the
    base weight while the adapter is disabled, as for TRL's reference pass, or already merged in)."""
    if not is_lora_layer(module):
        return module.weight
    base = module.get_base_layer().weight
    if module.disable_adapters:
        if module.merged:  # as PEFT's forward does: a disabled adapter is unmerged first
            module.unmerge()
        return base
    name = None if module.merged else _active(module)
    if name is None:
        return base
    return merged_weight(base, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])


def _exact_merge(self, safe_merge: bool = False, adapter_names=None) -> None:
    """`LoraLayer.merge`, out of place: the base weight becomes a new tensor holding `merged_weight`;
    the original tensor is kept for `_exact_unmerge`, untouched."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
    if not names:
        return
    if len(names) > 1 or self.merged:
        raise NotImplementedError(f"onpolicy merges one LoRA adapter per layer, got {names} "
                                  f"(merged already: {self.merged_adapters})")
    (name,) = names
    w = self.get_base_layer().weight
    self._onpolicy_unmerged = w.data
    with torch.no_grad():
        merged = merged_weight(w.data, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
    if safe_merge and not torch.isfinite(merged).all():
        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
    w.data = merged
    self.merged_adapters.append(name)


def _exact_unmerge(self) -> None:
    """`LoraLayer.unmerge`: the base weight gets its original tensor back (bit for bit)."""
    if not self.merged:
        return
    self.get_base_layer().weight.data = self.__dict__.pop("_onpolicy_unmerged")
    self.merged_adapters.clear()


def lora_layers(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if is_lora_layer(m)]


def install_exact_merge(model: torch.nn.Module) -> int:
    """Make every LoRA layer of `model` merge with `merged_weight`, out of place (see the module
    docstring); TRL's sync calls these through `merge_adapter` / `unmerge_adapter`. Returns the number of
    layers."""
    layers = lora_layers(model)
    for _, m in layers:
        if m.merged:
            raise ValueError("install_exact_merge on a model whose adapter is merged: unmerge it first")
        m.merge = types.MethodType(_exact_merge, m)
        m.unmerge = types.MethodType(_exact_unmerge, m)
    return len(layers)


# LoraConfig fields that would change the layer's function (or where it is applied) beyond W + s*B@A
def check_lora_config(peft_config, disable_dropout: bool) -> list[str]:
    """The problems of a PEFT config for onpolicy (empty: supported), each naming the fix."""
    from peft import LoraConfig

    if not isinstance(peft_config, LoraConfig):
        return [f"peft_config is a {type(peft_config).__name__}: onpolicy supports LoRA adapters "
                "(peft.LoraConfig) only, whose weights TRL merges for vLLM; use a LoraConfig"]
    c, problems = peft_config, []
    variants = [f.name for f in dataclasses.fields(c)
                if f.metadata.get("is_lora_variant") and getattr(c, f.name, None)]
    for f in dataclasses.fields(c):
        if c.init_lora_weights is not None and c.init_lora_weights in f.metadata.get("lora_variants", ()):
            variants.append(f"init_lora_weights={c.init_lora_weights!r}")
    if variants:
        problems.append(f"LoRA variant(s) {', '.join(variants)} (e.g. DoRA): their layers compute more than "
                        "W + scaling * B @ A, which onpolicy's merged forward computes; use plain LoRA "
                        "(use_dora=False, ...)")
    if c.lora_dropout and not disable_dropout:
        problems.append(f"lora_dropout={c.lora_dropout} with disable_dropout=False: the trainer would drop adapter "
                        "inputs that the sampler's merged weights always include; set lora_dropout=0.0 or "
                        "GRPOConfig(disable_dropout=True)")
    if getattr(c, "lora_bias", False):
        problems.append("lora_bias=True: not supported (the merge would change the base bias); set lora_bias=False")
    if c.fan_in_fan_out:
        problems.append("fan_in_fan_out=True (Conv1D layers): not supported; onpolicy's families use nn.Linear")
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters", "layer_replication"):
        if getattr(c, key, None):
            problems.append(f"{key}={getattr(c, key)!r}: not supported (the trainer's forward reads only the "
                            "projections' LoRA layers); remove it")
    return problems


def check_lora_model(model: torch.nn.Module) -> list[str]:
    """The problems of a built PEFT model: LoRA layers the patched forward would not read, other tuner
    layers, several active adapters."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    problems = []
    for name, m in model.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        if not isinstance(m, LoraLinear):
            problems.append(f"{name}: a {type(m).__module__}.{type(m).__name__} adapter layer (onpolicy supports "
                            "LoRA on linear projections only); remove it from target_modules")
        elif not name.endswith(SUPPORTED_SUFFIXES):
            problems.append(f"{name}: LoRA on a module the trainer's forward does not read as a projection "
                            f"(supported: {', '.join(SUPPORTED_SUFFIXES)}); remove it from target_modules")
        elif len([a for a in m.active_adapters if a in m.lora_A]) > 1:
            problems.append(f"{name}: several active adapters {m.active_adapters}; activate one")
        elif m.lora_variant:
            problems.append(f"{name}: a LoRA variant ({', '.join(getattr(v, '__name__', type(v).__name__) for v in m.lora_variant.values())})"
                            "; use plain LoRA")
    return problems
