"""The onpolicy vLLM plugin: vLLM runs the model on onpolicy's batch-invariant kernels.

With the plugin enabled, every RMSNorm (plain and fused with the residual add),
SiLU-mul, rotary embedding, linear layer (QKV, gate/up, o, down, LM head) and the
attention of a supported model run on `onpolicy_kernels`, and the sampler's
logprobs come from `onpolicy_kernels.log_softmax` -- the same kernels the trainer
(`onpolicy.token_logprobs`) runs, so sampler and trainer logprobs are bitwise
equal. Supported: Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM, unquantized, on one GPU
(or the CPU) or with tensor_parallel_size 2, 4 or 8 (the trainer mirrors the sharded
reductions: patch_model(..., tensor_parallel_size=N); at 4 and 8 the all-reduce becomes a
rank-order sum, collectives.py). Anything else fails when the engine is built.

Enable it with the environment variable ``ONPOLICY_VLLM=1`` (read by both entry
points, so child processes inherit it), or call `enable()` before ``LLM(...)``.
Entry points (pyproject):

    [project.entry-points."vllm.general_plugins"]   onpolicy = "onpolicy.vllm_plugin:register"
    [project.entry-points."vllm.platform_plugins"]  onpolicy = "onpolicy.vllm_plugin.platform:detect"

Without the platform entry point the plugin still works in-process (vLLM's
in-process engine, TRL colocate): `register()` switches the already-resolved
platform object to onpolicy's subclass. See docs/vllm-adapter-design.md.
"""
from __future__ import annotations

import logging
import os

from .errors import OnpolicyVllmError

ENV_VAR = "ONPOLICY_VLLM"

logger = logging.getLogger("vllm.onpolicy")  # child of vLLM's logger: printed with its messages
_registered = False


def is_enabled() -> bool:
    """Whether the plugin is switched on in this process (``ONPOLICY_VLLM=1`` or `enable()`)."""
    # Read here, not through onpolicy_kernels.envs: every vLLM process calls this through the entry
    # point, and importing the kernels (torch, their custom ops) where the plugin is off is what
    # "inert" rules out. The same reading as envs.ONPOLICY_VLLM.
    return os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """vLLM general-plugin entry point. Idempotent; does nothing unless enabled.

    Registers the OOT layers (RMSNorm, SiluAndMul, RotaryEmbedding,
    LogitsProcessor), the "onpolicy" quantization config (the linear method) and
    the CUSTOM attention backend, and makes sure the platform is onpolicy's.
    """
    global _registered
    if not is_enabled() or _registered:
        return
    from . import attention, layers, linear, platform

    layers.register()
    linear.register()
    attention.register()
    platform.ensure_active()
    _registered = True
    logger.info("onpolicy vLLM plugin registered (batch-invariant kernels for sampler == trainer)")


def enable() -> None:
    """Switch the plugin on for this process and its children, then register it.

    Call before building ``LLM(...)``. Safe to call more than once.
    """
    os.environ[ENV_VAR] = "1"
    register()


def is_registered() -> bool:
    return _registered


def verify(llm) -> dict:
    """Raise unless the in-process engine `llm` runs entirely on onpolicy.

    Checks the platform, the engine's linear config, audits every layer of the
    model (worker.audit_model) and that the sampler is onpolicy's. Returns the
    layer counts. Scripts call it right after ``LLM(...)``: it turns "plugin
    silently not loaded" (e.g. ``ONPOLICY_VLLM=1`` set but no entry points
    installed and `enable()` never called) into an error.
    """
    from . import compat, sampler, worker

    if not _registered:
        raise OnpolicyVllmError("the plugin is not registered in this process: call onpolicy.vllm_plugin.enable() "
                                "before LLM(...) (ONPOLICY_VLLM=1 alone needs the entry points installed)")
    engine = llm.llm_engine
    worker.check_process(getattr(engine, "vllm_config", None))
    if compat.engine_runner(llm) is None:  # workers in other processes (tensor parallel, multiprocess engine)
        per_rank = llm.collective_rpc(worker.audit_in_worker)
        if not per_rank or any(not isinstance(c, dict) for c in per_rank):
            raise OnpolicyVllmError(f"the engine's workers did not report an onpolicy audit: {per_rank!r}")
        if any(c != per_rank[0] for c in per_rank):
            raise OnpolicyVllmError(f"the engine's workers report different layer counts: {per_rank!r}")
        return per_rank[0]
    model = compat.engine_model(llm)
    counts = worker.audit_model(model, getattr(getattr(engine, "model_config", None), "hf_config", None))
    runner = compat.engine_runner(llm)
    if runner is not None and not isinstance(compat.runner_sampler(runner), sampler.OnpolicySamplerMixin):
        raise OnpolicyVllmError(f"the engine's sampler is {type(compat.runner_sampler(runner)).__name__}, "
                                "not onpolicy's")
    return counts


__all__ = ["register", "enable", "is_enabled", "is_registered", "verify", "OnpolicyVllmError", "ENV_VAR"]
