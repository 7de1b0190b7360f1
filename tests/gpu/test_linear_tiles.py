"""GPU: every tile configuration the Hopper table can pick gives the bits of SAFE_TILE.

The table (kernels/onpolicy_kernels/ops/linear/__init__.py: HOPPER_TABLE, flattened in HOPPER_TILES) may pick
a different tile per M bucket and N class only because tile shape, warps,
stages and the load path (pointer, TMA, persistent) do not change the bits: each
output is one fp32 accumulator over K in order, never split. This test is the
proof, entry by entry: model shapes and odd ones (partial tiles in M, N and K;
K*2 bytes not a multiple of 16 makes TMA fall back to pointer loads), M = 1,
bf16, fp16 and fp32, with and without bias. (M is not specialised by Triton:
one compiled kernel per entry serves every M.)
"""
import pytest
import torch

from _gpu_util import is_hopper, pytestmark, require_compiled_triton  # noqa: F401
from onpolicy_kernels.ops.linear.triton_kernels import HOPPER_TILES, SAFE_TILE, linear_triton

ENTRIES = list(HOPPER_TILES)
# (K, N, dtype, Ms, bias)
CASES = [
    (2048, 6144, "bf16", (1, 17, 256, 1000), False),
    (4096, 4096, "bf16", (1, 64, 300), False),
    (2048, 151936, "bf16", (1, 100, 512), False),
    (6144, 2048, "bf16", (3, 128, 1024), True),
    (5120, 1000, "bf16", (17, 256), False),
    (2050, 1003, "bf16", (17, 256), True),
    (2048, 6144, "fp16", (1, 17, 256), False),
    (2048, 1000, "fp32", (1, 33, 300), True),
]
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("half", [0, 1], ids=["entries-a", "entries-b"])
@pytest.mark.parametrize("K,N,dt,ms,bias", CASES, ids=[f"K{c[0]}-N{c[1]}-{c[2]}" for c in CASES])
def test_every_table_entry_gives_reference_bits(K, N, dt, ms, bias, half):
    require_compiled_triton()
    if not is_hopper():
        pytest.skip("the table is for Hopper (sm_90); other GPUs use SAFE_TILE only")
    dtype = DT[dt]
    g = torch.Generator(device="cuda").manual_seed(K * 7 + N)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g) if bias else None
    entries = ENTRIES[half::2]
    bad = []
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        ref = linear_triton(x, w, b, SAFE_TILE)
        for entry in entries:
            if not torch.equal(linear_triton(x, w, b, entry), ref):
                bad.append((M, entry))
    assert not bad, f"tile entries whose bits differ from SAFE_TILE: {bad}"

