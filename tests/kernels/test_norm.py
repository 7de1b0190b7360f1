"""CPU path of `rms_norm` and `fused_add_rms_norm`: invariance, rounding semantics, backward."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, REL_TOL, gen, hide, num_threads, randn, rel_err
from onpolicy_kernels import fused_add_rms_norm, rms_norm

WIDTHS = (64, 100, 1536, 2048, 4096, 5000)
EPS = 1e-6


def _ref(x, w, eps=EPS):
    """float64 RMSNorm with the op's documented roundings: normalised x rounded to x.dtype, then times w."""
    xd = x.double()
    y = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return y * w.double()


def _weight(H, dtype, g):
    return (1 + 0.2 * torch.randn(H, generator=g)).to(dtype)


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 300), H=st.sampled_from(WIDTHS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_rows_bitwise_invariant_to_batch(M, H, dtype, seed):
    g = gen(seed)
    w = _weight(H, dtype, g)
    px, pr = randn(6, H, dtype=dtype, g=g, scale=3), randn(6, H, dtype=dtype, g=g)
    alone = rms_norm(px, w, EPS)
    f_out, f_h = fused_add_rms_norm(px, pr, w, EPS)
    assert torch.equal(rms_norm(px[2:3], w, EPS), alone[2:3])
    both, pos, n = hide(torch.cat([px, pr], 1), M, g)
    x, r = both[:, :H], both[:, H:]  # non-contiguous halves, as a fused layout would hand them over
    assert torch.equal(rms_norm(x, w, EPS)[pos], alone[:n])
    out, h = fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(out[pos], f_out[:n]) and torch.equal(h[pos], f_h[:n])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_correct_against_float64(dtype):
    g = gen(1)
    for H in WIDTHS:
        x, w = randn(33, H, dtype=dtype, g=g, scale=5), _weight(H, dtype, g)
        out = rms_norm(x, w, EPS)
        assert out.dtype == dtype and out.shape == x.shape
        assert rel_err(out, _ref(x, w)) < REL_TOL[dtype], H


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fused_residual_semantics(dtype):
    """new_residual = x + residual rounded to the dtype *before* the norm; out = rms_norm(new_residual)."""
    g = gen(2)
    x, r, w = randn(2, 17, 1536, dtype=dtype, g=g), randn(2, 17, 1536, dtype=dtype, g=g, scale=4), _weight(1536, dtype, g)
    out, h = fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(h, (x.float() + r.float()).to(dtype))
    if dtype != torch.float32:
        assert torch.equal(h, x + r)  # what eager PyTorch (transformers' residual add) computes
    assert torch.equal(out, rms_norm(h, w, EPS))
    assert rel_err(out, _ref(h, w)) < REL_TOL[dtype]
    # inputs untouched
    assert not torch.equal(h, x)


def test_rounding_point_matters_and_is_the_documented_one():
    """In bf16, rounding the residual sum before the norm differs from normalising the fp32 sum."""
    g = gen(3)
    x = randn(64, 2048, dtype=torch.bfloat16, g=g)
    r = randn(64, 2048, dtype=torch.bfloat16, g=g, scale=100)
    w = torch.ones(2048, dtype=torch.bfloat16)
    out, _ = fused_add_rms_norm(x, r, w, EPS)
    sum32 = x.float() + r.float()
    unrounded = (sum32 * torch.rsqrt(sum32.pow(2).mean(-1, keepdim=True) + EPS)).to(torch.bfloat16)
    assert not torch.equal(out, unrounded)
    assert rel_err(out, _ref((x.float() + r.float()).to(torch.bfloat16), w)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_bits_with_one_and_two_threads(dtype):
    g = gen(4)
    x, r, w = randn(300, 4096, dtype=dtype, g=g), randn(300, 4096, dtype=dtype, g=g), _weight(4096, dtype, g)
    with num_threads(2):
        a, (b, c) = rms_norm(x, w, EPS), fused_add_rms_norm(x, r, w, EPS)
    with num_threads(1):
        a1, (b1, c1) = rms_norm(x, w, EPS), fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(a, a1) and torch.equal(b, b1) and torch.equal(c, c1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_against_float64(dtype):
    g = gen(5)
    H = 96
    x = randn(3, 5, H, dtype=dtype, g=g).requires_grad_()
    r = randn(3, 5, H, dtype=dtype, g=g).requires_grad_()
    w = _weight(H, dtype, g).requires_grad_()
    g1, g2 = randn(3, 5, H, g=g), randn(3, 5, H, g=g)
    out, h = fused_add_rms_norm(x, r, w, EPS)
    ((out.float() * g1).sum() + (h.float() * g2).sum()).backward()
    xd, rd, wd = (t.detach().double().requires_grad_() for t in (x, r, w))
    hd = xd + rd
    od = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + EPS) * wd
    ((od * g1.double()).sum() + (hd * g2.double()).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, ref in ((x.grad, xd.grad), (r.grad, rd.grad), (w.grad, wd.grad)):
        assert ours.dtype == dtype and rel_err(ours, ref) < tol
    # rms_norm alone
    x2 = x.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    (rms_norm(x2, w2, EPS).float() * g1).sum().backward()
    xd2, wd2 = x2.detach().double().requires_grad_(), w2.detach().double().requires_grad_()
    ((xd2 * torch.rsqrt(xd2.pow(2).mean(-1, keepdim=True) + EPS) * wd2) * g1.double()).sum().backward()
    assert rel_err(x2.grad, xd2.grad) < tol and rel_err(w2.grad, wd2.grad) < tol


def test_zero_rows_and_eps():
    w = torch.ones(64)
    assert torch.equal(rms_norm(torch.zeros(3, 64), w, EPS), torch.zeros(3, 64))  # 0 * rsqrt(eps): no NaN
    assert rms_norm(torch.empty(0, 64), w, EPS).shape == (0, 64)
    out, h = fused_add_rms_norm(torch.empty(0, 64), torch.empty(0, 64), w, EPS)
    assert out.shape == h.shape == (0, 64)
    x = torch.randn(4, 64)
    assert not torch.equal(rms_norm(x, w, 1e-6), rms_norm(x, w, 10.0))  # eps is used



def check_per_head_views(dtype, T=7, D=16, seed=11):
    """q/k per-head views [T, H, D] of a fused QKV output (strided rows, as vLLM's Qwen3 hands
    them over) are read in place: the same bits as contiguous copies, and gradients land in
    the fused tensor's q columns only."""
    g = gen(seed)
    qkv = randn(T, (4 + 2 + 2) * D, dtype=dtype, g=g, scale=2)
    w = _weight(D, dtype, g)
    for lo, heads in ((0, 4), (4, 2)):
        view = qkv[:, lo * D: (lo + heads) * D].view(T, heads, D)
        out = rms_norm(view, w, EPS)
        assert out.shape == view.shape and out.is_contiguous()
        assert torch.equal(out, rms_norm(view.contiguous(), w, EPS))
        assert torch.equal(out.view(-1, D), rms_norm(view.reshape(-1, D), w, EPS))
        assert torch.equal(out[2:5], rms_norm(view[2:5], w, EPS))  # a few tokens alone: the same rows
    x = qkv.detach().requires_grad_(True)
    rms_norm(x[:, : 4 * D].view(T, 4, D), w, EPS).float().sum().backward()
    ref = qkv.detach()[:, : 4 * D].reshape(-1, D).double().requires_grad_(True)
    _ref(ref, w).sum().backward()
    assert rel_err(x.grad[:, : 4 * D].reshape(-1, D), ref.grad) < 1e-2
    assert torch.count_nonzero(x.grad[:, 4 * D:]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_head_views_read_in_place(dtype):
    check_per_head_views(dtype)


def check_fused_op_3d():
    """The op itself (not only the wrapper, which flattens) on [A, B, N] with a residual:
    outputs and gradients equal the 2-D call's."""
    g = gen(12)
    x, r = randn(3, 4, 100, g=g), randn(3, 4, 100, g=g)
    w = 1 + 0.2 * torch.randn(100, generator=g)
    go, gh = randn(3, 4, 100, g=g), randn(3, 4, 100, g=g)
    res = []
    for shape in ((3, 4, 100), (12, 100)):
        ts = [t.reshape(shape).clone().requires_grad_(True) for t in (x, r)] + [w.clone().requires_grad_(True)]
        o, h = torch.ops.onpolicy.fused_add_rms_norm(*ts, 1e-6)
        assert o.shape == h.shape == shape
        ((o * go.reshape(shape)).sum() + (h * gh.reshape(shape)).sum()).backward()
        res.append([o.reshape(12, 100), h.reshape(12, 100)] + [t.grad.reshape(-1) for t in ts])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_fused_op_on_3d_input():
    check_fused_op_3d()
