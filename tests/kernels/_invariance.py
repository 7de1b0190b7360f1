"""Helpers of the kernel tests: batches that hide probe rows, float64 references, thread counts."""
from __future__ import annotations

import contextlib

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
# relative (Frobenius) error allowed against a float64 reference: a few ulps of
# the output dtype (every op rounds once or twice to it)
REL_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, g=None, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def hide(probes: torch.Tensor, M: int, g: torch.Generator, filler_scale: float = 1.0):
    """A batch of M rows of random filler with the first min(M, P) probe rows at random positions.

    Returns (batch, positions, n): batch[positions[i]] == probes[i] for i < n.
    """
    n = min(M, probes.shape[0])
    batch = (torch.randn((M,) + tuple(probes.shape[1:]), generator=g) * filler_scale).to(probes.dtype)
    pos = torch.randperm(M, generator=g)[:n]
    batch[pos] = probes[:n]
    return batch, pos, n


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
