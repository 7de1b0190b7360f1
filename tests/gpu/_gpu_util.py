"""Shared guards of the GPU tests: CUDA present, Triton compiled (not interpreted)."""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def require_compiled_triton() -> None:
    """The GPU tests must run compiled kernels: TRITON_INTERPRET=1 would test the interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        pytest.fail("TRITON_INTERPRET is set: run the GPU tests with TRITON_INTERPRET=0 "
                    "(tests/conftest.py turns the interpreter on by default for the CPU tests)")
    if os.environ.get("ONPOLICY_KERNELS_BACKEND", "auto") not in ("auto", "triton"):
        pytest.fail("ONPOLICY_KERNELS_BACKEND must be auto or triton for the GPU tests")


def is_hopper() -> bool:
    return torch.cuda.get_device_capability()[0] == 9
