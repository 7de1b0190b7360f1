"""Top-k / top-p / min-p truncation (ops/truncation.py): batch invariance, the tie rule, a float64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import gen, num_threads, randn
from onpolicy_kernels import (log_softmax, token_logprobs, truncate_logprobs, truncated_log_softmax,
                              truncated_token_logprobs, truncation_thresholds)

INF = float("inf")
SETTINGS = [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=40, top_p=0.8),
            dict(top_p=0.7, min_p=0.02), dict(top_k=20, top_p=0.95, min_p=0.01), dict(top_k=1), dict(top_p=0.01)]


def _ref_kept(logits, t, top_k=0, top_p=1.0, min_p=0.0):
    """The documented rule in float64, one row at a time, straight from its definition: bool [M, V]."""
    x = logits.double() / torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    lp = torch.log_softmax(x, -1)
    out = torch.zeros_like(lp, dtype=torch.bool)
    V = lp.shape[-1]
    p32 = float(torch.tensor(top_p, dtype=torch.float32))
    mp32 = float(torch.tensor(min_p, dtype=torch.float32))
    for i in range(lp.shape[0]):
        s = lp[i].sort(descending=True).values
        keep = torch.ones(V, dtype=torch.bool)
        if mp32 > 0:
            keep &= s.exp() >= mp32 * s[0].exp()
        if 0 < top_k < V:
            keep &= torch.arange(V) < top_k
        if p32 < 1:
            q = torch.where(keep, (s - s[0]).exp(), torch.zeros_like(s))
            q = q / q.sum()
            before = torch.cat([torch.zeros(1, dtype=q.dtype), q.cumsum(0)[:-1]])
            keep &= before < p32
        tau = s[int(keep.sum()) - 1]
        out[i] = lp[i] >= tau
    return out, lp


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("t", [1.0, 0.7])
def test_against_float64_reference(kw, t):
    g = gen(7)
    x = randn(24, 1000, g=g, scale=3)  # fp32: no ties, boundaries far from rounding (checked below)
    out = truncated_log_softmax(x, t, **kw)
    kept, lp64 = _ref_kept(x, t, **kw)
    assert torch.equal(out > -INF, kept)
    ref = torch.log_softmax(lp64.masked_fill(~kept, -INF), -1)
    assert (out[kept].double() - ref[kept]).abs().max() < 2e-5
    assert torch.allclose(out.exp().sum(-1).double(), torch.ones(24, dtype=torch.float64), atol=1e-5)
    assert (kept.sum(-1) < 1000).all()  # the setting truncates these rows
    ids = torch.randint(0, 1000, (24,), generator=g)
    ids[::2] = out[::2].argmax(-1)  # half the tokens inside the kept set
    assert torch.equal(truncated_token_logprobs(x, ids, t, **kw), out.gather(1, ids[:, None])[:, 0])


def _settings_for(n, g):
    k = torch.randint(-1, 60, (n,), generator=g)
    k[torch.rand(n, generator=g) < 0.3] = 0
    p = torch.where(torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) * 0.98 + 0.01, torch.ones(n))
    mp = torch.where(torch.rand(n, generator=g) < 0.4, torch.rand(n, generator=g) * 0.2, torch.zeros(n))
    return k, p, mp


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 150), V=st.sampled_from([50, 1000, 4097]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_rows_bitwise_invariant_to_batch_composition(M, V, dtype, seed):
    """A row's truncated logprobs are the same bits alone and inside any batch whose other rows have
    any settings (other top-k, none at all: a batch that sorts fully vs one that takes top-k only)."""
    g = gen(seed)
    P = 6
    probes = randn(P, V, dtype=dtype, g=g, scale=4)
    if dtype == torch.bfloat16:
        probes[0, :8] = probes[0, 0]  # a tie group in one probe
    pk, pp, pmp = _settings_for(P, g)
    pt = torch.rand(P, generator=g) + 0.4
    alone = [truncated_log_softmax(probes[i:i + 1], float(pt[i]), top_k=int(pk[i]), top_p=float(pp[i]),
                                   min_p=float(pmp[i]))[0] for i in range(P)]
    batch = randn(M, V, dtype=dtype, g=g, scale=4)
    n = min(M, P)
    pos = torch.randperm(M, generator=g)[:n]
    batch[pos] = probes[:n]
    k, p, mp = _settings_for(M, g)
    t = torch.rand(M, generator=g) + 0.4
    k[pos], p[pos], mp[pos], t[pos] = pk[:n], pp[:n], pmp[:n], pt[:n]
    full = truncated_log_softmax(batch, t, top_k=k, top_p=p, min_p=mp)
    for i in range(n):
        assert torch.equal(full[pos[i]], alone[i]), (i, int(pk[i]), float(pp[i]), float(pmp[i]))
    tau = truncation_thresholds(log_softmax(batch, t), k, p, mp)
    assert torch.equal(tau, truncation_thresholds(log_softmax(batch.flip(0), t.flip(0)), k.flip(0), p.flip(0),
                                                  mp.flip(0)).flip(0))


def test_rows_without_settings_are_log_softmax_bitwise():
    x = randn(6, 1000, dtype=torch.bfloat16, g=gen(1), scale=4)
    k = torch.tensor([0, 5, -1, 1000, 0, 0])  # -1, 0 and >= V are off
    p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.9, 1.0])
    out = truncated_log_softmax(x, 0.8, top_k=k, top_p=p)
    ls = log_softmax(x, 0.8)
    for i in (0, 2, 3, 5):
        assert torch.equal(out[i], ls[i])
    for i in (1, 4):
        assert not torch.equal(out[i], ls[i]) and (out[i] == -INF).any()
    ids = torch.arange(6)
    assert torch.equal(truncated_token_logprobs(x, ids, 0.8), token_logprobs(x, ids, 0.8))
    assert torch.equal(truncated_token_logprobs(x, ids, 0.8, top_k=0, top_p=1.0, min_p=None), token_logprobs(x, ids, 0.8))
    assert torch.equal(truncate_logprobs(ls), ls)


def test_tie_rule_keeps_tied_tokens_together_whatever_their_ids():
    base = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0])
    # top-k: k=3 lands inside the tie group {2, 3, 4}: all three are kept (5 tokens)
    out = truncated_log_softmax(base[None], 1.0, top_k=3)[0]
    assert (out > -INF).tolist() == [True] * 5 + [False] * 3
    # top-p: the mass reaches p inside the tie group: the whole group is kept
    lp = torch.log_softmax(base.double(), -1)
    p = float(lp[:3].exp().sum()) - 1e-3  # reached at rank 2, the first of the tie
    out = truncated_log_softmax(base[None], 1.0, top_p=p)[0]
    assert (out > -INF).tolist() == [True] * 5 + [False] * 3
    # the rule does not depend on where the tokens sit: permuting a row's logprobs gives the same
    # threshold and the permuted kept set (log_softmax's own sums do depend on the order, so the
    # check starts from one set of logprobs)
    g = gen(2)
    lp = log_softmax(randn(3, 512, dtype=torch.bfloat16, g=g, scale=2), 0.7)  # bf16: many ties
    assert (lp[:, :, None] == lp[:, None, :]).sum() > 3 * 512 + 200  # ties beyond the diagonal
    for kw in SETTINGS:
        perm = torch.randperm(512, generator=g)
        tau = truncation_thresholds(lp, **kw)
        assert torch.equal(tau, truncation_thresholds(lp[:, perm], **kw)), kw
        a = truncate_logprobs(lp, **kw)
        b = truncate_logprobs(lp[:, perm], **kw)
        assert torch.equal(a[:, perm] > -INF, b > -INF), kw
        assert torch.equal(a > -INF, lp >= tau[:, None])


def test_top_k_equals_the_k_largest_without_ties_and_min_p_threshold():
    x = torch.arange(100, dtype=torch.float32)[None].flip(1) * 0.1  # distinct, descending
    out = truncated_log_softmax(x, 1.0, top_k=7)[0]
    assert (out > -INF).sum() == 7 and (out[:7] > -INF).all()
    # min_p = 0.5: keep p_i >= p_max / 2, i.e. x_0 - x_i <= log 2 = 0.693: ranks 0..6
    out = truncated_log_softmax(x, 1.0, min_p=0.5)[0]
    assert (out > -INF).sum() == 7
    assert (truncated_log_softmax(x, 1.0, top_p=1e-6)[0] > -INF).sum() == 1  # the top token always stays


def test_same_bits_with_one_and_two_threads_and_large_vocab():
    x = randn(8, 151936, dtype=torch.bfloat16, g=gen(4), scale=4)
    kw = dict(top_k=torch.tensor([0, 50, 0, 20, 0, 0, 1000, 0]), top_p=0.9, min_p=0.01)
    with num_threads(2):
        a = truncated_log_softmax(x, 0.8, **kw)
    with num_threads(1):
        b = truncated_log_softmax(x, 0.8, **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[3], truncated_log_softmax(x[3:4], 0.8, top_k=20, top_p=0.9, min_p=0.01)[0])


def test_backward_is_the_truncated_softmax_gradient():
    g = gen(5)
    x = randn(4, 300, g=g, scale=3).requires_grad_()
    ids = truncated_log_softmax(x.detach(), 0.7, top_p=0.8).argmax(-1)
    gy = randn(4, g=g)
    (truncated_token_logprobs(x, ids, 0.7, top_p=0.8) * gy).sum().backward()
    kept = truncated_log_softmax(x.detach(), 0.7, top_p=0.8) > -INF
    xd = x.detach().double().requires_grad_()
    lp = torch.log_softmax((xd / 0.7).masked_fill(~kept, -INF), -1).gather(1, ids[:, None])[:, 0]
    (lp * gy.double()).sum().backward()
    assert ((x.grad.double() - xd.grad).norm() / xd.grad.norm()) < 1e-5
    assert x.grad[~kept].abs().max() < 1e-6 * x.grad.abs().max()  # 0 up to the rounding of sum(g)


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p must be in"),
    (dict(min_p=-0.1), "min_p must be in"), (dict(min_p=1.1), "min_p must be in"),
    (dict(top_k=-2), "top_k must be"), (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_p=torch.tensor([0.5, 0.9])), "top_p has 2 values for 3 rows"), (dict(top_p="0.9"), "top_p must be a number"),
])
def test_bad_settings_name_the_argument(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        truncated_log_softmax(torch.randn(3, 50), 1.0, **kw)
