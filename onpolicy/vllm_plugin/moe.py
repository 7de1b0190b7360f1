"""vLLM's fused MoE layer on `onpolicy_kernels`' MoE op, weights kept loadable.

Mechanism: the same "onpolicy" quantization config as the linears (linear.py). Its
`get_quant_method` hands each routed-experts layer (vLLM 0.32: `RoutedExperts`, built by
`FusedMoEFactory` for Qwen3-MoE) an `OnpolicyMoEMethod`:

* `create_weights` registers vLLM's unquantized layout, `w13_weight` [E, 2I, H] (gate rows, then
  up rows) and `w2_weight` [E, H, I], with the layer's `weight_loader`, so checkpoint loading and
  TRL's `load_weights` sync write into them; `process_weights_after_loading` keeps them as they
  are (no CPU pre-packing, no re-layout);
* it is *monolithic*: vLLM's runner hands it the router logits instead of routing with its own
  top-k, and `apply_monolithic` runs `moe_route` (top-k softmax, `norm_topk_prob`, lower index
  wins a tie) and `moe_experts` (per-expert invariant linear / SiLU-mul, fp32 slot-order
  combine) -- the op the trainer's patched `Qwen3MoeSparseMoeBlock` runs.

The router logits come from the MoE block's `GateLinear`, a `ReplicatedLinear` whose method is
onpolicy's linear; `pin_gates` (called by the post-load audit) switches off GateLinear's
specialised GPU GEMM tiers so that it always reaches that method, and checks it does.
Supported: top-k softmax routing without grouping, score bias, routed scaling or expert bias,
SiLU experts, no shared expert, no expert parallelism, tensor_parallel_size 1.
"""
from __future__ import annotations

import onpolicy_kernels
import torch

from . import compat
from .errors import OnpolicyVllmError


def check_layer(layer) -> None:
    """Raise naming what this MoE layer asks for that onpolicy's op does not compute."""
    moe = getattr(layer, "moe_config", None) or getattr(layer, "moe", None)
    problems = []

    def attr(name, default=None):
        return getattr(layer, name, default)

    if attr("use_grouped_topk", False):
        problems.append("grouped top-k routing")
    if attr("scoring_func", "softmax") != "softmax":
        problems.append(f"scoring_func {attr('scoring_func')!r}")
    if attr("custom_routing_function") is not None:
        problems.append("a custom routing function")
    if attr("e_score_correction_bias") is not None:
        problems.append("an expert score correction bias")
    if float(attr("routed_scaling_factor", 1.0) or 1.0) != 1.0:
        problems.append(f"routed_scaling_factor {attr('routed_scaling_factor')}")
    if attr("apply_router_weight_on_input", False):
        problems.append("router weights applied on the input")
    if any(attr(n) is not None for n in ("swiglu_limit", "swiglu_alpha", "swiglu_beta")):
        problems.append("a clamped / scaled SwiGLU")
    if moe is not None:
        act = getattr(getattr(moe, "activation", None), "value", getattr(moe, "activation", "silu"))
        if str(act).lower() not in ("silu", "moeactivation.silu"):
            problems.append(f"expert activation {act!r}")
        if getattr(moe, "has_bias", False):
            problems.append("expert biases")
        pc = getattr(moe, "moe_parallel_config", None)
        if pc is not None and (getattr(pc, "use_ep", False) or getattr(pc, "ep_size", 1) != 1):
            problems.append("expert parallelism")
        if pc is not None and getattr(pc, "tp_size", 1) != 1:
            problems.append(f"tensor_parallel_size {pc.tp_size} (MoE is supported at tensor_parallel_size=1)")
        if pc is not None and (getattr(pc, "dp_size", 1) != 1 or getattr(pc, "pcp_size", 1) != 1):
            problems.append("data / context parallelism inside the MoE")
        if getattr(moe, "num_experts", None) != getattr(moe, "num_local_experts", getattr(moe, "num_experts", None)):
            problems.append("experts split across ranks")
    if problems:
        raise OnpolicyVllmError("this MoE layer is not supported by onpolicy: " + "; ".join(problems) + ". onpolicy "
                                "supports Qwen3-MoE: top-k softmax routing (norm_topk_prob either way), SiLU experts, "
                                "no shared expert, tensor_parallel_size=1, no expert parallelism")


