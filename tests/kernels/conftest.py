"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

The variable must be set before triton (or onpolicy_kernels) is first imported.
Under the interpreter every load and store of every kernel is bounds-checked
(tests/kernels/_bounds.py): an unmasked edge-tile access fails the test instead
of silently touching host memory outside the tensors, and `tl.dot` accumulates K
in order elementwise (tests/kernels/_interp_dot.py) instead of calling the CPU's
BLAS, whose summation order may depend on the tile's shape.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
    import _bounds
    import _interp_dot

    _bounds.install()
    _interp_dot.install()
