"""CPU path of `linear`: batch invariance, merged columns, correctness, backward, tile-table logic.

The contract (kernels/onpolicy_kernels/ops/linear/__init__.py): an output row's bits depend only on that input
row, the weight and the bias; an output column's bits only on its weight row.
"""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, REL_TOL, gen, hide, num_threads, randn, rel_err
from onpolicy_kernels import linear

import onpolicy.vllm_plugin.warmup as W  # the engine warm-up plan (no vLLM import)
import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table

# (K, N): realistic widths incl. non-multiples of 64 and the COL_TILE; 1536/2048 as in Qwen3 models
WIDTHS = [(64, 96), (200, 300), (1536, 256), (2048, 1536), (100, 2048), (4096, 40)]


def _ref(x, w, b=None):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 300), kn=st.sampled_from(WIDTHS), dtype=st.sampled_from(DTYPES),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rows_bitwise_invariant_to_batch(M, kn, dtype, bias, seed):
    K, N = kn
    g = gen(seed)
    w = randn(N, K, dtype=dtype, g=g, scale=K**-0.5)
    b = randn(N, dtype=dtype, g=g) if bias else None
    probes = randn(8, K, dtype=dtype, g=g)
    alone = linear(probes, w, b)  # the probes as a batch of their own
    assert torch.equal(linear(probes[3:4], w, b), alone[3:4])  # one row alone
    batch, pos, n = hide(probes, M, g)
    out = linear(batch, w, b)
    assert torch.equal(out[pos], alone[:n])
    assert rel_err(out, _ref(batch, w, b)) < REL_TOL[dtype]


