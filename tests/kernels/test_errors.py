"""Bad input gets a clear error (never garbage): shapes, dtypes, devices, values, backend setting."""
import pytest
import torch

from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, linear, log_softmax, rms_norm, rotary_embedding,
                              silu_and_mul, token_logprobs)

META = torch.device("meta")


# --- linear ---------------------------------------------------------------------------------

def test_linear_shapes():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="must equal weight's K"):
        linear(torch.randn(3, 15), w)
    with pytest.raises(ValueError, match="2-D"):
        linear(torch.randn(3, 16), w[None])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(torch.randn(3, 16), w, torch.randn(7))
    with pytest.raises(ValueError):
        linear(torch.tensor(1.0), w)


def test_linear_dtypes_and_devices():
    w = torch.randn(8, 16)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        linear(torch.randn(3, 16, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        linear(torch.randn(3, 16), w, torch.randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="support float32, float16 and bfloat16"):
        linear(torch.randn(3, 16, dtype=torch.float64), w.double())
    with pytest.raises(TypeError, match="support float32"):
        linear(torch.ones(3, 16, dtype=torch.int32), w.int())
    with pytest.raises(ValueError, match="one device"):
        linear(torch.randn(3, 16), w.to(META))
    with pytest.raises(ValueError, match="one device"):
        linear(torch.randn(3, 16), w, torch.randn(8, device=META))


# --- norms ----------------------------------------------------------------------------------

def test_norm_errors():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(31), 1e-6)
    with pytest.raises(TypeError, match="one dtype"):
        rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, torch.ones(32, device=META), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        fused_add_rms_norm(x, torch.randn(4, 31), torch.ones(32), 1e-6)
    with pytest.raises(TypeError, match="one dtype"):
        fused_add_rms_norm(x, torch.randn(4, 32, dtype=torch.float16), torch.ones(32), 1e-6)
    with pytest.raises(TypeError, match="support float32"):
        rms_norm(x.double(), torch.ones(32, dtype=torch.float64), 1e-6)


# --- activation -----------------------------------------------------------------------------

def test_silu_and_mul_errors():
    with pytest.raises(ValueError, match="even last dim"):
        silu_and_mul(torch.randn(3, 7))
    with pytest.raises(TypeError, match="support float32"):
        silu_and_mul(torch.ones(3, 8, dtype=torch.int64))


# --- rotary ---------------------------------------------------------------------------------

def test_rotary_errors():
    cache = build_cos_sin_cache(64, 64, 32, 1e4)
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    pos = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 32\)"):
        rotary_embedding(torch.tensor([0, 1, 32]), q, k, cache)
    with pytest.raises(ValueError, match="positions must lie in"):
        rotary_embedding(torch.tensor([0, -1, 2]), q, k, cache)
    with pytest.raises(TypeError, match="int32 or int64"):
        rotary_embedding(pos.float(), q, k, cache)
    with pytest.raises(TypeError, match="fp32"):
        rotary_embedding(pos, q, k, cache.bfloat16())
    with pytest.raises(ValueError, match="tokens but positions has"):
        rotary_embedding(torch.tensor([0, 1]), q, k, cache)
    with pytest.raises(ValueError, match="head_size given"):
        rotary_embedding(pos, q.flatten(1), k.flatten(1), cache)
    with pytest.raises(ValueError, match="not a multiple of head_size"):
        rotary_embedding(pos, q.flatten(1), k.flatten(1), cache, head_size=48)
    with pytest.raises(ValueError, match="no smaller than the cache"):
        rotary_embedding(pos, q[..., :32], k[..., :32], cache)
    with pytest.raises(TypeError, match="one dtype"):
        rotary_embedding(pos, q, k.bfloat16(), cache)
    with pytest.raises(ValueError, match="one device"):
        rotary_embedding(pos, q, k, cache.to(META))
    with pytest.raises(ValueError, match="must be even"):
        build_cos_sin_cache(64, 63, 10, 1e4)
    with pytest.raises(ValueError, match="must be even and <= head_dim"):
        build_cos_sin_cache(64, 128, 10, 1e4)


# --- logprobs -------------------------------------------------------------------------------

def test_logprob_errors():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        log_softmax(x, 0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        log_softmax(x, float("nan"))
    with pytest.raises(ValueError, match="every temperature must be > 0"):
        log_softmax(x, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="one float or one per row"):
        log_softmax(x, torch.ones(2))
    with pytest.raises(ValueError, match="token id out of range"):
        token_logprobs(x, torch.tensor([0, 10, 1]))
    with pytest.raises(ValueError, match="token id out of range"):
        token_logprobs(x, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="leading shape"):
        token_logprobs(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="int32/int64"):
        token_logprobs(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="support float32"):
        log_softmax(x.double())


def test_value_checks_also_run_under_torch_compile():
    cache = build_cos_sin_cache(64, 64, 32, 1e4)

    def f(pos, q, logits, ids):
        return rotary_embedding(pos, q, q, cache)[0], token_logprobs(logits, ids, 0.5)

    cf = torch.compile(f, fullgraph=True)
    q, logits = torch.randn(3, 2, 64), torch.randn(3, 10)
    args = (torch.tensor([0, 1, 2]), q, logits, torch.tensor([1, 2, 3]))
    for a, b in zip(cf(*args), f(*args)):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="positions must lie in"):
        cf(torch.tensor([0, 1, 40]), q, logits, torch.tensor([1, 2, 3]))
    with pytest.raises(Exception, match="token id out of range"):
        cf(torch.tensor([0, 1, 2]), q, logits, torch.tensor([1, 2, 10]))


def test_backend_setting_is_validated(monkeypatch):
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="ONPOLICY_KERNELS_BACKEND"):
        rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "cpu")
    assert rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6).shape == (2, 8)


# --- non-contiguous inputs are handled (same bits as contiguous), for every op --------------

def test_non_contiguous_inputs_give_contiguous_bits():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 300, generator=g)
    xt = base.t()  # [300, 64], transposed
    w = torch.randn(64, generator=g)
    r = torch.randn(64, 300, generator=g).t()
    assert torch.equal(rms_norm(xt, w, 1e-6), rms_norm(xt.contiguous(), w, 1e-6))
    o1, h1 = fused_add_rms_norm(xt, r, w, 1e-6)
    o2, h2 = fused_add_rms_norm(xt.contiguous(), r.contiguous(), w, 1e-6)
    assert torch.equal(o1, o2) and torch.equal(h1, h2)
    assert torch.equal(silu_and_mul(xt), silu_and_mul(xt.contiguous()))
    assert torch.equal(log_softmax(xt, 0.7), log_softmax(xt.contiguous(), 0.7))
    W = torch.randn(32, 64, generator=g)
    assert torch.equal(linear(xt, W), linear(xt.contiguous(), W))
    cache = build_cos_sin_cache(64, 64, 64, 1e4)
    q = torch.randn(4, 300, 64, generator=g).transpose(0, 1)  # [300, 4, 64] with token stride 64
    k = torch.randn(300, 2, 128, generator=g)[..., ::2]  # last-dim stride 2
    pos = torch.randint(0, 64, (300,), generator=g)
    a = rotary_embedding(pos, q, k, cache)
    b = rotary_embedding(pos, q.contiguous(), k.contiguous(), cache)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
