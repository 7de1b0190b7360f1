"""GPU: the invariant linear at full size (M 1..8192, K, N in {2048, 4096, 6144, 151936}).

A row's bits must not depend on the batch it is computed in: fixed probe rows
are placed at random positions inside batches of many sizes (each size may pick
another tile configuration from the table) and must come out bitwise equal to
the probes computed alone. Correctness is checked against a float64 reference.
"""
import pytest
import torch

from _gpu_util import pytestmark, require_compiled_triton  # noqa: F401
from onpolicy_kernels import linear
from onpolicy_kernels.ops.linear.triton_kernels import tile_for

DIMS = (2048, 4096, 6144, 151936)
# Every (K, N) pair from DIMS with at most one 151936 (the vocab size appears as N
# for the LM head; as K only to check a long reduction).
SHAPES = [(k, n) for k in DIMS for n in DIMS if not (k == n == 151936)]
MS = (1, 2, 3, 8, 16, 17, 33, 64, 127, 128, 255, 256, 300, 512, 1000, 1024, 2048, 4096, 8192)
PROBES = 24


def _ref64(x, w, b):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _check_invariance(K, N, dtype, ms, with_bias, seed):
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5
    b = torch.randn(N, device="cuda", dtype=dtype, generator=g) if with_bias else None
    probes = torch.randn(PROBES, K, device="cuda", dtype=dtype, generator=g)
    alone = torch.cat([linear(probes[i : i + 1], w, b) for i in range(PROBES)])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(alone, _ref64(probes, w, b)) < tol
    tiles = set()
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        n = min(M, PROBES)
        pos = torch.randperm(M, device="cuda", generator=g)[:n]
        x[pos] = probes[:n]
        out = linear(x, w, b)
        tiles.add(tile_for(M, x.device, N, K))
        assert torch.equal(out[pos], alone[:n]), f"rows changed inside a batch of M={M} (tile {tile_for(M, x.device, N, K)})"
        # rows that are not probes are right too (nothing unwritten, no garbage)
        rest = torch.ones(M, dtype=torch.bool, device="cuda")
        rest[pos] = False
        if rest.any():
            idx = rest.nonzero()[:64, 0]
            assert _rel(out[idx], _ref64(x[idx], w, b)) < tol
        del x, out
    torch.cuda.empty_cache()
    return tiles


@pytest.mark.parametrize("K,N", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
def test_linear_batch_invariant_bf16(K, N):
    ms = MS if 151936 not in (K, N) else (1, 3, 16, 64, 256, 1000, 4096, 8192)
    tiles = _check_invariance(K, N, torch.bfloat16, ms, with_bias=(K == 2048), seed=K + N)
    # the sizes tested cross several tile buckets, so this also checks bits across tiles
    assert len(tiles) >= 2 or len(set(tile_for(m, torch.device("cuda"), N, K) for m in ms)) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_linear_batch_invariant_other_dtypes(dtype):
    ms = (1, 5, 16, 64, 200, 1024) if dtype == torch.float32 else (1, 5, 16, 64, 200, 1024, 4096)
    _check_invariance(2048, 6144, dtype, ms, with_bias=True, seed=7)


@pytest.mark.parametrize("M", [1, 7, 64, 300, 4096])
def test_merged_columns_equal_separate(M):
    """linear(x, cat[Wq, Wk, Wv]) split == three separate linears, bitwise (Qwen3-1.7B qkv)."""
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(M)
    K = 2048
    wq, wk, wv = (torch.randn(n, K, device="cuda", dtype=torch.bfloat16, generator=g) / K**0.5 for n in (2048, 1024, 1024))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = linear(x, torch.cat([wq, wk, wv])).split([2048, 1024, 1024], dim=-1)
    assert torch.equal(q, linear(x, wq)) and torch.equal(k, linear(x, wk)) and torch.equal(v, linear(x, wv))


def test_linear_3d_input_and_strided_rows():
    """[B, T, K] input and a row-strided view give the bits of the same rows computed contiguously."""
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    big = torch.randn(6, 100, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    x = big[..., :2048]  # rows 4096 apart
    out = linear(x, w)
    assert out.shape == (6, 100, 4096)
    assert torch.equal(out, linear(x.contiguous(), w))
    assert torch.equal(out[2, 17:18], linear(x[2, 17:18].contiguous(), w))
