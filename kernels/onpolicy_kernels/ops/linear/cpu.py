"""The invariant linear on the CPU: BLAS on fixed [64, K] x [K, 256] tiles in fp32 (see _cpu.py)."""
from __future__ import annotations

from typing import Optional

import torch

from ..._cpu import tiled_matmul


def linear_cpu(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    return tiled_matmul(x, w, b).to(x.dtype)
