"""The Triton (GPU) kernels run on the CPU under TRITON_INTERPRET=1, small shapes.

Same properties as the CPU path: rows invariant to the batch, correct against
float64, token_logprobs == log_softmax indexed. Dot-based kernels are tested in
fp16/fp32 (the interpreter's bf16 dot is wrong); the others in bf16 too.

The tile table: every configuration HOPPER_TILES can pick is run here and must
give the bits of the reference geometry. Under the interpreter `tl.dot` is
`np.matmul(block) + acc`, so the bits depend on BLOCK_K (the GPU's do not: the
tensor cores add K in 16-wide steps in order whatever the block, which
tests/gpu/test_linear_tiles.py proves), but not on BLOCK_M, BLOCK_N, warps,
stages or the load variant (pointer, TMA descriptors, persistent): each entry is
compared with the reference tile at its own BLOCK_K.

Also an interpreter artefact: its fp32 -> bf16 conversion truncates where the GPU
rounds to nearest, so bf16 outputs here are checked for invariance and with a
looser tolerance, and the exact bf16 rounding semantics only on the GPU
(tests/gpu/test_ops_gpu.py).
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import REL_TOL, gen, hide, randn, rel_err
from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, linear, log_softmax, rms_norm, rotary_embedding,
                              silu_and_mul, token_logprobs)
from onpolicy_kernels._triton import HAS_TRITON

import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py)")

DOT_DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "triton")


def _tol(dtype):
    return REL_TOL[dtype] * (2 if dtype == torch.bfloat16 else 1)  # truncating bf16 conversion (see above)


def _ref_linear(x, w, b=None):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


# --- linear ---------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(M=st.integers(1, 80), kn=st.sampled_from([(40, 24), (96, 72), (100, 130)]),
       dtype=st.sampled_from(DOT_DTYPES), seed=st.integers(0, 2**31 - 1))
def test_linear_rows_invariant(M, kn, dtype, seed):
    os.environ["ONPOLICY_KERNELS_BACKEND"] = "triton"  # hypothesis re-enters outside the fixture's scope
    K, N = kn
    g = gen(seed)
    w, b = randn(N, K, dtype=dtype, g=g, scale=K**-0.5), randn(N, dtype=dtype, g=g)
    probes = randn(5, K, dtype=dtype, g=g)
    alone = linear(probes, w, b)
    assert torch.equal(linear(probes[1:2], w, b), alone[1:2])
    batch, pos, n = hide(probes, M, g)
    out = linear(batch, w, b)
    assert torch.equal(out[pos], alone[:n])
    assert rel_err(out, _ref_linear(batch, w, b)) < REL_TOL[dtype] * (20 if dtype == torch.float32 else 1)


def test_linear_merged_columns_and_strides():
    g = gen(1)
    ws = [randn(n, 96, dtype=torch.float16, g=g, scale=0.1) for n in (40, 24, 8)]
    x = randn(19, 96, dtype=torch.float16, g=g)
    parts = linear(x, torch.cat(ws)).split([40, 24, 8], -1)
    for p, w in zip(parts, ws):
        assert torch.equal(p, linear(x, w))
    xs = randn(19, 192, dtype=torch.float16, g=g)[:, ::2]
    b = randn(80, dtype=torch.float16, g=g)[::2]
    assert torch.equal(linear(xs, ws[0], b), linear(xs.contiguous(), ws[0], b.contiguous()))


def _entry_reference(entry, elem):
    _, bm, bn, bk, _, stages = entry[:6]
    bk, _ = LT._fit_smem(bm, bn, bk, stages, elem)
    ref = LT.SAFE_TILE[:3] + (bk,) + LT.SAFE_TILE[4:6]
    return ref


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("K,N", [(96, 72), (100, 40)], ids=["tma-eligible", "tma-fallback"])
def test_every_table_entry_gives_the_reference_bits(K, N, dtype):
    """Each configuration the Hopper table can pick (HOPPER_TILES), run through the interpreter."""
    g = gen(K + N)
    w, b = randn(N, K, dtype=dtype, g=g, scale=K**-0.5), randn(N, dtype=dtype, g=g)
    elem = torch.tensor([], dtype=dtype).element_size()
    for M in (1, 20):
        x = randn(M, K, dtype=dtype, g=g)
        refs = {}
        for entry in LT.HOPPER_TILES:
            ref_tile = _entry_reference(entry, elem)
            if ref_tile not in refs:
                refs[ref_tile] = LT.linear_triton(x, w, b, ref_tile)
            out = LT.linear_triton(x, w, b, entry)
            assert torch.equal(out, refs[ref_tile]), (M, entry)
        for ref in refs.values():  # and every reference is right
            assert rel_err(ref, _ref_linear(x, w, b)) < REL_TOL[dtype] * (20 if dtype == torch.float32 else 1)


def test_table_entries_cover_every_variant():
    assert {LT.variant_of(t) for t in LT.HOPPER_TILES} == set(LT.VARIANTS)


# --- memory-bound ops -----------------------------------------------------------------------

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_norms_invariant_and_correct(dtype):
    g = gen(2)
    H = 100
    w = (1 + 0.2 * torch.randn(H, generator=g)).to(dtype)
    px, pr = randn(4, H, dtype=dtype, g=g, scale=3), randn(4, H, dtype=dtype, g=g)
    alone = rms_norm(px, w, 1e-6)
    fo, fh = fused_add_rms_norm(px, pr, w, 1e-6)
    if dtype != torch.bfloat16:
        assert torch.equal(fh, (px.float() + pr.float()).to(dtype))
    assert rel_err(fh, px.double() + pr.double()) < _tol(dtype)
    for M in (1, 3, 37):
        both, pos, n = hide(torch.cat([px, pr], 1), M, g)
        x, r = both[:, :H], both[:, H:]
        assert torch.equal(rms_norm(x, w, 1e-6)[pos], alone[:n])
        o, h = fused_add_rms_norm(x, r, w, 1e-6)
        assert torch.equal(o[pos], fo[:n]) and torch.equal(h[pos], fh[:n])
    xd = px.double()
    ref = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).double() * w.double()
    assert rel_err(alone, ref) < _tol(dtype)
    xt = randn(H, 6, dtype=dtype, g=g).t()  # non-contiguous rows
    assert torch.equal(rms_norm(xt, w, 1e-6), rms_norm(xt.contiguous(), w, 1e-6))


@pytest.mark.parametrize("W", [4, 8])
def test_rank_sum_triton_equals_cpu_path(W, monkeypatch):
    """The Triton rank-order sum (one pass, fp32 adds in rank order) == the CPU path's steps, bitwise,
    in fp32 and fp16 (the interpreter truncates fp32 -> bf16, so bf16 is checked on the GPU); 1100
    elements span two 1024-wide blocks."""
    from onpolicy_kernels import rank_sum

    g = gen(11)
    for dtype in (torch.float32, torch.float16):
        parts = randn(W, 3, 1100 // 3 + 1, dtype=dtype, g=g, scale=3)
        got = rank_sum(parts)
        monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "cpu")
        want = rank_sum(parts)
        monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "triton")
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_silu_and_mul_invariant_and_correct(dtype):
    g = gen(3)
    probes = randn(4, 2 * 1100, dtype=dtype, g=g, scale=3)  # d = 1100 spans two 1024-wide blocks
    alone = silu_and_mul(probes)
    for M in (1, 5, 23):
        batch, pos, n = hide(probes, M, g, filler_scale=3)
        assert torch.equal(silu_and_mul(batch)[pos], alone[:n])
    gd, ud = probes[:, :1100].double(), probes[:, 1100:].double()
    assert rel_err(alone, gd * torch.sigmoid(gd) * ud) < _tol(dtype)
    xt = randn(8, 5, dtype=dtype, g=g).t()
    assert torch.equal(silu_and_mul(xt), silu_and_mul(xt.contiguous()))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_rms_norm_per_head_views_read_in_place(dtype):
    from test_norm import check_per_head_views

    check_per_head_views(dtype)


def test_fused_norm_op_on_3d_input_equals_2d():
    from test_norm import check_fused_op_3d

    check_fused_op_3d()


def _grads(fn, *inputs, gy):
    ts = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*ts)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o.double() * w.double()).sum() for o, w in zip(outs, gy)).backward()
    return [t.grad for t in ts]


def test_backward_kernels_match_float64():
    """The GPU backward kernels of silu_and_mul and the norms (Triton, not invariant) against float64 autograd."""
    g = gen(9)
    M, H = 37, 100  # more rows than the norm backward's programs cover in one pass under the interpreter
    x = randn(M, 2 * H, g=g, scale=3)
    gy = randn(M, H, g=g)
    got, = _grads(silu_and_mul, x, gy=(gy,))
    want, = _grads(lambda t: torch.nn.functional.silu(t[:, :H]) * t[:, H:], x.double(), gy=(gy,))
    assert rel_err(got, want) < 1e-5

    w = 1 + 0.2 * torch.randn(H, generator=g)
    r = randn(M, H, g=g)
    go, gh = randn(M, H, g=g), randn(M, H, g=g)

    def ref_norm(t, wt):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * wt

    got = _grads(lambda t, wt: rms_norm(t, wt, 1e-6), x[:, :H], w, gy=(go,))
    want = _grads(ref_norm, x[:, :H].double(), w.double(), gy=(go,))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))
    got = _grads(lambda t, res, wt: fused_add_rms_norm(t, res, wt, 1e-6), x[:, :H], r, w, gy=(go, gh))
    want = _grads(lambda t, res, wt: (ref_norm(t + res, wt), t + res), x[:, :H].double(), r.double(), w.double(),
                  gy=(go, gh))
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))

    D, rot = 64, 48  # rotary backward (the inverse rotation), partial rotary
    cache = build_cos_sin_cache(D, rot, 512, 1e4)
    pos = torch.randint(0, 512, (9,), generator=g)
    q, k = randn(9, 4, D, g=g), randn(9, 2, D, g=g)
    gq, gk = randn(9, 4, D, g=g), randn(9, 2, D, g=g)
    for neox in (True, False):
        got = _grads(lambda a, b: rotary_embedding(pos, a, b, cache, is_neox=neox), q, k, gy=(gq, gk))
        os.environ["ONPOLICY_KERNELS_BACKEND"] = "cpu"
        want = _grads(lambda a, b: rotary_embedding(pos, a, b, cache, is_neox=neox), q, k, gy=(gq, gk))
        os.environ["ONPOLICY_KERNELS_BACKEND"] = "triton"
        assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, want))
        assert torch.equal(got[0][..., rot:], gq[..., rot:])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_rotary_invariant_and_correct(dtype, is_neox):
    g = gen(4)
    D, rot = 64, 48  # partial rotary: 16 dims pass through
    cache = build_cos_sin_cache(D, rot, 512, 1e4)
    pq, pk = randn(3, 4, D, dtype=dtype, g=g), randn(3, 2, D, dtype=dtype, g=g)
    ppos = torch.tensor([0, 77, 511])
    aq, ak = rotary_embedding(ppos, pq, pk, cache, is_neox=is_neox)
    for T in (1, 9):
        q, k = randn(T, 4, D, dtype=dtype, g=g), randn(T, 2, D, dtype=dtype, g=g)
        pos = torch.randint(0, 512, (T,), generator=g)
        n = min(T, 3)
        idx = torch.randperm(T, generator=g)[:n]
        q[idx], k[idx], pos[idx] = pq[:n], pk[:n], ppos[:n]
        qkv = torch.cat([q.flatten(1), k.flatten(1)], 1)
        oq, ok = rotary_embedding(pos, qkv[:, : 4 * D], qkv[:, 4 * D :], cache, head_size=D, is_neox=is_neox)
        assert torch.equal(oq.view(T, 4, D)[idx], aq[:n]) and torch.equal(ok.view(T, 2, D)[idx], ak[:n])
    # q and k share one launch: a k head holding a q head's values gets the q head's bits,
    # also past the first 16-head block of q (20 q heads: two q programs, then the k ones)
    sq, sk = rotary_embedding(ppos, pq, pq[:, 1:3].clone(), cache, is_neox=is_neox)
    assert torch.equal(sq, aq) and torch.equal(sk, aq[:, 1:3])
    wq = randn(3, 20, D, dtype=dtype, g=g)
    oq, ok = rotary_embedding(ppos, wq, wq[:, 15:18].clone(), cache, is_neox=is_neox)
    assert torch.equal(ok, oq[:, 15:18]) and torch.equal(rotary_embedding(ppos, wq, wq[:, :1].clone(), cache,
                                                                             is_neox=is_neox)[0], oq)
    # against the CPU path's float64-checked formula: same math, each output rounded once
    os.environ["ONPOLICY_KERNELS_BACKEND"] = "cpu"
    cq, _ = rotary_embedding(ppos, pq, pk, cache, is_neox=is_neox)
    os.environ["ONPOLICY_KERNELS_BACKEND"] = "triton"
    assert rel_err(aq, cq) < _tol(dtype)
    assert torch.equal(aq[..., rot:], pq[..., rot:])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
def test_logprobs_invariant_correct_and_token_equals_indexed(dtype):
    g = gen(5)
    V = 5000  # more than one 4096-wide vocab block
    probes = randn(4, V, dtype=dtype, g=g, scale=5)
    pt = torch.tensor([0.5, 1.0, 1.3, 0.8])
    ids = torch.randint(0, V, (4,), generator=g)
    alone = log_softmax(probes, pt)
    tok_alone = token_logprobs(probes, ids, pt)
    assert torch.equal(tok_alone, alone.gather(1, ids[:, None])[:, 0])
    ref = torch.log_softmax(probes.double() / pt.double()[:, None], -1)
    assert (alone.double() - ref).abs().max() < 2e-5
    for M in (1, 6):
        batch, pos, n = hide(probes, M, g, filler_scale=5)
        t = torch.rand(M, generator=g) + 0.3
        t[pos] = pt[:n]
        bids = torch.randint(0, V, (M,), generator=g)
        bids[pos] = ids[:n]
        full = log_softmax(batch, t)
        assert torch.equal(full[pos], alone[:n])
        tok = token_logprobs(batch, bids, t)
        assert torch.equal(tok[pos], tok_alone[:n]) and torch.equal(tok, full.gather(1, bids[:, None])[:, 0])
    assert torch.equal(log_softmax(probes, 0.8), log_softmax(probes, torch.full((4,), 0.8)))
    lt = randn(V, 3, dtype=dtype, g=g).t()  # non-contiguous vocab
    assert torch.equal(log_softmax(lt, 0.9), log_softmax(lt.contiguous(), 0.9))


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logprobs_of_half_logits_equal_those_of_the_same_values_in_fp32(src):
    """vLLM's V1 sampler gets the head's bf16 logits as fp32, the trainer as bf16: the same values, the
    same bits. The interpreter's tl.sum does not depend on the dtype, so this checks the tree's arithmetic
    (and its static assert), not the layout it guards against: tests/gpu/test_ops_gpu.py does that."""
    g = gen(9)
    V = 5000
    x = randn(5, V, dtype=src, g=g, scale=5)
    ids = torch.randint(0, V, (5,), generator=g)
    t = torch.rand(5, generator=g) + 0.3
    assert torch.equal(log_softmax(x, t), log_softmax(x.float(), t))
    assert torch.equal(token_logprobs(x, ids, 0.7), token_logprobs(x.float(), ids, 0.7))


@pytest.mark.parametrize("V", [5000, 40000])  # one vocab chunk; three (16384 columns each, the last partial)
def test_logprobs_split_and_rows_launches_give_the_same_bits(V):
    """The GPU kernels pick the split launch for few rows and the rows launch for many; both
    must compute the same operations: equal bits for the same rows, whichever launch, batch
    size or position, and token_logprobs == log_softmax indexed across launches."""
    import onpolicy_kernels.ops.logprobs as LP
    g = gen(V)
    x = randn(5, V, dtype=torch.bfloat16, g=g, scale=5)
    x[1, : V // 2] = float("-inf")  # whole chunks masked out (m_c = -inf, s_c = 0)
    t = torch.tensor([0.5, 1.0, 1.3, 0.8, 2.0])
    ids = torch.randint(V // 2, V, (5,), generator=g)
    full = {s: LP._log_softmax_impl(x, t, split=s) for s in (True, False)}
    tok = {s: LP._token_logprobs_impl(x, ids, t, split=s) for s in (True, False)}
    assert torch.equal(full[True], full[False]) and torch.equal(tok[True], tok[False])
    assert torch.equal(tok[True], full[False].gather(1, ids[:, None])[:, 0])
    assert torch.isneginf(full[True][1, : V // 2]).all()
    ref = torch.log_softmax(x.double() / t.double()[:, None], -1)
    assert (full[True].double() - ref)[torch.isfinite(ref)].abs().max() < 2e-5
    for s in (True, False):  # a row alone, with either launch, == the batch's row
        assert torch.equal(LP._log_softmax_impl(x[3:4], t[3:4], split=s), full[True][3:4])
        assert torch.equal(LP._token_logprobs_impl(x[3:4], ids[3:4], t[3:4], split=s), tok[False][3:4])
    assert LP.split_launch(1) and LP.split_launch(LP.SPLIT_MAX_ROWS) and not LP.split_launch(LP.SPLIT_MAX_ROWS + 1)


def test_masked_vocab_under_triton():
    x = torch.randn(3, 300)
    x[:, 200:] = float("-inf")
    out = log_softmax(x, 1.0)
    assert torch.isneginf(out[:, 200:]).all() and torch.isfinite(out[:, :200]).all()
    assert torch.allclose(out[:, :200].exp().sum(-1), torch.ones(3), atol=1e-5)
