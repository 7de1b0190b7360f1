"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

The variable must be set before triton (or onpolicy_kernels) is first imported.
Under the interpreter every load and store of every kernel is bounds-checked
(tests/kernels/_bounds.py): an unmasked edge-tile access fails the test instead
of silently touching host memory outside the tensors.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    import _bounds

    _bounds.install()
