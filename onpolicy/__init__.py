"""onpolicy: truly on-policy RL for LLMs.

One set of batch-invariant kernels (`onpolicy_kernels`) runs both the vLLM
sampler (through the vLLM plugin) and the trainer (`patch_model`), so sampler
and trainer logprobs are bitwise identical and their KL is exactly 0.

Names are imported lazily, so `onpolicy dashboard` starts without torch.
"""
__version__ = "0.1.0"

_LAZY = {
    "patch_model": "onpolicy.trainer",
    "unpatch_model": "onpolicy.trainer",
    "patched": "onpolicy.trainer",
    "is_patched": "onpolicy.trainer",
    "token_logprobs": "onpolicy.trainer",
    "FAMILIES": "onpolicy.families",
    "UnsupportedModelError": "onpolicy.families",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onpolicy' has no attribute {name!r}")
