"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

The variable must be set before triton (or onpolicy_kernels) is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
