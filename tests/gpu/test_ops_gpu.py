"""GPU: RMSNorm (+ residual), SiLU-mul, rotary, log-softmax and token logprobs at model sizes.

Each op's rows (tokens) must come out bitwise equal whatever batch they are
computed in (probe rows at random positions in batches of 1..8192 rows), in
bf16, fp16 and fp32, and be right against a float64 reference.
"""
import pytest
import torch

from _gpu_util import pytestmark, require_compiled_triton  # noqa: F401
from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, log_softmax, rms_norm, rotary_embedding,
                              silu_and_mul, token_logprobs)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
IDS = ["bf16", "fp16", "fp32"]
MS = (1, 2, 7, 64, 513, 4096, 8192)
P = 16
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _batches(probes, ms, g):
    """Yield (batch, positions) with the probe rows placed at random positions in each batch size."""
    for M in ms:
        x = torch.randn((M,) + probes.shape[1:], device="cuda", dtype=probes.dtype, generator=g)
        n = min(M, probes.shape[0])
        pos = torch.randperm(M, device="cuda", generator=g)[:n]
        x[pos] = probes[:n]
        yield x, pos, n


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("H", [2048, 4096, 1536, 128, 100])  # 128/100: several rows per program (q/k norms)
def test_rms_norm_and_fused_add(dtype, H):
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(H)
    w = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dtype)
    px = torch.randn(P, H, device="cuda", dtype=dtype, generator=g)
    pr = torch.randn(P, H, device="cuda", dtype=dtype, generator=g)
    alone = torch.cat([rms_norm(px[i : i + 1], w, 1e-6) for i in range(P)])
    fa = [fused_add_rms_norm(px[i : i + 1], pr[i : i + 1], w, 1e-6) for i in range(P)]
    f_out, f_h = torch.cat([a for a, _ in fa]), torch.cat([h for _, h in fa])
    assert torch.equal(f_h, (px.float() + pr.float()).to(dtype))  # residual rounded before the norm
    xd = px.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert _rel(alone, ref) < TOL[dtype]
    for x, pos, n in _batches(torch.cat([px, pr], 1), MS, g):
        xx, rr = x[:, :H].contiguous(), x[:, H:].contiguous()
        assert torch.equal(rms_norm(xx, w, 1e-6)[pos], alone[:n])
        o, h = fused_add_rms_norm(xx, rr, w, 1e-6)
        assert torch.equal(o[pos], f_out[:n]) and torch.equal(h[pos], f_h[:n])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rms_norm_per_head_views(dtype):
    """Qwen3's q/k norms on per-head views [T, H, 128] of a fused QKV output, read in place:
    a token's bits equal its contiguous copy's and do not depend on the number of tokens."""
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(7)
    w = (1 + 0.1 * torch.randn(128, device="cuda", generator=g)).to(dtype)
    probes = torch.randn(P, 32 * 128, device="cuda", dtype=dtype, generator=g)
    alone = torch.cat([rms_norm(probes[i : i + 1, : 16 * 128].view(1, 16, 128), w, 1e-6) for i in range(P)])
    # the k view: 8 heads, so a token's rows move within the 16-row programs as T changes
    k_alone = torch.cat([rms_norm(probes[i : i + 1, 16 * 128 : 24 * 128].view(1, 8, 128), w, 1e-6)
                         for i in range(P)])
    for x, pos, n in _batches(probes, MS, g):
        view = x[:, : 16 * 128].view(x.shape[0], 16, 128)
        out = rms_norm(view, w, 1e-6)
        assert torch.equal(out, rms_norm(view.contiguous(), w, 1e-6))
        assert torch.equal(out[pos], alone[:n])
        k = rms_norm(x[:, 16 * 128 : 24 * 128].view(x.shape[0], 8, 128), w, 1e-6)
        assert torch.equal(k[pos], k_alone[:n])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("D", [6144, 12288, 1000])