@pytest.mark.parametrize("K", [64, 256, 1000])
def test_cpu_batched_tile_product_does_not_depend_on_the_batch(K):
    """tiled_matmul's one assumption about batched BLAS: an item of torch.bmm over fixed-shape [64, K] x
    [K, 256] items (the weight tile broadcast) has the bits of that product alone, wherever it sits and
    however many row tiles share the call."""
    from onpolicy_kernels._cpu import COL_TILE, ROW_TILE

    g = torch.Generator().manual_seed(K)
    w, a = torch.randn(COL_TILE, K, generator=g), torch.randn(ROW_TILE, K, generator=g)
    alone = torch.mm(a, w.t())
    for T in (1, 2, 5, 14, 33):
        X = torch.randn(T, ROW_TILE, K, generator=g)
        X[T // 2] = a
        assert torch.equal(torch.bmm(X, w.t().expand(T, K, COL_TILE))[T // 2], alone), T


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_correct_against_float64(dtype):
    g = gen(1)
    for K, N in WIDTHS:
        x, w, b = randn(37, K, dtype=dtype, g=g), randn(N, K, dtype=dtype, g=g, scale=K**-0.5), randn(N, dtype=dtype, g=g)
        out = linear(x, w, b)
        assert out.dtype == dtype and out.shape == (37, N)
        assert rel_err(out, _ref(x, w, b)) < REL_TOL[dtype], (K, N)


def test_bias_added_before_the_one_rounding():
    """out = round(x.w + b) with the sum in fp32: a bias that cancels the product leaves fp32 bits exact."""
    x = torch.tensor([[1.0, 2.0 ** -9]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    b = torch.tensor([-1.0], dtype=torch.bfloat16)
    # fp32: 1 + 2^-9 - 1 = 2^-9 exactly; rounding x.w to bf16 first (1 + 2^-9 -> 1) would give 0
    assert linear(x, w, b).item() == 2.0 ** -9


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merged_columns_equal_separate_linears(dtype):
    """linear(x, cat[Wq, Wk, Wv]) split == three separate linears, bitwise (a merged QKV / gate-up)."""
    g = gen(2)
    K = 1536
    ws = [randn(n, K, dtype=dtype, g=g, scale=K**-0.5) for n in (300, 37, 291)]  # boundaries off the 256 tile
    b = randn(628, dtype=dtype, g=g)
    x = randn(21, K, dtype=dtype, g=g)
    parts = linear(x, torch.cat(ws), b).split([300, 37, 291], dim=-1)
    for part, w, bb in zip(parts, ws, b.split([300, 37, 291])):
        assert torch.equal(part, linear(x, w, bb))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_bits_with_one_and_two_threads(dtype):
    g = gen(3)
    x, w = randn(100, 2048, dtype=dtype, g=g), randn(2048, 2048, dtype=dtype, g=g, scale=2048**-0.5)
    with num_threads(2):
        two = linear(x, w)
    with num_threads(1):
        one = linear(x, w)
    assert torch.equal(one, two)


def test_leading_dims_and_non_contiguous_inputs():
    g = gen(4)
    w_t = randn(200, 300, g=g)  # [K, N]: its transpose is a non-contiguous [N, K] weight
    w = w_t.t()
    x3 = randn(3, 50, 600, g=g)[..., ::3]  # [3, 50, 200], last-dim stride 3
    out = linear(x3, w)
    assert out.shape == (3, 50, 300)
    ref = linear(x3.contiguous().reshape(-1, 200), w.contiguous()).view(3, 50, 300)
    assert torch.equal(out, ref)
    b = randn(600, g=g)[::2]  # strided bias
    assert torch.equal(linear(x3, w, b), linear(x3.contiguous(), w.contiguous(), b.contiguous()))


def test_empty_batch():
    w = torch.randn(30, 20)
    assert linear(torch.empty(0, 20), w).shape == (0, 30)
    assert linear(torch.empty(2, 0, 20), w).shape == (2, 0, 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_against_float64(dtype):
    g = gen(5)
    x = randn(4, 7, 96, dtype=dtype, g=g).requires_grad_()
    w = randn(130, 96, dtype=dtype, g=g).requires_grad_()
    b = randn(130, dtype=dtype, g=g).requires_grad_()
    gy = randn(4, 7, 130, g=g, dtype=dtype)
    (linear(x, w, b) * gy).sum().backward()
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ((xd @ wd.t() + bd) * gy.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for ours, ref in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        assert ours.dtype == dtype and rel_err(ours, ref) < tol


def test_no_grad_for_inputs_that_do_not_need_it():
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(8, 16)
    linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is None


# --- the tile table (the GPU path's per-M choice) -----------------------------------------


def test_cpu_and_other_devices_use_the_safe_tile():
    for m in (1, 64, 5000):
        assert LT.tile_for(m, torch.device("cpu"), 2048, 2048) == LT.SAFE_TILE


def test_table_rows_are_well_formed():
    assert LT.HOPPER_TABLE[-1][0] >= 1 << 62, "the last N class must cover every N"
    assert [n for n, _ in LT.HOPPER_TABLE] == sorted(n for n, _ in LT.HOPPER_TABLE)
    for _, tiles in LT.HOPPER_TABLE:
        assert tiles[-1][0] >= 1 << 62, "each N class must cover every M"
        assert [t[0] for t in tiles] == sorted(t[0] for t in tiles)
        for t in tiles:
            assert len(t) in (6, 7) and LT.variant_of(t) in LT.VARIANTS
            _, bm, bn, bk, warps, stages = t[:6]
            assert all(v & (v - 1) == 0 for v in (bm, bn, bk)), "Triton blocks are powers of two"
            assert bm >= 16 and bn >= 16 and bk >= 16 and warps in (4, 8) and 2 <= stages <= 6
    assert set(LT.HOPPER_TILES) == {t for _, tiles in LT.HOPPER_TABLE for t in tiles}


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 20000), n=st.integers(1, 300000))
def test_hopper_selection_follows_the_buckets(m, n):
    with mock.patch.object(LT, "_is_hopper", lambda index: True):
        tile = LT.tile_for(m, torch.device("cuda", 0), n, 4096)
    assert tile in LT.HOPPER_TILES
    max_n, tiles = next((mn, t) for mn, t in LT.HOPPER_TABLE if n <= mn)
    i = tiles.index(tile)
    assert tile[0] >= m and (i == 0 or tiles[i - 1][0] < m)


def test_every_table_entry_is_reachable(monkeypatch_hopper):
    """HOPPER_TILES (what the bitwise tests enumerate) holds nothing the selection cannot pick."""
    picked = set()
    prev_n = 0
    for max_n, tiles in LT.HOPPER_TABLE:
        n = min(max_n, prev_n + 1)
        for t in tiles:
            picked.add(LT.tile_for(min(t[0], 1 << 20), torch.device("cuda", 0), n, 2048))
        prev_n = max_n
    assert picked == set(LT.HOPPER_TILES)


@pytest.fixture
def monkeypatch_hopper(monkeypatch):
    monkeypatch.setattr(LT, "_is_hopper", lambda index: True)


def test_fit_smem_keeps_tiles_and_shrinks_only_pipeline():
    # fp32 operands take twice the bytes the bf16 table was tuned for
    bk, st = LT._fit_smem(128, 256, 64, 3, 4)
    assert st * (128 + 256) * bk * 4 <= LT.SMEM_BUDGET and bk >= 16 and st >= 2
    assert LT._fit_smem(64, 64, 32, 3, 2) == (32, 3)  # fits already: unchanged


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300000), max_rows=st.integers(1, 20000))
def test_warm_up_rows_reach_every_tile_the_batch_can_pick(n, max_rows):
    """The engine's warm-up runs one M per tile configuration: exactly the set M in 1..max_rows picks."""
    cuda = torch.device("cuda", 0)
    with mock.patch.object(LT, "_is_hopper", lambda index: True):
        rows = W.warm_up_rows(n, max_rows, cuda)
        warmed = [LT.tile_for(m, cuda, n) for m in rows]
        bounds = [0] + [t[0] for t in next(tiles for mn, tiles in LT.HOPPER_TABLE if n <= mn)]
        reachable = {LT.tile_for(min(b + 1, max_rows), cuda, n) for b in bounds if b < max_rows}
    assert all(1 <= m <= max_rows for m in rows)
    assert len(warmed) == len(set(warmed)), "one call per configuration"
    assert set(warmed) == reachable


def test_warm_up_rows_off_hopper_and_off_cuda():
    with mock.patch.object(LT, "_is_hopper", lambda index: False):
        assert W.warm_up_rows(4096, 8192, torch.device("cuda", 0)) == [1]
    assert W.warm_up_rows(4096, 8192, torch.device("cpu")) == []


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_linear_into_rows_of_a_larger_buffer_equal_linear(backend, monkeypatch):
    """linear_into (what the vLLM head's CUDA graphs write through): the first M rows of a larger
    static buffer get linear's bits, and the rows past M are left alone."""
    from onpolicy_kernels.ops.linear import linear_into

    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", backend)
    g = gen(7)
    w = randn(40, 24, dtype=torch.bfloat16, g=g)
    buf = torch.full((16, 40), 7.0, dtype=torch.bfloat16)
    for m in (1, 5, 16):
        x = randn(m, 24, dtype=torch.bfloat16, g=g)
        buf[m:] = 7.0
        assert linear_into(x, w, buf[:m]) is not None
        assert torch.equal(buf[:m], linear(x, w)), m
        assert bool((buf[m:] == 7.0).all())


def test_linear_into_names_what_out_must_be():
    from onpolicy_kernels.ops.linear import linear_into

    x, w = torch.randn(4, 8), torch.randn(6, 8)
    for bad in (torch.empty(4, 5), torch.empty(4, 6, dtype=torch.float64), torch.empty(6, 4).t()):
        with pytest.raises(ValueError, match="out must be a \\(4, 6\\) torch.float32 tensor with contiguous rows"):
            linear_into(x, w, bad)
    with pytest.raises(ValueError, match="x \\[M, K\\] and weight \\[N, K\\]"):
        linear_into(x[None], w, torch.empty(4, 6))
