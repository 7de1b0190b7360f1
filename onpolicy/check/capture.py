"""Where the two sides part: each sub-op's output for one sequence, recorded on both sides, and the first that differs."""
from __future__ import annotations

from typing import Optional

import torch

from .engines import vllm_model

TAP_SUBMODULES = (  # (vLLM module path under model.model.layers[i], tap name), in execution order
    ("input_layernorm", "input_layernorm"),
    ("self_attn.qkv_proj", "self_attn.qkv_proj"),
    ("self_attn.attn", "self_attn.attn"),
    ("self_attn.o_proj", "self_attn.o_proj"),
    ("post_attention_layernorm", "post_attention_layernorm"),
    ("mlp.gate_up_proj", "mlp.gate_up_proj"),
    ("mlp.act_fn", "mlp.act_fn"),
    ("mlp.down_proj", "mlp.down_proj"),
)


def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


def capture_vllm(llm, ids: list[int]) -> dict:
    """Sub-op outputs of vLLM's model for the last token of `ids` (a prefill of the whole sequence)."""
    from vllm import SamplingParams

    model = vllm_model(llm)
    acts: dict = {}
    hooks = []

    def hook(name):
        def fn(_mod, _inp, out):
            t = _first(out)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= len(ids):
                acts[name] = t[len(ids) - 1].detach().reshape(-1).cpu().clone()
        return fn

    inner = model.model
    for i, layer in enumerate(inner.layers):
        for path, name in TAP_SUBMODULES:
            mod = layer.get_submodule(path)
            hooks.append(mod.register_forward_hook(hook(f"layers.{i}.{name}")))
    hooks.append(inner.norm.register_forward_hook(hook("norm")))
    try:
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    return acts


def capture_trainer(model, ids: list[int], patched: bool) -> dict:
    """The trainer's outputs under the same names, for the last token of `ids`."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    acts: dict = {}

    def keep(name, t):
        acts[name] = t[-1].detach().reshape(-1).cpu().clone()

    with torch.no_grad():
        if patched:
            from ..trainer import forward as F

            F.packed_hidden(model.model, x, tap=lambda n, t: keep(n, t.reshape(t.shape[0], -1)))
            return acts
        hooks = []
        last = {}

        def out_hook(name):
            return lambda _m, _i, out: keep(name, _first(out)[0])

        def pre_hook(name):
            return lambda _m, inp: keep(name, inp[0][0])

        def part_hook(name, part, n):
            def fn(_m, _i, out):
                last[part] = out[0]
                if len(last) == n:
                    keep(name, torch.cat([last.pop(p) for p in sorted(last, key=("q", "k", "v", "g", "u").index)], -1))
            return fn

        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            p = f"layers.{i}."
            hooks += [layer.input_layernorm.register_forward_hook(out_hook(p + "input_layernorm")),
                      a.q_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "q", 3)),
                      a.k_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "k", 3)),
                      a.v_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "v", 3)),
                      a.o_proj.register_forward_pre_hook(pre_hook(p + "self_attn.attn")),
                      a.o_proj.register_forward_hook(out_hook(p + "self_attn.o_proj")),
                      layer.post_attention_layernorm.register_forward_hook(out_hook(p + "post_attention_layernorm")),
                      m.gate_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "g", 2)),
                      m.up_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "u", 2)),
                      m.down_proj.register_forward_pre_hook(pre_hook(p + "mlp.act_fn")),
                      m.down_proj.register_forward_hook(out_hook(p + "mlp.down_proj"))]
        hooks.append(model.model.norm.register_forward_hook(out_hook("norm")))
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
    return acts


def first_divergence(vllm_acts: dict, trainer_acts: dict) -> Optional[dict]:
    """The first sub-op (in execution order) whose outputs differ bitwise, with max |Δ|."""
    names = [n for n in vllm_acts if n in trainer_acts]
    order = {n: i for i, n in enumerate(trainer_acts)}
    names.sort(key=lambda n: order[n])
    for n in names:
        a, b = vllm_acts[n].float(), trainer_acts[n].float()
        if a.shape != b.shape:
            return {"op": n, "max_abs_diff": None, "note": f"shapes differ: vLLM {tuple(a.shape)} vs trainer {tuple(b.shape)}",
                    "identical_before": names.index(n)}
        if not torch.equal(a, b):
            return {"op": n, "max_abs_diff": float((a - b).abs().max()), "identical_before": names.index(n),
                    "compared": len(names)}
    return None


def describe_op(op: str) -> str:
    parts = op.split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]} {' '.join(parts[2:])}"
    return op
