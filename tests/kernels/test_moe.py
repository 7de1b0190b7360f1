"""CPU path of the MoE op (`moe_route`, `moe_experts`, `moe_combine`, `moe`): a token's bits are
independent of the batch and of the experts' load; the tie rule; float64 references; backward."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import DTYPE_IDS, DTYPES, REL_TOL, gen, hide, num_threads, randn, rel_err
import onpolicy_kernels as K
from onpolicy_kernels.ops.moe import expert_outputs

H, I = 64, 48


def _weights(E, dtype, g, H=H, I=I):
    gate = randn(E, H, dtype=dtype, g=g, scale=0.3)
    w13 = randn(E, 2 * I, H, dtype=dtype, g=g, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dtype, g=g, scale=I ** -0.5)
    return gate, w13, w2


def _ref(x, gate, w13, w2, top_k, renormalize):
    """float64 reference: softmax, top-k (by the op's own choice of experts), gated SiLU, weighted sum."""
    logits = (x.double() @ gate.double().T).to(x.dtype).double()  # the op's logits are rounded to x.dtype
    p = torch.softmax(logits, -1)
    _, ids = K.moe_route(logits.to(x.dtype), top_k, renormalize)
    v = p.gather(1, ids)
    if renormalize:
        v = v / v.sum(-1, keepdim=True)
    I_ = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:I_]) * h[I_:]
            out[t] += v[t, j] * (w2[e].double() @ a)
    return out


