"""Batch-invariant paged attention on the GPU, at real sizes, on both routes.

The four bitwise properties of issue 3 (torch.equal), plus accuracy against a
float64 reference, the cache write, gradients and CUDA-graph capture. Every test
runs twice: on the Triton kernel (ONPOLICY_ATTENTION=triton) and on Hopper's FA3
route (ONPOLICY_ATTENTION=fa3, attention_fa3.py; skipped without vLLM's FA3 or
for shapes FA3 does not take: fp32, head size 64). Shapes:
Qwen3-1.7B-like heads (16 query / 8 KV heads of 128), a 4:1 group and a head
of 64; sequences of 77 to 2000 tokens in shuffled blocks of 16/32/64, K and V
interleaved in one [blocks, block_size, heads, 2 x head] tensor as vLLM hands
the plugin its cache.
Run on the GPU machine: `pytest -m gpu tests/gpu/test_attention_gpu.py`.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="set TRITON_INTERPRET=0 on the GPU machine"),
]

if torch.cuda.is_available():
    import onpolicy_kernels.ops.attention as A
    import onpolicy_kernels.ops.attention.backward as AB
    import onpolicy_kernels.ops.attention.common as AC
    import onpolicy_kernels.ops.attention.triton_kernels as AT
    import onpolicy_kernels.ops.attention.fa3 as FA

DEV = "cuda"
SHAPES = [(16, 8, 128), (32, 8, 128), (8, 2, 64)]
LENS = [77, 2000, 513, 1024, 160]


@pytest.fixture(params=["triton", "fa3"], autouse=True)
def route(request, monkeypatch):
    monkeypatch.setenv("ONPOLICY_ATTENTION", request.param)
    if request.param == "fa3":
        why = FA.unsupported(torch.empty(1, 1, 128, dtype=torch.bfloat16, device=DEV))
        if why:
            pytest.skip(why)
    return request.param


def need(route, shape, dtype):
    """Skip the FA3 route where FA3 does not take the call (the Triton route covers it)."""
    if route == "fa3" and (dtype == torch.float32 or shape[2] not in FA.HEAD_SIZES):
        pytest.skip(f"FA3 route: {dtype}, head size {shape[2]} run on Triton")


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def seq(L, Hq, Hkv, D, dtype, seed):
    g = gen(seed)
    return tuple(torch.randn(L, H, D, generator=g, device=DEV).to(dtype) for H in (Hq, Hkv, Hkv))


def paged(kvs, q_lens, qs, bs, seed, extra=5):
    """(q, k_cache, v_cache, block_table, cu, seq_lens) with shuffled blocks; unused rows are NaN."""
    Hkv, D = kvs[0][0].shape[1:]
    dtype = kvs[0][0].dtype
    need = [math.ceil(k.shape[0] / bs) for k, _ in kvs]
    nb = sum(need) + extra
    kv = torch.full((nb, bs, Hkv, 2 * D), float("nan"), dtype=dtype, device=DEV)
    kc, vc = kv[..., :D], kv[..., D:]
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).tolist()
    # Unused table entries: out of range for our kernel (it must never read them); an
    # unused all-NaN block for FA3 (it may fetch a page id past a sequence's end, never its rows).
    pad = 10**6 if FA.mode() == "triton" else perm[-1]
    bt = torch.full((len(kvs), max(need) + 3), pad, dtype=torch.int32)
    i = 0
    for b, ((k, v), n) in enumerate(zip(kvs, need)):
        blocks = perm[i:i + n]
        i += n
        bt[b, :n] = torch.tensor(blocks)
        slot = torch.tensor(blocks, device=DEV)[torch.arange(k.shape[0], device=DEV) // bs] * bs + \
            torch.arange(k.shape[0], device=DEV) % bs
        A.reshape_and_cache(k, v, kc, vc, slot)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    sl = torch.tensor([k.shape[0] for k, _ in kvs], dtype=torch.int32, device=DEV)
    return torch.cat(qs), kc, vc, bt.to(DEV), cu, sl


def longest_query(args) -> int:
    cu = args[4]
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def run(args, scale=0.088, causal=True, max_seqlen_q=None):
    """The paged call as vLLM's backend makes it: with the longest query count as the bound
    (FA3 keys its decode special case on max_seqlen_q == 1). Inside a CUDA-graph capture pass
    the bound (a host int, as vLLM's metadata carries it): reading it off the device would sync."""
    bound = longest_query(args) if max_seqlen_q is None else max_seqlen_q
    return A.attention(*args, scale, causal, max_seqlen_q=bound)


def ref(q, k, v, q_len, scale):
    L, Hkv, _ = k.shape
    G = q.shape[1] // Hkv
    s = torch.einsum("thd,shd->hts", q.double(), k.double().repeat_interleave(G, 1)) * scale
    qpos = torch.arange(L - q_len, L, device=DEV)
    s = s.masked_fill(torch.arange(L, device=DEV)[None, None, :] > qpos[None, :, None], -math.inf)
    return torch.einsum("hts,shd->thd", s.softmax(-1), v.double().repeat_interleave(G, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_accuracy_vs_float64(shape, dtype, route):
    need(route, shape, dtype)
    Hq, Hkv, D = shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    seqs = [seq(L, Hq, Hkv, D, dtype, L) for L in LENS]
    q_lens = [77, 1, 300, 1024, 17]
    args = paged([(s[1], s[2]) for s in seqs], q_lens, [s[0][-ql:] for s, ql in zip(seqs, q_lens)], 16, 0)
    out = run(args, scale=D ** -0.5)
    assert torch.isfinite(out).all()
    cu = args[4].tolist()
    for b, (s, ql) in enumerate(zip(seqs, q_lens)):
        r = ref(s[0][-ql:], s[1], s[2], ql, D ** -0.5)
        err = float((out[cu[b]:cu[b + 1]].double() - r).norm() / r.norm())
        assert err < tol, (b, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_equals_decode(shape, dtype, route):
    need(route, shape, dtype)
    """Property 1: every position of a 2000-token prefill == its decode step (batched, and alone)."""
    Hq, Hkv, D = shape
    L = 2000
    q, k, v = seq(L, Hq, Hkv, D, dtype, 1)
    pre = run(paged([(k, v)], [L], [q], 16, 1))
    dec = run(paged([(k[:i + 1], v[:i + 1]) for i in range(L)], [1] * L, [q[i:i + 1] for i in range(L)], 32, 2))
    bad = (pre != dec).flatten(1).any(1).nonzero().flatten().tolist()
    assert not bad, f"{len(bad)} positions differ, first {bad[:10]}"
    for i in (0, 63, 64, 1000, 1999):
        alone = run(paged([(k[:i + 1], v[:i + 1])], [1], [q[i:i + 1]], 64, i))
        assert torch.equal(alone, pre[i:i + 1]), i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_split_kv_launch_equals_one_pass(shape, dtype, route):
    if route == "fa3":
        pytest.skip("the Triton kernel's own launch choice")
    """The split-KV launch (small decode batches) == the one-pass launch, bitwise: decode rows at
    and around split edges and a 2000-token prefill, either launch forced."""
    Hq, Hkv, D = shape
    L = 2000
    q, k, v = seq(L, Hq, Hkv, D, dtype, 3)
    pre = paged([(k, v)], [L], [q], 16, 1)
    one = AT._attention_triton(*pre, 0.088, True, split=False)
    assert torch.equal(AT._attention_triton(*pre, 0.088, True, split=True), one)
    S = AC.KV_SPLIT
    pos = sorted({0, S - 1, S, S + 1, 3 * S, 1000, L - 1})
    dec = paged([(k[:i + 1], v[:i + 1]) for i in pos], [1] * len(pos), [q[i:i + 1] for i in pos], 16, 2)
    for split in (True, False, None):
        assert torch.equal(AT._attention_triton(*dec, 0.088, True, split=split), one[pos]), split


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_chunked_prefill_equals_whole(shape, dtype, route):
    need(route, shape, dtype)
    """Property 2: splits of a 2000-token prompt (vLLM's chunking and random ones)."""
    Hq, Hkv, D = shape
    L = 2000
    q, k, v = seq(L, Hq, Hkv, D, dtype, 3)
    whole = run(paged([(k, v)], [L], [q], 16, 3))
    rng = torch.Generator().manual_seed(0)
    splits = [[512, 1024, 1536], [1], [1999], [77, 78, 700]]
    splits += [sorted(set(torch.randint(1, L, (n,), generator=rng).tolist())) for n in (2, 5, 9)]
    for cuts in splits:
        bounds = [0] + cuts + [L]
        parts = [run(paged([(k[:e], v[:e])], [e - s], [q[s:e]], 16, s)) for s, e in zip(bounds[:-1], bounds[1:])]
        assert torch.equal(torch.cat(parts), whole), cuts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_alone_equals_batched(shape, dtype, route):
    need(route, shape, dtype)
    """Property 3: one sequence alone == in batches of 1..64 others, any position, any paging."""
    Hq, Hkv, D = shape
    rng = torch.Generator().manual_seed(sum(shape))
    q, k, v = seq(1234, Hq, Hkv, D, dtype, 5)
    for ql in (1234, 1, 100):
        alone = run(paged([(k, v)], [ql], [q[-ql:]], 16, 0))
        for n_others, bs in ((1, 32), (7, 16), (63, 64)):
            others = []
            for i in range(n_others):
                Lo = int(torch.randint(1, 2100, (1,), generator=rng))
                qo = [Lo, 1, int(torch.randint(0, Lo + 1, (1,), generator=rng))][i % 3]
                qq, kk, vv = seq(Lo, Hq, Hkv, D, dtype, 100 + i)
                others.append(((kk, vv), qo, qq[Lo - qo:]))
            pos = int(torch.randint(0, n_others + 1, (1,), generator=rng))
            items = others[:pos] + [((k, v), ql, q[-ql:])] + others[pos:]
            args = paged([x[0] for x in items], [x[1] for x in items], [x[2] for x in items], bs, n_others)
            cu = args[4].tolist()
            got = run(args)[cu[pos]:cu[pos + 1]]
            assert torch.equal(got, alone), (ql, n_others, pos)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_trainer_contiguous_equals_paged(shape, dtype, route):
    need(route, shape, dtype)
    """Property 4: the trainer's packed layout == the sampler's paged prefill and decodes."""
    Hq, Hkv, D = shape
    seqs = [seq(L, Hq, Hkv, D, dtype, 7 + L) for L in LENS]
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    qc, kc, vc = (torch.cat([s[i] for s in seqs]) for i in range(3))
    trainer = A.attention_contiguous(qc, kc, vc, cu, 0.088, max_seqlen=max(LENS))  # the trainer's bound
    assert torch.equal(A.attention_contiguous(qc, kc, vc, cu, 0.088), trainer)  # and the shapes' bound
    sampler = run(paged([(s[1], s[2]) for s in seqs], LENS, [s[0] for s in seqs], 16, 9))
    assert torch.equal(trainer, sampler)
    q, k, v = seqs[1]
    dec = run(paged([(k[:i + 1], v[:i + 1]) for i in range(2000)], [1] * 2000, [q[i:i + 1] for i in range(2000)], 16, 4))
    c = int(cu[1])
    assert torch.equal(dec, trainer[c:c + 2000])


@pytest.mark.parametrize("bs", [16, 32, 64, 128, 256])
def test_block_size_does_not_change_bits(bs, route):
    """The sampler's block size (vLLM's --block-size) never changes a row: a 2000-token prefill
    and a decode batch in blocks of `bs` == the trainer's packed call. On FA3, blocks of 128
    and 256 let its prefill load pages by TMA while decodes gather them: same bits needed."""
    Hq, Hkv, D = 16, 8, 128
    dtype = torch.bfloat16
    L = 2000
    q, k, v = seq(L, Hq, Hkv, D, dtype, 11)
    trainer = A.attention_contiguous(q, k, v, torch.tensor([0, L], dtype=torch.int32, device=DEV), 0.088, max_seqlen=L)
    assert torch.equal(run(paged([(k, v)], [L], [q], bs, bs)), trainer)
    pos = [0, 15, 16, 127, 128, 129, 255, 256, 1000, 1999]
    dec = run(paged([(k[:i + 1], v[:i + 1]) for i in pos], [1] * len(pos), [q[i:i + 1] for i in pos], bs, bs + 1))
    assert torch.equal(dec, trainer[pos])


def test_reshape_and_cache_gpu(route):
    if route == "fa3":
        pytest.skip("one cache write for both routes")
    for dtype in (torch.bfloat16, torch.float32):
        nb, bs, H, D, T = 64, 16, 8, 128, 300
        kc = torch.randn(nb, bs, H, D, device=DEV).to(dtype)
        vc = torch.randn(nb, bs, H, D, device=DEV).to(dtype)
        k0, v0 = kc.clone(), vc.clone()
        qkv = torch.randn(T, 3 * H, D, device=DEV).to(dtype)
        slots = torch.randperm(nb * bs, device=DEV)[:T]
        slots[::7] = -1
        A.reshape_and_cache(qkv[:, H:2 * H], qkv[:, 2 * H:], kc, vc, slots)
        keep = slots >= 0
        kf, vf = kc.view(-1, H, D), vc.view(-1, H, D)
        assert torch.equal(kf[slots[keep]], qkv[keep, H:2 * H]) and torch.equal(vf[slots[keep]], qkv[keep, 2 * H:])
        untouched = torch.ones(nb * bs, dtype=torch.bool, device=DEV)
        untouched[slots[keep]] = False
        assert torch.equal(kf[untouched], k0.view(-1, H, D)[untouched])
        assert torch.equal(vf[untouched], v0.view(-1, H, D)[untouched])


def test_gradients_vs_float64(route):
    Hq, Hkv, D = 16, 8, 128
    lens = [100, 0, 300, 37]  # an empty sequence too: the flash varlen backward must skip it
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    T = sum(lens)
    g = gen(0)
    base = [torch.randn(T, H, D, generator=g, device=DEV) for H in (Hq, Hkv, Hkv)]
    w = torch.randn(T, Hq, D, generator=g, device=DEV)

    def grads(dtype, fn):
        ts = [t.detach().to(dtype).requires_grad_(True) for t in base]
        (fn(*ts).double() * w.double()).sum().backward()
        return [t.grad.double() for t in ts]

    def reference(q, k, v):
        b = cu.tolist()
        return torch.cat([ref(q[s:e], k[s:e], v[s:e], e - s, 0.088) for s, e in zip(b[:-1], b[1:])])

    expect = grads(torch.float64, reference)
    # bf16 takes PyTorch's FlashAttention varlen backward (fp32 the SDPA route)
    assert AB._flash_ok(base[0].to(torch.bfloat16)) and AB.flash_max_len(cu, T) > 1
    cases = ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)) if route == "triton" else ((torch.bfloat16, 3e-2),)
    for dtype, tol in cases:
        got = grads(dtype, lambda q, k, v: A.attention_contiguous(q, k, v, cu, 0.088))
        for name, a, b in zip("qkv", got, expect):
            err = float((a - b).norm() / b.norm())
            assert err < tol, (dtype, name, err)


def test_gradients_single_token_and_empty_sequences():
    """Max length 1 with an empty sequence and grouped K/V: left to SDPA (FlashAttention's
    one-query path fails there); the gradients still match float64."""
    Hq, Hkv, D = 16, 8, 128
    cu = torch.tensor([0, 0, 1], dtype=torch.int32, device=DEV)
    assert AB.flash_max_len(cu, 1) == 1  # the SDPA route
    g = gen(1)
    base = [torch.randn(1, H, D, generator=g, device=DEV) for H in (Hq, Hkv, Hkv)]
    w = torch.randn(1, Hq, D, generator=g, device=DEV)

    def grads(fn, dtype):
        ts = [t.to(dtype).requires_grad_(True) for t in base]
        (fn(*ts).double() * w.double()).sum().backward()
        return [t.grad.double() for t in ts]

    expect = grads(lambda q, k, v: ref(q, k, v, 1, 0.088), torch.float64)
    got = grads(lambda q, k, v: A.attention_contiguous(q, k, v, cu, 0.088), torch.bfloat16)
    for a, b in zip(got, expect):  # one key: dq = dk = 0, dv = the group's summed weights
        assert float((a - b).abs().max()) <= 3e-2 * max(1.0, float(b.abs().max()))


def test_cuda_graph_capture_replays_the_same_bits():
    """vLLM captures decode steps in CUDA graphs: no host sync, same bits on replay."""
    Hq, Hkv, D = 16, 8, 128
    seqs = [seq(L, Hq, Hkv, D, torch.bfloat16, L) for L in (300, 1000, 50)]
    args = paged([(s[1], s[2]) for s in seqs], [1, 1, 1], [s[0][-1:] for s in seqs], 16, 0)
    eager = run(args)
    bound = longest_query(args)  # 1: decode rows
    newk = torch.randn(3, Hkv, D, device=DEV).to(torch.bfloat16)
    slot = torch.full((3,), -1, dtype=torch.int64, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            run(args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        A.reshape_and_cache(newk, newk, args[1], args[2], slot)
        out = run(args, max_seqlen_q=bound)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.parametrize("q_lens", [(1, 1, 1), (1, 40, 1)], ids=["decode", "mixed"])
def test_shared_schedule_and_out_buffer_same_bits(q_lens, route):
    """The vLLM backend's calls: one `attention_schedule` per step serves every layer (on the
    FA3 route FA3's tile schedule, computed once instead of in each call), and each layer
    writes into vLLM's output buffer (`out=`). Layer after layer, eager and replayed from a
    CUDA graph after the lengths changed, the bits equal plain calls'."""
    Hq, Hkv, D = 16, 8, 128
    layers = []
    for layer in range(3):
        seqs = [seq(L, Hq, Hkv, D, torch.bfloat16, 10 * layer + L) for L in (300, 1000, 50)]
        layers.append(paged([(s[1], s[2]) for s in seqs], list(q_lens), [s[0][-n:] for s, n in zip(seqs, q_lens)],
                            16, 0))
    _, _, _, bt, cu, sl = layers[0]  # same values in every layer (seed 0, same lengths): shared, as in vLLM
    # plus one padded request (no query, no keys), as vLLM pads a batch to a captured graph's size
    bt, cu, sl = torch.cat([bt, bt[:1]]), torch.cat([cu, cu[-1:]]), torch.cat([sl, sl.new_zeros(1)])
    bound = max(q_lens)

    def step(outs):
        sched = A.attention_schedule(layers[0][0], layers[0][1], bt, cu, sl, bound)
        assert (sched is None) == (route == "triton")
        for (q, kc, vc, *_), out in zip(layers, outs):
            assert A.attention(q, kc, vc, bt, cu, sl, 0.088, True, max_seqlen_q=bound, out=out, schedule=sched) is out

    def plain():
        return [run((q, kc, vc, bt, cu, sl)) for q, kc, vc, *_ in layers]

    outs = [torch.full_like(q, float("nan")) for q, *_ in layers]
    step(outs)
    for out, want in zip(outs, plain()):
        assert torch.equal(out, want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(outs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(outs)
    sl.sub_(torch.tensor([7, 100, 9, 0], dtype=torch.int32, device=DEV))  # other lengths, same shapes
    for out in outs:
        out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for out, want in zip(outs, plain()):
        assert torch.equal(out, want)
