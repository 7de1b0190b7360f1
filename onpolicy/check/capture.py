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
    # a Qwen3-MoE sparse block instead of the MLP: the router's gate (logits) and the block's output
    ("mlp.gate", "mlp.gate"),
    ("mlp.experts", "mlp.combine"),
)
# The MoE sub-ops between the gate and the output, recorded from onpolicy's MoE op itself (vLLM runs it
# inside one layer, so no module hook sees them): the routing (weights, then expert ids) and each
# chosen expert's output, in slot order.
MOE_STEPS = ("mlp.router", "mlp.experts")


class _MoeTap:
    """Wraps the MoE op's routing and expert steps (module functions of onpolicy_kernels.ops.moe)
    while one forward runs, and records the last token's row under each sparse layer's name."""

    def __init__(self, layers: list[int], row: int, acts: dict):
        import onpolicy_kernels.ops.moe as moe

        self.moe, self.layers, self.row, self.acts = moe, layers, row, acts
        self.n_route = self.n_experts = 0
        self.orig = (moe.moe_route, moe.expert_outputs)

    def __enter__(self):
        route, experts = self.orig

        def rec(kind, idx, t):
            if idx < len(self.layers) and t.shape[0] > self.row:
                self.acts[f"layers.{self.layers[idx]}.{kind}"] = t[self.row].detach().reshape(-1).float().cpu().clone()

        def moe_route(logits, *a, **k):
            w, ids = route(logits, *a, **k)
            rec("mlp.router", self.n_route, torch.cat([w, ids.to(torch.float32)], -1))
            self.n_route += 1
            return w, ids

        def expert_outputs(x, ids, w13, w2):
            y = experts(x, ids, w13, w2)
            rec("mlp.experts", self.n_experts, y.reshape(y.shape[0], -1))
            self.n_experts += 1
            return y

        self.moe.moe_route, self.moe.expert_outputs = moe_route, expert_outputs
        return self

    def __exit__(self, *exc):
        self.moe.moe_route, self.moe.expert_outputs = self.orig
        return False


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
    sparse = []
    for i, layer in enumerate(inner.layers):
        if getattr(getattr(layer, "mlp", None), "experts", None) is not None:
            sparse.append(i)
        for path, name in TAP_SUBMODULES:
            try:
                mod = layer.get_submodule(path)
            except AttributeError:  # a dense MLP has no gate, a sparse block no gate_up_proj
                continue
            hooks.append(mod.register_forward_hook(hook(f"layers.{i}.{name}")))
    hooks.append(inner.norm.register_forward_hook(hook("norm")))
    try:
        with _MoeTap(sparse, len(ids) - 1, acts):
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
            if getattr(m, "experts", None) is not None:  # transformers' sparse block: router, then experts
                def router_hook(name):
                    def fn(_m, _i, out):
                        logits, scores, idx = out
                        keep(name + "gate", logits)
                        keep(name + "router", torch.cat([scores.float(), idx.float()], -1))
                    return fn
                hooks += [m.gate.register_forward_hook(router_hook(p + "mlp.")),
                          m.experts.register_forward_hook(lambda _m, _i, out, n=p + "mlp.combine": keep(n, out))]
            else:
                hooks += [m.gate_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "g", 2)),
                          m.up_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "u", 2)),
                          m.down_proj.register_forward_pre_hook(pre_hook(p + "mlp.act_fn")),
                          m.down_proj.register_forward_hook(out_hook(p + "mlp.down_proj"))]
            hooks += [layer.input_layernorm.register_forward_hook(out_hook(p + "input_layernorm")),
                      a.q_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "q", 3)),
                      a.k_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "k", 3)),
                      a.v_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "v", 3)),
                      a.o_proj.register_forward_pre_hook(pre_hook(p + "self_attn.attn")),
                      a.o_proj.register_forward_hook(out_hook(p + "self_attn.o_proj")),
                      layer.post_attention_layernorm.register_forward_hook(out_hook(p + "post_attention_layernorm"))]
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
