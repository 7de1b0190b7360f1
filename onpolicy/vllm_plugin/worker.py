"""Worker subclasses: after vLLM loads the model, put the sampler on onpolicy's
kernels and audit that every compute layer of the model is onpolicy's.

The platform (config.py) swaps vLLM's default worker class for the matching
subclass here (`parallel_config.worker_cls`), in every engine flavour
(in-process, multiprocess, TRL's external_launcher). The worker also
registers the plugin in its own process (a worker process started without
onpolicy's entry points installed would otherwise build vLLM's layers), and
marks the sampler while vLLM warms the engine up with its own dummy requests.
"""
from __future__ import annotations

import contextlib
import logging

from . import compat
from .errors import OnpolicyVllmError
from .warmup import warm_up_linears

logger = logging.getLogger("vllm.onpolicy")  # child of vLLM's logger: printed with its messages

# vLLM CustomOps that may sit inside a model without doing arithmetic of their
# own on our path (RotaryEmbeddingBase owns an ApplyRotaryEmb that our forward
# never calls).
ALLOWED_VLLM_CUSTOM_OPS = {"ApplyRotaryEmb"}


class OnpolicyWorkerMixin:
    def __init__(self, *args, **kwargs):
        # This worker was chosen by onpolicy's config, so the plugin is wanted in
        # this process too: register its layers, linear config and attention
        # backend, and switch this process's platform, before any model is built.
        from . import enable

        enable()
        super().__init__(*args, **kwargs)  # type: ignore[misc]

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)  # type: ignore[misc]
        after_load(self)
        return out

    def determine_available_memory(self, *args, **kwargs):
        # Read first: vLLM's startup plan may set it inside the call, from a size without the graphs.
        fixed = getattr(getattr(self, "cache_config", None), "kv_cache_memory_bytes", None)
        with decode_graphs_paused(self):  # the profile run's sampler call: eager, nothing counted twice
            avail = super().determine_available_memory(*args, **kwargs)  # type: ignore[misc]
        return budget_decode_graphs(self, avail, fixed)

    def compile_or_warm_up_model(self, *args, **kwargs):
        warm_up_linears(self)
        # vLLM's warm-up samples its own requests with every sampling feature on
        # (0.26: SamplingParams.for_sampler_warmup(), logprobs with top-k/top-p/
        # min-p); the sampler must not refuse those.
        with sampler_warmup(getattr(self, "model_runner", None)):
            out = super().compile_or_warm_up_model(*args, **kwargs)  # type: ignore[misc]
        warm_up_decode_graphs(self)
        return out


    def onpolicy_audit(self) -> dict:
        """What a trainer in TRL's server mode asks the server through `/collective_rpc` (dev mode): this
        worker's audit (raises unless every layer and the sampler are onpolicy's) and the settings the
        trainer must match (dtype, tensor-parallel size, logprobs mode)."""
        return server_audit(self)


def server_audit(worker) -> dict:
    counts = audit_in_worker(worker)
    vc = worker.vllm_config
    from .serving import is_rl_server

    return {"onpolicy": True, "counts": counts, "dtype": str(vc.model_config.dtype).removeprefix("torch."),
            "logprobs_mode": getattr(vc.model_config, "logprobs_mode", None),
            "tensor_parallel_size": vc.parallel_config.tensor_parallel_size, "rl_server": is_rl_server(vc),
            "rank": getattr(worker, "rank", None)}


@contextlib.contextmanager
def decode_graphs_paused(worker):
    """The decode graphs (graphs.py) run eagerly inside: while vLLM profiles the engine's memory its
    profile run calls the head and the sampler, and a capture there would put the graphs' static
    buffers in the profiled peak as well as in `budget_decode_graphs`' share."""
    from . import graphs

    runner = getattr(worker, "model_runner", None)
    model = compat.runner_model(runner) if runner is not None else None
    held = graphs.installed(runner, model) if model is not None else []
    for g in held:
        g.paused = True
    try:
        yield
    finally:
        for g in held:
            g.paused = False


def budget_decode_graphs(worker, available: int, kv_cache_memory_bytes=None) -> int:
    """The KV cache's bytes less what the decode graphs' static buffers will hold (graphs.py), so the
    engine keeps to `gpu_memory_utilization` as vLLM's own graphs do; unchanged without graphs or where
    the user fixed the KV cache's size (`kv_cache_memory_bytes`, as it was before vLLM's call)."""
    from . import graphs

    runner = getattr(worker, "model_runner", None)
    if runner is None or kv_cache_memory_bytes:
        return available
    held = graphs.planned_bytes(runner, compat.runner_model(runner))
    if not held:
        return available
    if held >= available:
        raise OnpolicyVllmError(
            f"onpolicy's decode graphs need {held / 2**30:.2f} GiB and the KV cache would get "
            f"{available / 2**30:.2f} GiB: raise gpu_memory_utilization, or lower {graphs.ROWS_ENV} "
            f"(fewer rows per graph) or set {graphs.ENV}=0")
    if isinstance(getattr(worker, "available_kv_cache_memory_bytes", None), (int, float)):
        worker.available_kv_cache_memory_bytes -= held  # what vLLM's later log lines report
    logger.info("onpolicy: %.2f GiB of the KV cache's memory kept for the decode graphs' static buffers",
                held / 2**30)
    return available - held


