"""CPU path of `log_softmax` and `token_logprobs` (fp32 outputs, temperature applied)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, gen, hide, num_threads, randn
from onpolicy_kernels import log_softmax, token_logprobs

VOCABS = (50, 1000, 4097, 32000, 151936)


def _ref(logits, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    t = t[:, None] if t.dim() else t
    return torch.log_softmax(logits.double() / t, -1)


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 200), V=st.sampled_from(VOCABS[:4]), dtype=st.sampled_from(DTYPES),
       per_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rows_bitwise_invariant_to_batch(M, V, dtype, per_row, seed):
    g = gen(seed)
    P = 5
    probes = randn(P, V, dtype=dtype, g=g, scale=4)
    pt = torch.rand(P, generator=g) + 0.3
    t_alone = pt if per_row else 0.7
    alone = log_softmax(probes, t_alone)
    ids = torch.randint(0, V, (P,), generator=g)
    tok_alone = token_logprobs(probes, ids, t_alone)
    batch, pos, n = hide(probes, M, g, filler_scale=4)
    if per_row:
        t = torch.rand(M, generator=g) + 0.3
        t[pos] = pt[:n]
    else:
        t = 0.7
    bids = torch.randint(0, V, (M,), generator=g)
    bids[pos] = ids[:n]
    full = log_softmax(batch, t)
    assert full.dtype == torch.float32
    assert torch.equal(full[pos], alone[:n])
    tok = token_logprobs(batch, bids, t)
    assert torch.equal(tok[pos], tok_alone[:n])
    assert torch.equal(tok, full.gather(1, bids[:, None])[:, 0])  # == log_softmax indexed, bitwise


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V", VOCABS)
def test_correct_against_float64_and_token_equals_indexed(dtype, V):
    g = gen(V)
    M = 3 if V == 151936 else 17
    x = randn(M, V, dtype=dtype, g=g, scale=6)
    t = torch.rand(M, generator=g) + 0.2
    out = log_softmax(x, t)
    assert (out.double() - _ref(x, t)).abs().max() < 2e-5
    ids = torch.randint(0, V, (M,), generator=g)
    assert torch.equal(token_logprobs(x, ids, t), out.gather(1, ids[:, None])[:, 0])


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_logits_equal_the_same_values_in_fp32(src):
    """vLLM's V1 sampler gets the head's bf16 logits as fp32, the trainer as they are: same bits. (The CPU
    path converts to fp32 first, so this states the contract; the GPU kernels' layout-proof sum is
    guarded by tests/gpu/test_ops_gpu.py and the kernel's static assert.)"""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 3000, generator=g) * 5).to(src)
    ids = torch.randint(0, 3000, (7,), generator=g)
    assert torch.equal(log_softmax(x, 0.8), log_softmax(x.float(), 0.8))
    assert torch.equal(token_logprobs(x, ids, 1.0), token_logprobs(x.float(), ids, 1.0))


def test_temperature_float_equals_per_row_tensor():
    x = randn(9, 1000, dtype=torch.bfloat16, g=gen(1), scale=5)
    ids = torch.randint(0, 1000, (9,), generator=gen(2))
    for t in (1.0, 0.6, 1.7):
        tt = torch.full((9,), t)
        assert torch.equal(log_softmax(x, t), log_softmax(x, tt))
        assert torch.equal(log_softmax(x, t), log_softmax(x, torch.tensor(t)))  # 0-d tensor broadcasts
        assert torch.equal(token_logprobs(x, ids, t), token_logprobs(x, ids, tt))
    # different per-row temperatures: each row as if computed alone with its float temperature
    tt = torch.tensor([0.5, 1.0, 2.0] * 3)
    out = log_softmax(x, tt)
    for i in range(9):
        assert torch.equal(out[i : i + 1], log_softmax(x[i : i + 1], float(tt[i])))
    assert not torch.equal(out[0], log_softmax(x[0:1], 1.0)[0])  # temperature is applied


def test_processed_logprobs_are_temperature_scaled_then_fp32():
    """x = fp32(logits) / T, then log_softmax: what vLLM calls processed logprobs."""
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    out = log_softmax(x, 0.5)
    ref = torch.log_softmax(torch.tensor([[2.0, 4.0, 6.0]], dtype=torch.float64), -1)
    assert (out.double() - ref).abs().max() < 1e-6


def test_masked_vocab_entries():
    x = torch.randn(4, 300)
    x[:, 100:] = float("-inf")
    out = log_softmax(x, 1.0)
    assert torch.isinf(out[:, 100:]).all() and torch.isfinite(out[:, :100]).all()
    assert torch.allclose(out[:, :100].exp().sum(-1), torch.ones(4), atol=1e-5)
    assert torch.isneginf(token_logprobs(x, torch.tensor([5, 150, 99, 299]), 1.0)[[1, 3]]).all()


def test_leading_dims_non_contiguous_and_empty():
    g = gen(3)
    big = randn(2, 5, 2000, g=g, scale=3)
    x = big[..., ::2]  # [2, 5, 1000], stride 2
    ids = torch.randint(0, 1000, (2, 5), generator=g)
    assert torch.equal(log_softmax(x, 0.9), log_softmax(x.contiguous(), 0.9))
    out = token_logprobs(x, ids, 0.9)
    assert out.shape == (2, 5)
    assert torch.equal(out, token_logprobs(x.contiguous(), ids.int(), 0.9))
    assert log_softmax(torch.empty(0, 10)).shape == (0, 10)
    assert token_logprobs(torch.empty(0, 10), torch.empty(0, dtype=torch.long)).shape == (0,)


def test_same_bits_with_one_and_two_threads():
    x = randn(64, 151936, dtype=torch.bfloat16, g=gen(4), scale=4)
    with num_threads(2):
        a = log_softmax(x, 0.8)
    with num_threads(1):
        b = log_softmax(x, 0.8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_against_float64(dtype):
    g = gen(5)
    x = randn(2, 3, 500, dtype=dtype, g=g, scale=3).requires_grad_()
    t = torch.rand(6, generator=g) + 0.5
    gy = randn(2, 3, 500, g=g)
    (log_softmax(x, t) * gy).sum().backward()
    xd = x.detach().double().requires_grad_()
    (torch.log_softmax(xd / t.double().view(2, 3, 1), -1) * gy.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert x.grad.dtype == dtype and ((x.grad.double() - xd.grad).norm() / xd.grad.norm()) < tol

    x2 = x.detach().clone().requires_grad_()
    ids = torch.randint(0, 500, (2, 3), generator=g)
    g2 = randn(2, 3, g=g)
    (token_logprobs(x2, ids, t) * g2).sum().backward()
    xd2 = x.detach().double().requires_grad_()
    lp = torch.log_softmax(xd2 / t.double().view(2, 3, 1), -1).gather(-1, ids[..., None])[..., 0]
    (lp * g2.double()).sum().backward()
    assert x2.grad.dtype == dtype and ((x2.grad.double() - xd2.grad).norm() / xd2.grad.norm()) < tol


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_log_softmax_into_rows_of_a_larger_buffer_equal_log_softmax(backend, dtype, monkeypatch):
    """log_softmax_into (what the vLLM sampler's CUDA graphs write through): the first M rows of a
    larger fp32 buffer get log_softmax's bits, with a float or per-row temperature."""
    from onpolicy_kernels.ops.logprobs import log_softmax_into

    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", backend)
    g = gen(11)
    buf = torch.full((8, 300), 7.0)
    for m in (1, 3, 8):
        logits = randn(m, 300, dtype=dtype, g=g, scale=4.0)
        t = 0.5 + torch.rand(m, generator=g)
        for temp in (t, 0.7):
            buf[m:] = 7.0
            log_softmax_into(logits, temp, buf[:m])
            assert torch.equal(buf[:m], log_softmax(logits, temp)), (m, temp)
            assert bool((buf[m:] == 7.0).all())


def test_log_softmax_into_names_what_out_must_be():
    from onpolicy_kernels.ops.logprobs import log_softmax_into

    logits = torch.randn(3, 10)
    for bad in (torch.empty(3, 9), torch.empty(3, 10, dtype=torch.float64), torch.empty(10, 3).t()):
        with pytest.raises(ValueError, match="out must be a \\(3, 10\\) torch.float32 tensor with contiguous rows"):
            log_softmax_into(logits, 1.0, bad)
    with pytest.raises(ValueError, match="every temperature must be > 0|temperature must be > 0"):
        log_softmax_into(logits, torch.zeros(3), torch.empty(3, 10))