@settings(max_examples=20, deadline=None)
@given(M=st.integers(1, 200), E=st.sampled_from((4, 8, 16)), top_k=st.integers(1, 4), renorm=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_token_bits_invariant_to_batch(M, E, top_k, renorm, dtype, seed):
    """Probe tokens alone, one at a time, and hidden among M random tokens: same output, same experts,
    same weights, bit for bit (and close to the float64 reference)."""
    g = gen(seed)
    gate, w13, w2 = _weights(E, dtype, g)
    probes = randn(5, H, dtype=dtype, g=g)
    alone, logits = K.moe(probes, gate, w13, w2, top_k, renorm)
    w_alone, ids_alone = K.moe_route(logits, top_k, renorm)
    one, _ = K.moe(probes[3:4], gate, w13, w2, top_k, renorm)
    assert torch.equal(one, alone[3:4])
    batch, pos, n = hide(probes, M, g)
    out, blogits = K.moe(batch, gate, w13, w2, top_k, renorm)
    w_b, ids_b = K.moe_route(blogits, top_k, renorm)
    assert torch.equal(out[pos], alone[:n])
    assert torch.equal(ids_b[pos], ids_alone[:n]) and torch.equal(w_b[pos], w_alone[:n])
    assert rel_err(out, _ref(batch, gate, w13, w2, top_k, renorm)) < 2 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_token_bits_invariant_to_expert_load(dtype):
    """A token routed to experts (2, 5): its expert outputs do not change when 0, 1, 15, 16, 17 or 300
    other tokens go to those experts too (the per-expert GEMM's M changes across tile edges)."""
    g = gen(3)
    E = 8
    _, w13, w2 = _weights(E, dtype, g)
    probe = randn(1, H, dtype=dtype, g=g)
    ids_p = torch.tensor([[2, 5]])
    base = expert_outputs(probe, ids_p, w13, w2)
    weights = torch.tensor([[0.7, 0.3]])
    combined = K.moe_experts(probe, weights, ids_p, w13, w2)
    for load in (1, 15, 16, 17, 300):
        others = randn(load, H, dtype=dtype, g=g)
        x = torch.cat([others[: load // 2], probe, others[load // 2:]])
        ids = torch.randint(0, E, (load + 1, 2), generator=g)
        ids[:, 0] = 2  # every token also takes expert 2 (heavy load)
        ids[:, 1] = torch.where(ids[:, 1] == 2, 5, ids[:, 1])
        ids[load // 2] = ids_p[0]
        w = torch.rand(load + 1, 2, generator=g)
        w[load // 2] = weights[0]
        y = expert_outputs(x, ids, w13, w2)
        assert torch.equal(y[load // 2: load // 2 + 1], base), load
        assert torch.equal(K.moe_experts(x, w, ids, w13, w2)[load // 2: load // 2 + 1], combined), load


def test_tie_goes_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],   # three-way tie at the top
                           [2.0, 2.0, 2.0, 2.0, 2.0],   # all equal
                           [0.0, 1.0, 0.5, 1.0, 5.0]])  # tie for second place
    _, ids = K.moe_route(logits, 3, False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [4, 1, 3]]
    w, ids2 = K.moe_route(logits[1:2], 2, True)
    assert ids2.tolist() == [[0, 1]] and w.tolist() == [[0.5, 0.5]]


@pytest.mark.parametrize("renorm", [True, False])
def test_route_weights_match_float64(renorm):
    g = gen(5)
    logits = randn(50, 16, g=g, scale=3.0)
    w, ids = K.moe_route(logits, 4, renorm)
    p = torch.softmax(logits.double(), -1)
    v, ref_ids = p.topk(4)
    assert torch.equal(ids, ref_ids)  # random logits have no ties
    if renorm:
        v = v / v.sum(-1, keepdim=True)
        assert torch.allclose(w.double().sum(-1), torch.ones(50, dtype=torch.float64), atol=1e-6)
    assert w.dtype == torch.float32 and rel_err(w, v) < 1e-6


def test_combine_is_fp32_slot_order_rounded_once():
    y = torch.tensor([[[1.0, 3.0], [2.0 ** -9, 1.0]]], dtype=torch.bfloat16)  # [T=1, k=2, H=2]
    w = torch.tensor([[1.0, 1.0]])
    out = K.moe_combine(y, w)
    # 1 + 2**-9 is not a bf16 number; fp32 keeps it until the one rounding (to 1.0, ties to even) --
    # the expected value is exactly that rounding of the fp32 sum.
    assert torch.equal(out, (y[:, 0].float() + y[:, 1].float()).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_bits_with_one_and_two_threads(dtype):
    g = gen(7)
    gate, w13, w2 = _weights(8, dtype, g)
    x = randn(70, H, dtype=dtype, g=g)
    with num_threads(1):
        a, _ = K.moe(x, gate, w13, w2, 2, True)
    with num_threads(2):
        b, _ = K.moe(x, gate, w13, w2, 2, True)
    assert torch.equal(a, b)


def test_backward_matches_plain_torch():
    """fp32 gradients (x, gate, experts) against a plain differentiable MoE with the same routing."""
    g = gen(9)
    gate, w13, w2 = _weights(8, torch.float32, g)
    x = randn(30, H, g=g)
    grad = randn(30, H, g=g)

    def plain(x, gate, w13, w2):
        logits = x @ gate.T
        p = torch.softmax(logits, -1)
        v, ids = p.topk(2)
        v = v / v.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in range(2):
            h = torch.einsum("th,tih->ti", x, w13[ids[:, j]])
            a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            out = out + v[:, j:j + 1] * torch.einsum("ti,thi->th", a, w2[ids[:, j]])
        return out, logits

    grads = []
    for fn in (lambda *a: K.moe(*a, 2, True), plain):
        ps = [t.clone().requires_grad_(True) for t in (x, gate, w13, w2)]
        out, logits = fn(*ps)
        ((out * grad).sum() + logits.sum()).backward()
        grads.append([p.grad for p in ps])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5


def test_traced_call_goes_through_one_op_with_the_same_bits():
    """Under torch.compile (vLLM compiles its model) `moe_routed` is one opaque op: same bits as eager."""
    g = gen(11)
    gate, w13, w2 = _weights(8, torch.bfloat16, g)
    x = randn(20, H, dtype=torch.bfloat16, g=g)
    logits = K.linear(x, gate)
    eager = K.moe_routed(x, logits, w13, w2, 2, True)
    compiled = torch.compile(K.moe_routed, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, logits, w13, w2, 2, True), eager)


def test_errors_name_the_problem():
    g = gen(13)
    gate, w13, w2 = _weights(4, torch.float32, g)
    x = randn(3, H, g=g)
    with pytest.raises(ValueError, match="top_k must be an int in 1..4"):
        K.moe(x, gate, w13, w2, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        K.moe_route(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="inconsistent MoE shapes"):
        K.moe_experts(x, torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.long), w13, w2[:, :, :5])
    with pytest.raises(ValueError, match="expert ids must lie in 0..3"):
        K.moe_experts(x, torch.ones(3, 1), torch.full((3, 1), 4), w13, w2)
    with pytest.raises(ValueError, match="gate_weight must be"):
        K.moe(x, gate[:3], w13, w2, 2)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        K.moe(x.half(), gate.half(), w13, w2, 2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("fp32", "fp16"))
def test_triton_path_under_the_interpreter_is_invariant(dtype, monkeypatch):
    """The GPU composition (Triton linear / silu_and_mul) on tiny shapes under TRITON_INTERPRET=1: a token's
    bits do not depend on the batch, and it agrees with the CPU path to rounding (dot dtypes only: the
    interpreter's bf16 dot is wrong)."""
    import os

    from onpolicy_kernels._triton import HAS_TRITON

    if not (HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")):
        pytest.skip("needs triton with TRITON_INTERPRET=1 (tests/kernels/conftest.py)")
    g = gen(17)
    gate, w13, w2 = _weights(4, dtype, g, H=32, I=16)
    probes = randn(3, 32, dtype=dtype, g=g)
    cpu, _ = K.moe(probes, gate, w13, w2, 2, True)
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "triton")
    alone, _ = K.moe(probes, gate, w13, w2, 2, True)
    batch, pos, n = hide(probes, 19, g)
    out, _ = K.moe(batch, gate, w13, w2, 2, True)
    assert torch.equal(out[pos], alone[:n])
    assert rel_err(alone, cpu) < 4 * REL_TOL[dtype]