def warm_up_decode_graphs(worker) -> None:
    """Capture the LM head's and the sampler's decode-step graphs (graphs.py), if installed,
    once vLLM has captured its own: before the engine serves, not in its first steps."""
    from . import graphs

    runner = getattr(worker, "model_runner", None)
    if runner is not None:
        graphs.warm_up(runner, compat.runner_model(runner))


@contextlib.contextmanager
def sampler_warmup(model_runner):
    """While active, the onpolicy sampler does not refuse a custom argmax-invariant logits processor with
    processed logprobs (vLLM's warm-up requests; top-k / top-p / min-p need no exemption)."""
    from .sampler import OnpolicySamplerMixin

    sampler = compat.runner_sampler(model_runner) if model_runner is not None else None
    if not isinstance(sampler, OnpolicySamplerMixin):
        yield
        return
    sampler._onpolicy_warmup = True
    try:
        yield
    finally:
        sampler._onpolicy_warmup = False


def _audit_worker(worker):
    """Check this worker's process and audit its model; returns (model runner, layer counts)."""
    runner = worker.model_runner
    model = compat.runner_model(runner)
    vllm_config = getattr(worker, "vllm_config", None)
    check_process(vllm_config)
    from .collectives import check_tp_reduction

    check_tp_reduction()
    hf_config = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    return runner, audit_model(model, hf_config)


def after_load(worker) -> None:
    runner, counts = _audit_worker(worker)
    from .sampler import install

    install(runner)
    from . import graphs

    why_not = graphs.install(runner, compat.runner_model(runner), getattr(worker, "vllm_config", None))
    logger.info("onpolicy: model audited (%s) and sampler installed; LM head and sampler %s",
                ", ".join(f"{k} {v}" for k, v in counts.items()),
                "from CUDA graphs at decode" if not why_not else f"eager ({why_not})")


def audit_in_worker(worker) -> dict[str, int]:
    """Run inside a vLLM worker (through `LLM.collective_rpc`): audit its model and sampler, return the counts."""
    from .sampler import OnpolicySamplerMixin

    runner, counts = _audit_worker(worker)
    if not isinstance(compat.runner_sampler(runner), OnpolicySamplerMixin):
        raise OnpolicyVllmError(f"the worker's sampler is {type(compat.runner_sampler(runner)).__name__}, "
                                "not onpolicy's")
    return counts


def decode_graph_stats(worker) -> dict[str, int]:
    """Run inside a vLLM worker (`LLM.collective_rpc`): graphs captured and replayed by the LM head
    and the sampler (graphs.py); empty where none were installed (they run eagerly)."""
    from .diagnostics import graphs_report

    runner = worker.model_runner
    stats = {}
    for name, g in graphs_report(runner, compat.runner_model(runner)).items():
        stats[f"{name} captures"] = g["captures"]
        stats[f"{name} replays"] = g["replays"]
    return stats


def check_process(vllm_config) -> None:
    """Raise unless this process's platform and the engine's linear config are onpolicy's."""
    import vllm.platforms as vp

    from .linear import classes
    from .platform import OnpolicyPlatformMixin

    if not isinstance(vp.current_platform, OnpolicyPlatformMixin):
        raise OnpolicyVllmError(f"the vLLM platform of this process is {type(vp.current_platform).__name__}, not "
                                "onpolicy's (call onpolicy.vllm_plugin.enable() before building the engine)")
    if vllm_config is not None and not isinstance(vllm_config.quant_config, classes()["OnpolicyQuantConfig"]):
        raise OnpolicyVllmError(f"the engine's linear config is {type(vllm_config.quant_config).__name__}, not "
                                "onpolicy's")


