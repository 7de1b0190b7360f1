"""Trainer side: transformers models on onpolicy's kernels."""
from .logprobs import token_logprobs
from .patch import is_patched, patch_model, patched, unpatch_model

__all__ = ["patch_model", "unpatch_model", "patched", "is_patched", "token_logprobs"]