def test_silu_and_mul(dtype, D):
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(D)
    probes = torch.randn(P, 2 * D, device="cuda", dtype=dtype, generator=g) * 3
    alone = torch.cat([silu_and_mul(probes[i : i + 1]) for i in range(P)])
    gd, ud = probes[:, :D].double(), probes[:, D:].double()
    assert _rel(alone, gd * torch.sigmoid(gd) * ud) < TOL[dtype]
    for x, pos, n in _batches(probes, MS, g):
        assert torch.equal(silu_and_mul(x)[pos], alone[:n])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("is_neox,rot", [(True, 128), (False, 128), (True, 64)])
def test_rotary(dtype, is_neox, rot):
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(rot + is_neox)
    D, Hq, Hk = 128, 16, 8
    cache = build_cos_sin_cache(D, rot, 40960, 1e6).cuda()
    pq = torch.randn(P, Hq, D, device="cuda", dtype=dtype, generator=g)
    pk = torch.randn(P, Hk, D, device="cuda", dtype=dtype, generator=g)
    ppos = torch.randint(0, 40960, (P,), device="cuda", generator=g)
    aq, ak = zip(*[rotary_embedding(ppos[i : i + 1], pq[i : i + 1], pk[i : i + 1], cache, is_neox=is_neox) for i in range(P)])
    aq, ak = torch.cat(aq), torch.cat(ak)
    # float64 reference rotation
    c, s = cache[ppos, : rot // 2].double()[:, None], cache[ppos, rot // 2 :].double()[:, None]
    xd = pq.double()
    x1, x2 = (xd[..., : rot // 2], xd[..., rot // 2 : rot]) if is_neox else (xd[..., 0:rot:2], xd[..., 1:rot:2])
    ref = xd.clone()
    if is_neox:
        ref[..., : rot // 2], ref[..., rot // 2 : rot] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        ref[..., 0:rot:2], ref[..., 1:rot:2] = x1 * c - x2 * s, x2 * c + x1 * s
    assert _rel(aq, ref) < TOL[dtype]
    assert torch.equal(aq[..., rot:], pq[..., rot:])
    for M in MS:
        q = torch.randn(M, Hq, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(M, Hk, D, device="cuda", dtype=dtype, generator=g)
        pos = torch.randint(0, 40960, (M,), device="cuda", generator=g)
        n = min(M, P)
        idx = torch.randperm(M, device="cuda", generator=g)[:n]
        q[idx], k[idx], pos[idx] = pq[:n], pk[:n], ppos[:n]
        # the flattened [T, H*D] layout of a fused qkv projection, as vLLM passes it
        qkv = torch.cat([q.flatten(1), k.flatten(1), torch.zeros_like(k.flatten(1))], 1)
        oq, ok = rotary_embedding(pos, qkv[:, : Hq * D], qkv[:, Hq * D : (Hq + Hk) * D], cache, head_size=D, is_neox=is_neox)
        assert torch.equal(oq.view(M, Hq, D)[idx], aq[:n]) and torch.equal(ok.view(M, Hk, D)[idx], ak[:n])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("V", [151936, 32000, 1000])
def test_log_softmax_and_token_logprobs(dtype, V):
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(V)
    probes = (torch.randn(P, V, device="cuda", generator=g) * 4).to(dtype)
    temps = torch.rand(P, device="cuda", generator=g) + 0.3
    alone = torch.cat([log_softmax(probes[i : i + 1], temps[i : i + 1]) for i in range(P)])
    assert alone.dtype == torch.float32
    ref = torch.log_softmax(probes.double() / temps.double()[:, None], -1)
    assert (alone.double() - ref).abs().max().item() < 1e-4
    toks = torch.randint(0, V, (P,), device="cuda", generator=g)
    tok_alone = torch.cat([token_logprobs(probes[i : i + 1], toks[i : i + 1], temps[i : i + 1]) for i in range(P)])
    assert torch.equal(tok_alone, alone.gather(1, toks[:, None])[:, 0])  # == log_softmax indexed, bitwise
    ms = (1, 3, 64, 513, 2048) if V == 151936 else MS
    for x, pos, n in _batches(probes, ms, g):
        M = x.shape[0]
        t = torch.rand(M, device="cuda", generator=g) + 0.3
        t[pos] = temps[:n]
        ids = torch.randint(0, V, (M,), device="cuda", generator=g)
        ids[pos] = toks[:n]
        full = log_softmax(x, t)
        assert torch.equal(full[pos], alone[:n])
        tl_ = token_logprobs(x, ids, t)
        assert torch.equal(tl_[pos], tok_alone[:n])
        assert torch.equal(tl_, full.gather(1, ids[:, None])[:, 0])
        del full, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_log_softmax_split_and_rows_launches_give_the_same_bits(dtype):
    """Few rows take the split launch (program per row and vocab chunk), many rows the rows
    launch (program per row); both compute the same operations, so the same bits."""
    require_compiled_triton()

    import onpolicy_kernels.ops.logprobs as LP
    g = torch.Generator(device="cuda").manual_seed(11)
    V = 151936
    x = (torch.randn(200, V, device="cuda", generator=g) * 4).to(dtype)
    x[3, : V // 2] = float("-inf")  # whole chunks masked out
    t = torch.rand(200, device="cuda", generator=g) + 0.3
    ids = torch.randint(0, V, (200,), device="cuda", generator=g)
    a, b = LP._log_softmax_impl(x, t, split=True), LP._log_softmax_impl(x, t, split=False)
    assert torch.equal(a, b)
    ta, tb = LP._token_logprobs_impl(x, ids, t, split=True), LP._token_logprobs_impl(x, ids, t, split=False)
    assert torch.equal(ta, tb) and torch.equal(ta, a.gather(1, ids[:, None])[:, 0])
    assert LP.split_launch(8) and not LP.split_launch(LP.SPLIT_MAX_ROWS + 1)


@pytest.mark.parametrize("src", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logprobs_of_half_logits_equal_those_of_the_same_values_in_fp32(src):
    """vLLM's V1 sampler casts the LM head's bf16 logits to fp32 before sampling; the trainer passes
    them as the head gave them. Same values, so the same bits are owed, on both launches and for
    token_logprobs too: the lanes' sum is an explicit tree, not tl.sum, whose order follows the
    register layout the load's dtype sets (an H100 gave 1-ulp differences before)."""
    require_compiled_triton()

    import onpolicy_kernels.ops.logprobs as LP
    g = torch.Generator(device="cuda").manual_seed(13)
    V = 151936
    x = (torch.randn(300, V, device="cuda", generator=g) * 3).to(src)
    x32 = x.float()
    t = torch.rand(300, device="cuda", generator=g) + 0.3
    ids = torch.randint(0, V, (300,), device="cuda", generator=g)
    for split in (True, False):
        assert torch.equal(LP._log_softmax_impl(x, t, split=split), LP._log_softmax_impl(x32, t, split=split))
        assert torch.equal(LP._token_logprobs_impl(x, ids, t, split=split),
                           LP._token_logprobs_impl(x32, ids, t, split=split))
    for M in (1, 8, 300):  # the public ops, the launch chosen by rows; a float temperature
        assert torch.equal(log_softmax(x[:M], 1.0), log_softmax(x32[:M], 1.0))
        assert torch.equal(token_logprobs(x[:M], ids[:M], 0.7), token_logprobs(x32[:M], ids[:M], 0.7))


def test_scalar_temperature_equals_per_row_tensor():
    require_compiled_triton()
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(33, 151936, device="cuda", dtype=torch.bfloat16, generator=g)
    assert torch.equal(log_softmax(x, 0.7), log_softmax(x, torch.full((33,), 0.7, device="cuda")))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("W", [2, 4, 8])
def test_rank_sum_triton_equals_cpu_path(dtype, W):
    """The tensor-parallel rank-order sum: the Triton kernel == the CPU path's torch steps on the GPU's
    own tensors (fp32 adds in rank order, one round-to-nearest-even conversion), at decode and prefill
    sizes of a hidden-2048/4096 layer."""
    require_compiled_triton()
    from onpolicy_kernels import rank_sum
    from onpolicy_kernels.ops.reduce import _torch

    g = torch.Generator(device="cuda").manual_seed(W)
    for M, H in ((1, 2048), (7, 4096), (256, 2048), (4096, 4096)):
        parts = (torch.randn(W, M, H, device="cuda", generator=g) * 4).to(dtype)
        got = rank_sum(parts)
        assert torch.equal(got, _torch(parts)), (M, H)
        assert torch.equal(rank_sum(parts[:, :1]), got[:1])
