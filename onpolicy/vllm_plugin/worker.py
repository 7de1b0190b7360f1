"""Worker subclasses: after vLLM loads the model, put the sampler on onpolicy's
kernels and audit that every compute layer of the model is onpolicy's.

The platform (config.py) swaps vLLM's default worker class for the matching
subclass here (`parallel_config.worker_cls`), in every engine flavour
(in-process, multiprocess, TRL's external_launcher).
"""
from __future__ import annotations

import logging

from . import compat
from .errors import OnpolicyVllmError

logger = logging.getLogger("vllm.onpolicy")  # child of vLLM's logger: printed with its messages

# vLLM CustomOps that may sit inside a model without doing arithmetic of their
# own on our path (RotaryEmbeddingBase owns an ApplyRotaryEmb that our forward
# never calls).
ALLOWED_VLLM_CUSTOM_OPS = {"ApplyRotaryEmb"}


class OnpolicyWorkerMixin:
    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)  # type: ignore[misc]
        after_load(self)
        return out


def after_load(worker) -> None:
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    audit_model(model)
    from .sampler import install

    install(runner)
    logger.info("onpolicy: model audited and sampler installed")


def audit_model(model) -> None:
    """Raise if any compute layer of `model` is not on onpolicy's kernels."""
    from vllm.model_executor.custom_op import CustomOp
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from .attention import OnpolicyAttentionImpl
    from .config import supported_architectures
    from .layers import OnpolicyOp
    from .linear import classes

    lin = classes()
    arch = type(model).__name__
    if arch not in supported_architectures():
        raise OnpolicyVllmError(f"loaded model class {arch} is not supported")
    bad = []
    for name, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, ParallelLMHead):
            if not isinstance(m.quant_method, lin["OnpolicyHeadMethod"]):
                bad.append(f"{name} ({kind}, method {type(m.quant_method).__name__})")
        elif isinstance(m, LinearBase):
            if not isinstance(m.quant_method, lin["OnpolicyLinearMethod"]):
                bad.append(f"{name} ({kind}, method {type(m.quant_method).__name__})")
        elif isinstance(m, LogitsProcessor):
            if not isinstance(m, lin["OnpolicyLogitsProcessor"]):
                bad.append(f"{name} ({kind})")
        elif isinstance(m, Attention):
            if not isinstance(m.impl, OnpolicyAttentionImpl):
                bad.append(f"{name} (attention impl {type(m.impl).__name__})")
        elif isinstance(m, CustomOp) and not isinstance(m, OnpolicyOp) and kind not in ALLOWED_VLLM_CUSTOM_OPS:
            bad.append(f"{name} ({kind})")
    if bad:
        shown = "; ".join(bad[:8]) + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise OnpolicyVllmError(f"these layers are not on onpolicy's kernels: {shown}")


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