def _make_classes() -> dict[str, type]:
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.utils import set_weight_attrs

    class OnpolicyMoEMethod(FusedMoEMethodBase):
        """vLLM's unquantized expert weights, routed and computed by onpolicy's MoE op."""

        def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                           params_dtype: torch.dtype, **extra_weight_attrs):
            check_layer(layer)
            extra_weight_attrs.pop("unpadded_hidden_size", None)
            extra_weight_attrs.pop("global_num_experts", None)
            I, H = intermediate_size_per_partition, hidden_size
            for name, shape in (("w13_weight", (num_experts, 2 * I, H)), ("w2_weight", (num_experts, H, I))):
                p = torch.nn.Parameter(torch.empty(*shape, dtype=params_dtype), requires_grad=False)
                layer.register_parameter(name, p)
                set_weight_attrs(p, extra_weight_attrs)
                p.weight_loader_numel = p.numel()

        def process_weights_after_loading(self, layer) -> None:
            # Keep w13/w2 as loaded: a later weight sync writes into them and is used as is.
            return None

        def get_fused_moe_quant_config(self, layer):
            return None

        @property
        def is_monolithic(self) -> bool:
            return True

        @property
        def supports_eplb(self) -> bool:
            return False

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            raise OnpolicyVllmError("onpolicy's MoE method routes itself (monolithic); vLLM called its modular "
                                    "path with precomputed top-k, which would bypass onpolicy's router")

        def apply_monolithic(self, layer, x: torch.Tensor, router_logits: torch.Tensor, input_ids=None):
            if router_logits is None or router_logits.shape != (x.shape[0], layer.w13_weight.shape[0]):
                raise OnpolicyVllmError(f"MoE router logits of shape {getattr(router_logits, 'shape', None)} for "
                                        f"{x.shape[0]} tokens and {layer.w13_weight.shape[0]} experts")
            return onpolicy_kernels.moe_routed(x, router_logits, layer.w13_weight, layer.w2_weight, layer.top_k,
                                               bool(layer.renormalize), check_finite=False)  # warm-up feeds garbage

    return {"OnpolicyMoEMethod": OnpolicyMoEMethod}


classes, __getattr__ = compat.lazy_classes(__name__, _make_classes, ("OnpolicyMoEMethod",))


def quant_method_for(layer, prefix: str):
    """An OnpolicyMoEMethod for a routed-experts layer, else None (called from the quant config)."""
    kinds = compat.moe_layer_classes()
    if not kinds or not isinstance(layer, kinds):
        return None
    moe = getattr(layer, "moe_config", None) or getattr(layer, "moe", None)
    if moe is None:
        raise OnpolicyVllmError(f"MoE layer {prefix} ({type(layer).__name__}) has no moe config that onpolicy knows")
    return classes()["OnpolicyMoEMethod"](moe)


GATE_TIERS = ("allow_ll_bf16_gemm", "allow_fp32_router_gemm", "allow_bf16x3_router_gemm",
              "allow_cublas_router_gemm", "allow_rocm_bf16x3_router_gemm", "allow_specialized_router_gemm")


def pin_gates(model) -> int:
    """Make every MoE runner's gate compute on onpolicy's linear; returns the number of MoE layers.

    vLLM's GateLinear may bypass its linear method for specialised GPU GEMMs (cuBLAS bf16->fp32,
    cuteDSL, ...); those flags are switched off here, and its method must be onpolicy's. Raises on
    an MoE layer without such a gate, or on a runner that fuses the gate with a shared-expert gate."""
    from .linear import classes as linear_classes

    lin = linear_classes()["OnpolicyLinearMethod"]
    kinds = compat.moe_layer_classes()
    n = 0
    for name, m in model.named_modules():
        routed = getattr(m, "routed_experts", None)
        if routed is None or not kinds or not isinstance(routed, kinds):
            continue
        gate = getattr(m, "gate", None)
        if gate is None or not isinstance(getattr(gate, "quant_method", None), lin):
            raise OnpolicyVllmError(f"MoE layer {name}: its router gate is not on onpolicy's linear "
                                    f"({type(gate).__name__ if gate is not None else 'no gate held by the runner'})")
        if getattr(m, "_fse_fuse_gate", False) or getattr(m, "shared_expert_gate", None) is not None:
            raise OnpolicyVllmError(f"MoE layer {name}: shared experts are not supported")
        for flag in GATE_TIERS:
            if getattr(gate, flag, False):
                setattr(gate, flag, False)
        if getattr(gate, "out_dtype", None) not in (None, torch.float32):
            raise OnpolicyVllmError(f"MoE layer {name}: router logits in {gate.out_dtype} (onpolicy's router reads "
                                    "the gate's model-dtype output, or its exact fp32 cast)")
        n += 1
    return n
