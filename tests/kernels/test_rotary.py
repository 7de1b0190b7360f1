"""CPU path of `rotary_embedding` and `build_cos_sin_cache`."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, REL_TOL, gen, num_threads, randn, rel_err
from onpolicy_kernels import build_cos_sin_cache, rotary_embedding

MAXPOS = 4096
CACHES = {}


def _cache(D, rot, base=1e6):
    key = (D, rot, base)
    if key not in CACHES:
        CACHES[key] = build_cos_sin_cache(D, rot, MAXPOS, base)
    return CACHES[key]


def _ref(pos, x, cache, is_neox):
    """float64 rotation of x [T, H, D] by the (fp32) cache rows."""
    rot = cache.shape[1]
    c = cache[pos, : rot // 2].double()[:, None]
    s = cache[pos, rot // 2 :].double()[:, None]
    xd = x.double()
    out = xd.clone()
    if is_neox:
        x1, x2 = xd[..., : rot // 2], xd[..., rot // 2 : rot]
        out[..., : rot // 2], out[..., rot // 2 : rot] = x1 * c - x2 * s, x2 * c + x1 * s
    else:
        x1, x2 = xd[..., 0:rot:2], xd[..., 1:rot:2]
        out[..., 0:rot:2], out[..., 1:rot:2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 300), dtype=st.sampled_from(DTYPES), is_neox=st.booleans(),
       heads=st.sampled_from([(16, 8, 128, 128), (4, 1, 64, 32), (32, 8, 128, 64), (2, 2, 80, 80)]),
       seed=st.integers(0, 2**31 - 1))
def test_tokens_bitwise_invariant_to_batch(T, dtype, is_neox, heads, seed):
    Hq, Hk, D, rot = heads
    g = gen(seed)
    cache = _cache(D, rot)
    P = 6
    pq, pk = randn(P, Hq, D, dtype=dtype, g=g), randn(P, Hk, D, dtype=dtype, g=g)
    ppos = torch.randint(0, MAXPOS, (P,), generator=g)
    aq, ak = rotary_embedding(ppos, pq, pk, cache, is_neox=is_neox)
    q, k = randn(T, Hq, D, dtype=dtype, g=g), randn(T, Hk, D, dtype=dtype, g=g)
    pos = torch.randint(0, MAXPOS, (T,), generator=g)
    n = min(T, P)
    idx = torch.randperm(T, generator=g)[:n]
    q[idx], k[idx], pos[idx] = pq[:n], pk[:n], ppos[:n]
    # the flattened [T, H*D] layout of a fused qkv output (strided views), as vLLM passes it
    qkv = torch.cat([q.flatten(1), k.flatten(1), k.flatten(1)], 1)
    oq, ok = rotary_embedding(pos, qkv[:, : Hq * D], qkv[:, Hq * D : (Hq + Hk) * D], cache, head_size=D, is_neox=is_neox)
    assert oq.shape == (T, Hq * D) and ok.shape == (T, Hk * D)
    assert torch.equal(oq.view(T, Hq, D)[idx], aq[:n]) and torch.equal(ok.view(T, Hk, D)[idx], ak[:n])
    assert rel_err(oq.view(T, Hq, D), _ref(pos, q, cache, is_neox)) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("rot", [128, 64], ids=["full", "partial"])
def test_correct_against_float64(dtype, is_neox, rot):
    g = gen(1)
    cache = _cache(128, rot)
    q, k = randn(50, 8, 128, dtype=dtype, g=g), randn(50, 2, 128, dtype=dtype, g=g)
    pos = torch.randint(0, MAXPOS, (50,), generator=g)
    q0, k0 = q.clone(), k.clone()
    oq, ok = rotary_embedding(pos, q, k, cache, is_neox=is_neox)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs are not modified
    assert oq.dtype == dtype and oq.shape == q.shape
    assert rel_err(oq, _ref(pos, q, cache, is_neox)) < REL_TOL[dtype]
    assert rel_err(ok, _ref(pos, k, cache, is_neox)) < REL_TOL[dtype]
    assert torch.equal(oq[..., rot:], q[..., rot:])  # the dims past rot_dim pass through
    if rot == 128:
        # position 0 is the identity (cos 1, sin 0)
        z = torch.zeros(50, dtype=torch.long)
        assert torch.equal(rotary_embedding(z, q, k, cache, is_neox=is_neox)[0], q)


def test_neox_and_gptj_differ_and_rotation_preserves_norm():
    g = gen(2)
    cache = _cache(64, 64)
    q = randn(10, 4, 64, g=g)
    pos = torch.arange(1, 11)
    a, _ = rotary_embedding(pos, q, q, cache, is_neox=True)
    b, _ = rotary_embedding(pos, q, q, cache, is_neox=False)
    assert not torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)


def test_cache_values_and_determinism():
    c = build_cos_sin_cache(128, 128, 1000, 10000.0)
    assert c.dtype == torch.float32 and c.shape == (1000, 128)
    assert torch.equal(c, build_cos_sin_cache(128, 128, 1000, 10000.0))  # same bits every time
    inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    f = torch.arange(1000, dtype=torch.float64)[:, None] * inv
    assert (c[:, :64].double() - f.cos()).abs().max() < 1e-7
    assert (c[:, 64:].double() - f.sin()).abs().max() < 1e-7
    with num_threads(1):
        assert torch.equal(c, build_cos_sin_cache(128, 128, 1000, 10000.0))


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from onpolicy_kernels.ops.rotary import _inv_freq

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling=dict(scaling))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = _inv_freq(128, 500000.0, scaling)
    assert (ours - theirs.double()).abs().max() / ours.abs().max() < 1e-7
    with pytest.raises(NotImplementedError, match="rope type"):
        build_cos_sin_cache(128, 128, 10, 1e4, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_is_the_inverse_rotation(dtype):
    g = gen(3)
    cache = _cache(64, 32)
    q = randn(7, 4, 64, dtype=dtype, g=g).requires_grad_()
    k = randn(7, 2, 64, dtype=dtype, g=g).requires_grad_()
    pos = torch.randint(0, MAXPOS, (7,), generator=g)
    gq, gk = randn(7, 4, 64, g=g), randn(7, 2, 64, g=g)
    oq, ok = rotary_embedding(pos, q, k, cache, is_neox=False)
    ((oq.float() * gq).sum() + (ok.float() * gk).sum()).backward()
    qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ((_ref(pos, qd, cache, False) * gq.double()).sum() + (_ref(pos, kd, cache, False) * gk.double()).sum()).backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert q.grad.dtype == dtype and rel_err(q.grad, qd.grad) < tol and rel_err(k.grad, kd.grad) < tol


def test_int32_positions_and_empty():
    cache = _cache(64, 64)
    q, k = torch.randn(5, 2, 64), torch.randn(5, 1, 64)
    p = torch.tensor([0, 7, 3, 4095, 1])
    assert torch.equal(rotary_embedding(p, q, k, cache)[0], rotary_embedding(p.int(), q, k, cache)[0])
    oq, ok = rotary_embedding(torch.empty(0, dtype=torch.long), q[:0], k[:0], cache)
    assert oq.shape == (0, 2, 64) and ok.shape == (0, 1, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_bits_with_one_and_two_threads(dtype):
    g = gen(6)
    cache = _cache(128, 128)
    q, k = randn(300, 16, 128, dtype=dtype, g=g), randn(300, 8, 128, dtype=dtype, g=g)
    pos = torch.randint(0, MAXPOS, (300,), generator=g)
    with num_threads(2):
        a = rotary_embedding(pos, q, k, cache)
    with num_threads(1):
        b = rotary_embedding(pos, q, k, cache)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
