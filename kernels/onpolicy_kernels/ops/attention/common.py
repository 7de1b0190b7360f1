"""What both paths of the attention share: the fixed tiling (part of the bits), the refused features, the scale."""
from __future__ import annotations

import torch

KV_TILE = 64  # key positions per online-softmax step: fixed, part of the bits.
Q_TILE = 64  # query rows (positions x grouped heads) per GPU program: fixed.
KV_SPLIT = 256  # key positions per split (GPU): each split's softmax state starts fresh and
# the splits are folded in order, so the split-KV decode gives the one-pass bits. Fixed.
SPLIT_MAX_ELEMS = 1 << 24  # largest fp32 partial buffer of a split launch (64 MiB)
NUM_WARPS = 4  # fixed too: the same instructions for every call
NUM_STAGES = 2
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
# CPU path: bound the fp32 temporaries ([tokens, Hq, KV_TILE, D]); tokens are
# independent, so the chunking never changes a bit.
CPU_ELEMS = 1 << 22

_UNSUPPORTED = {
    "sliding_window": "sliding-window attention",
    "window_size": "sliding-window attention",
    "softcap": "logit soft-capping",
    "logits_soft_cap": "logit soft-capping",
    "alibi_slopes": "ALiBi",
    "sinks": "attention sinks",
    "dropout_p": "attention dropout",
    "k_scale": "quantized (fp8) KV cache",
    "v_scale": "quantized (fp8) KV cache",
}


def _is_off(name, value) -> bool:
    if value is None or value is False:
        return True
    if name in ("sliding_window", "window_size"):
        vals = value if isinstance(value, (tuple, list)) else (value,)
        return all(v is None or int(v) < 0 for v in vals)
    if name in ("softcap", "logits_soft_cap", "dropout_p"):
        return float(value) == 0.0
    if name in ("k_scale", "v_scale"):
        t = torch.as_tensor(value, dtype=torch.float64)
        return bool((t == 1.0).all())
    return False


def _reject_unsupported(kwargs: dict) -> None:
    for name, value in kwargs.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"attention() got an unexpected keyword argument {name!r}")
        if not _is_off(name, value):
            raise NotImplementedError(
                f"onpolicy attention does not support {_UNSUPPORTED[name]} ({name}={value!r}); "
                "only plain causal (or full) softmax attention is batch-invariant here"
            )


def _qk_scale(scale: float) -> float:
    """scale * log2(e) rounded to fp32 once, the same value on both paths."""
    return float(torch.tensor(float(scale) * LOG2E, dtype=torch.float32))
