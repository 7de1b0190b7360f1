"""onpolicy: truly on-policy RL for LLMs.

One set of batch-invariant kernels (`onpolicy_kernels`) runs both the vLLM
sampler (through the vLLM plugin) and the trainer (`patch_model`), so sampler
and trainer logprobs are bitwise identical and their KL is exactly 0.
"""
__version__ = "0.1.0"

from .families import FAMILIES, UnsupportedModelError  # noqa: E402
from .trainer import is_patched, patch_model, patched, token_logprobs, unpatch_model  # noqa: E402

__all__ = ["patch_model", "unpatch_model", "patched", "is_patched", "token_logprobs", "FAMILIES",
           "UnsupportedModelError"]