def audit_model(model, hf_config=None) -> dict[str, int]:
    """Raise if any compute layer of `model` is not on onpolicy's kernels.

    Two halves: (1) every layer vLLM could compute with -- anything holding a
    `quant_method`, every attention layer (its impl *and* its backend class,
    which owns the metadata builder), every CustomOp (norms, activations,
    RoPE), the LogitsProcessor -- must be ours; (2) onpolicy's layers must be
    found in the numbers the architecture has (attention, linear, norm, RoPE,
    LM head), so an audit that sees nothing (a vLLM version whose layers it
    does not recognise) fails instead of passing. Returns the counts.
    """
    from vllm.model_executor.custom_op import CustomOp
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from .attention import OnpolicyAttentionBackend, OnpolicyAttentionImpl
    from .config import supported_architectures
    from .layers import OnpolicyOp
    from .linear import classes

    from .moe import classes as moe_classes, pin_gates

    lin = classes()
    moe_method = moe_classes()["OnpolicyMoEMethod"] if pin_gates(model) else None
    arch = type(model).__name__
    if arch not in supported_architectures():
        raise OnpolicyVllmError(f"loaded model class {arch} is not supported")
    bad = []
    counts = {"attention": 0, "linear": 0, "lm_head": 0, "norm": 0, "rope": 0, "silu_and_mul": 0,
              "logits_processor": 0, "moe": 0}
    for name, m in model.named_modules():
        kind = type(m).__name__
        method = getattr(m, "quant_method", None)
        if isinstance(m, VocabParallelEmbedding):  # token embedding and LM head (ParallelLMHead)
            if not isinstance(method, lin["OnpolicyHeadMethod"]):
                bad.append(f"{name} ({kind}, method {type(method).__name__})")
        elif isinstance(m, LinearBase):
            if isinstance(method, lin["OnpolicyLinearMethod"]):
                counts["linear"] += 1
            else:
                bad.append(f"{name} ({kind}, method {type(method).__name__})")
        elif moe_method is not None and isinstance(method, moe_method):
            counts["moe"] += 1
        elif method is not None:
            bad.append(f"{name} ({kind}, method {type(method).__name__})")
        if isinstance(m, LogitsProcessor):
            if isinstance(m, lin["OnpolicyLogitsProcessor"]):
                counts["logits_processor"] += 1
            else:
                bad.append(f"{name} ({kind})")
        elif isinstance(m, AttentionLayerBase):
            impl = getattr(m, "impl", None)
            backend = m.get_attn_backend() if hasattr(m, "get_attn_backend") else getattr(m, "attn_backend", None)
            if isinstance(impl, OnpolicyAttentionImpl) and isinstance(backend, type) and issubclass(
                    backend, OnpolicyAttentionBackend):
                counts["attention"] += 1
            else:
                bad.append(f"{name} ({kind}, backend {getattr(backend, '__name__', backend)}, impl "
                           f"{type(impl).__name__})")
        elif isinstance(m, CustomOp):
            if isinstance(m, OnpolicyOp):
                key = {"OnpolicyRMSNorm": "norm", "OnpolicySiluAndMul": "silu_and_mul"}.get(kind, "rope")
                counts[key] += 1
            elif kind not in ALLOWED_VLLM_CUSTOM_OPS:
                bad.append(f"{name} ({kind})")
    head = getattr(model, "lm_head", None)  # a ParallelLMHead, or the token embedding itself when tied (0.26)
    if isinstance(head, VocabParallelEmbedding) and isinstance(getattr(head, "quant_method", None),
                                                                lin["OnpolicyHeadMethod"]):
        counts["lm_head"] = 1
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise OnpolicyVllmError(f"these layers are not on onpolicy's kernels: {shown}")
    check_counts(counts, hf_config if hf_config is not None else getattr(model, "config", None))
    return counts


def sparse_layers(hf_config) -> list[int]:
    """The layers of a Qwen3-MoE config that are sparse MoE blocks (the others are dense MLPs)."""
    n = hf_config.num_hidden_layers
    if not getattr(hf_config, "num_experts", 0):
        return []
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


def check_counts(counts: dict[str, int], hf_config) -> None:
    """The layers a Qwen2/Qwen3/Llama/Qwen3-MoE decoder of `hf_config` has must all have been found as onpolicy's."""
    n = getattr(hf_config, "num_hidden_layers", None)
    if not n:
        raise OnpolicyVllmError("cannot audit the model: its config has no num_hidden_layers")
    from onpolicy.families import FAMILIES

    fam = FAMILIES.get(getattr(hf_config, "model_type", ""))
    qk_norm = 2 * n if fam is not None and fam.qk_norm else 0
    sparse = len(sparse_layers(hf_config)) if fam is not None and fam.moe else 0
    expected = {
        "attention": n,
        # qkv, o per layer; gate_up, down per dense MLP; the router gate per MoE layer
        "linear": 2 * n + 2 * (n - sparse) + sparse,
        "norm": 2 * n + 1 + qk_norm,  # input + post-attention per layer, final; Qwen3 q/k norms
        "silu_and_mul": n - sparse,
        "moe": sparse,
        "rope": 1,  # at least one (vLLM shares one RoPE module between layers)
        "lm_head": 1,
        "logits_processor": 1,
    }
    short = {k: (counts.get(k, 0), v) for k, v in expected.items()
             if (counts.get(k, 0) < v if k == "rope" else counts.get(k, 0) != v)}
    if short:
        desc = ", ".join(f"{k}: found {got} of onpolicy's, expected {want}" for k, (got, want) in short.items())
        raise OnpolicyVllmError(f"the audit did not find every layer on onpolicy's kernels ({desc}); this vLLM "
                                "version builds the model differently from what onpolicy knows")


_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    bases = {"OnpolicyCPUWorker": compat.CPU_WORKER, "OnpolicyGPUWorker": compat.GPU_WORKER}
    if name in bases:
        if name not in _CLASSES:
            base = compat.base_worker_class(bases[name])
            cls = type(name, (OnpolicyWorkerMixin, base), {"__module__": __name__})
            cls.__qualname__ = name
            _CLASSES[name] = cls
        return _CLASSES[name]
    raise AttributeError(name)
