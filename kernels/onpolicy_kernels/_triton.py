"""Optional Triton import: the CPU path works without it."""
from __future__ import annotations

import functools

import torch

try:  # pragma: no cover - import guard
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # noqa: BLE001
    triton = None
    tl = None
    HAS_TRITON = False


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            "the Triton path of onpolicy_kernels needs `triton` (pip install 'onpolicy[gpu]'); "
            "on a CPU machine set ONPOLICY_KERNELS_BACKEND=cpu or leave it unset"
        )


def jit(fn):
    """triton.jit when Triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
