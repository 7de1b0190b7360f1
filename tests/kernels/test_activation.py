"""CPU path of `silu_and_mul`: invariance, one rounding, extremes, backward."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, REL_TOL, gen, hide, num_threads, randn, rel_err
from onpolicy_kernels import silu_and_mul

WIDTHS = (32, 100, 1536, 6144)  # d (the output width); the input is 2d wide


def _ref(x):
    d = x.shape[-1] // 2
    g, u = x[..., :d].double(), x[..., d:].double()
    return g * torch.sigmoid(g) * u


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 300), d=st.sampled_from(WIDTHS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_rows_bitwise_invariant_to_batch(M, d, dtype, seed):
    g = gen(seed)
    probes = randn(6, 2 * d, dtype=dtype, g=g, scale=3)
    alone = silu_and_mul(probes)
    assert torch.equal(silu_and_mul(probes[4:5]), alone[4:5])
    batch, pos, n = hide(probes, M, g, filler_scale=3)
    out = silu_and_mul(batch)
    assert torch.equal(out[pos], alone[:n])
    assert rel_err(out, _ref(batch)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_correct_and_rounded_once(dtype):
    g = gen(1)
    x = randn(2, 9, 2 * 1536, dtype=dtype, g=g, scale=4)
    out = silu_and_mul(x)
    assert out.shape == (2, 9, 1536) and out.dtype == dtype
    assert rel_err(out, _ref(x)) < REL_TOL[dtype]
    if dtype != torch.float32:
        # one rounding: within half an ulp of the float64 value far more often than two roundings allow
        exact = _ref(x)
        err = (out.double() - exact).abs()
        _, e = torch.frexp(exact)  # exact = m * 2**e, 0.5 <= |m| < 1
        ulp = torch.ldexp(torch.full_like(exact, torch.finfo(dtype).eps), e - 1)
        ok = (err <= 0.5 * ulp * 1.0001) | (exact.abs() < 2 * torch.finfo(dtype).tiny)
        assert ok.float().mean() > 0.99


def test_extremes_give_no_nan():
    x = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float32)
    out = silu_and_mul(x)
    assert torch.isfinite(out).all()
    assert out[0, 0] == 0 and out[0, 2] == 0  # silu(-1e4) -> 0 (exp overflows to inf), silu(0) = 0
    assert torch.allclose(out[0, 3:], torch.tensor([100.0 * 5.0, 1e4 * 6.0]), rtol=1e-6)
    xb = x.to(torch.bfloat16)
    assert torch.isfinite(silu_and_mul(xb)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_bits_with_one_and_two_threads(dtype):
    x = randn(200, 2 * 6144, dtype=dtype, g=gen(2), scale=3)
    with num_threads(2):
        a = silu_and_mul(x)
    with num_threads(1):
        b = silu_and_mul(x)
    assert torch.equal(a, b)


def test_non_contiguous_input():
    x = randn(40, 600, g=gen(3))[:, ::3]  # [40, 200], stride 3
    assert torch.equal(silu_and_mul(x), silu_and_mul(x.contiguous()))
    xt = randn(200, 40, g=gen(4)).t()  # transposed
    assert torch.equal(silu_and_mul(xt), silu_and_mul(xt.contiguous()))
    assert silu_and_mul(torch.empty(0, 8)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_against_float64(dtype):
    g = gen(5)
    x = randn(3, 4, 2 * 80, dtype=dtype, g=g, scale=3).requires_grad_()
    gy = randn(3, 4, 80, g=g)
    (silu_and_mul(x).float() * gy).sum().backward()
    xd = x.detach().double().requires_grad_()
    (_ref_grad(xd) * gy.double()).sum().backward()
    assert x.grad.dtype == dtype
    assert rel_err(x.grad, xd.grad) < (1e-5 if dtype == torch.float32 else 1e-2)


def _ref_grad(xd):
    d = xd.shape[-1] // 2
    return torch.nn.functional.silu(xd[..., :d]) * xd[..., d:]
