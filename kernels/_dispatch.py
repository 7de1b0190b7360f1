"""Where an op runs: the Triton path on CUDA tensors, the CPU path elsewhere.

`ONPOLICY_KERNELS_BACKEND=triton` forces the Triton path on CPU tensors too (with
`TRITON_INTERPRET=1`, for testing the GPU kernels on a CPU machine);
`ONPOLICY_KERNELS_BACKEND=cpu` forces the portable path. The two paths are each
batch-invariant but are different programs: sampler and trainer must run on
the same path, which they do when both run on the same kind of device.
"""
from __future__ import annotations

import os

import torch

_VALID = ("auto", "cpu", "triton")


def backend() -> str:
    b = os.environ.get("ONPOLICY_KERNELS_BACKEND", "auto").lower()
    if b not in _VALID:
        raise ValueError(f"ONPOLICY_KERNELS_BACKEND={b!r} is not one of {_VALID}")
    return b


def use_triton(x: torch.Tensor) -> bool:
    b = backend()
    if b == "auto":
        return x.is_cuda
    return b == "triton"


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; onpolicy kernels support float32, float16 and bfloat16")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; cast them to one dtype")
