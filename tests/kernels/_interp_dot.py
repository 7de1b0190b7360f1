"""A row- and column-invariant `tl.dot` for Triton kernels run by the interpreter.

The interpreter computes `tl.dot(a, b, acc)` as numpy's matmul, i.e. the CPU's
BLAS, whose summation order may depend on the operands' shapes: on an AMD EPYC
machine with OpenBLAS 0.3.30's default kernels, a row of a [16, K] x [K, N]
product differed from the same row in a [1, K] x [K, N] one. The kernels' GPU
promise (each output one dot product over K, accumulated in order) then cannot be
tested on such a CPU. `install()` replaces the interpreted dot by exactly that:
acc + a[:, k] * b[k, :] for k = 0, 1, ... in the accumulator's dtype, elementwise
over the tile, so an output element depends only on its own row and column.
"""
from __future__ import annotations

import numpy as np


def dot_in_order(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b, each element accumulated over K in order in acc's dtype (a: [..., M, K], b: [..., K, N])."""
    dt = acc.dtype
    a = a.astype(dt, copy=False)
    b = b.astype(dt, copy=False)
    out = np.array(acc, dtype=dt, copy=True)
    for k in range(a.shape[-1]):
        out += a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def install() -> None:
    """Patch the interpreter (idempotent; nothing to do without triton)."""
    from _bounds import unpatched_interpreter

    I = unpatched_interpreter("_onpolicy_dot")
    if I is None:
        return
    builder = I.interpreter_builder
    original = builder.create_dot

    def create_dot(a, b, d, *rest):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return original(a, b, d, *rest)  # fp8 / int8: not used by onpolicy's kernels
        return I.TensorHandle(dot_in_order(a.data, b.data, d.data), d.dtype.scalar)

    builder.create_dot = create_dot
    I._onpolicy_dot = True
