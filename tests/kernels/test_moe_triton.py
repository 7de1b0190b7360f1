"""The MoE op's Triton kernels (ops/moe_triton.py) under TRITON_INTERPRET=1, tiny shapes.

A token's bits alone == in batches of other sizes and other expert loads (torch.equal); close to
a float64 reference; the alignment (empty experts, padding, surplus blocks); the router's tie
rule and distinct experts (NaN rows too); padding rows never written. Dot dtypes fp16/fp32 (the
interpreter's bf16 dot is wrong); bf16 for the router and the combine. The interpreter's tl.dot
is replaced by an in-order elementwise one (tests/kernels/_interp_dot.py), so BLOCK_K does not
change bits here; the controls below show each check can fail.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _invariance import REL_TOL, gen, hide, randn, rel_err
import onpolicy_kernels as K
from onpolicy_kernels._triton import HAS_TRITON

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                reason="needs triton with TRITON_INTERPRET=1 set before import (tests/conftest.py)")

if HAS_TRITON:
    from onpolicy_kernels.ops import moe_triton as MT

H, I, E = 32, 16, 8
DOT = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "triton")


def _weights(dtype, g, E=E):
    gate = randn(E, H, dtype=dtype, g=g, scale=0.5)
    w13 = randn(E, 2 * I, H, dtype=dtype, g=g, scale=H ** -0.5)
    w2 = randn(E, H, I, dtype=dtype, g=g, scale=I ** -0.5)
    return gate, w13, w2


def _ref_experts(x, ids, w13, w2):
    """float64 y [T, k, H] for the given expert ids."""
    out = torch.zeros(*ids.shape, x.shape[1], dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ x[t].double()
            out[t, j] = w2[e].double() @ (torch.nn.functional.silu(h[:I]) * h[I:])
    return out


@settings(max_examples=6, deadline=None)
@given(M=st.integers(1, 40), top_k=st.integers(1, 3), renorm=st.booleans(), dtype=st.sampled_from(DOT),
       seed=st.integers(0, 2**31 - 1))
def test_token_bits_alone_equal_in_any_batch(M, top_k, renorm, dtype, seed):
    os.environ["ONPOLICY_KERNELS_BACKEND"] = "triton"  # hypothesis re-enters outside the fixture's scope
    g = gen(seed)
    gate, w13, w2 = _weights(dtype, g)
    probes = randn(3, H, dtype=dtype, g=g)
    alone, logits = K.moe(probes, gate, w13, w2, top_k, renorm)
    one, _ = K.moe(probes[1:2], gate, w13, w2, top_k, renorm)
    assert torch.equal(one, alone[1:2])
    batch, pos, n = hide(probes, M, g)
    out, blogits = K.moe(batch, gate, w13, w2, top_k, renorm)
    assert torch.equal(out[pos], alone[:n])
    w, ids = K.moe_route(blogits, top_k, renorm)
    ref = (_ref_experts(batch, ids, w13, w2) * w.double().unsqueeze(-1)).sum(1)
    assert rel_err(out, ref) < 4 * REL_TOL[dtype]


@pytest.mark.parametrize("dtype", DOT, ids=("fp32", "fp16"))
def test_token_bits_invariant_to_expert_load(dtype):
    """A token on experts (2, 5): its expert outputs are the same bits when 0..40 other tokens go to
    those experts (blocks of BLOCK_M=16 rows fill, split and pad differently) and others are empty."""
    g = gen(3)
    _, w13, w2 = _weights(dtype, g)
    probe = randn(1, H, dtype=dtype, g=g)
    ids_p = torch.tensor([[2, 5]])
    base = K.ops.moe.expert_outputs(probe, ids_p, w13, w2)
    assert rel_err(base, _ref_experts(probe, ids_p, w13, w2)) < 2 * REL_TOL[dtype]
    for load in (1, 15, 16, 17, 40):
        others = randn(load, H, dtype=dtype, g=g)
        x = torch.cat([others[: load // 2], probe, others[load // 2:]])
        ids = torch.stack([torch.full((load + 1,), 2), torch.randint(3, 5, (load + 1,), generator=g)], 1)
        ids[load // 2] = ids_p[0]  # experts 0, 1, 6, 7 empty; 2 heavy
        y = K.ops.moe.expert_outputs(x, ids, w13, w2)
        assert torch.equal(y[load // 2 : load // 2 + 1], base), load
        assert rel_err(y, _ref_experts(x, ids, w13, w2)) < 2 * REL_TOL[dtype]


def test_control_another_program_is_caught():
    """Control: the equality checks are sensitive at these shapes -- the same tokens through a
    different program (fp32 weights and activations, rounded to fp16 only at the end: no rounding of
    gate/up before the SiLU nor of the SiLU before the down GEMM) do not give the same bits."""
    g = gen(4)
    _, w13, w2 = _weights(torch.float16, g)
    x = randn(6, H, dtype=torch.float16, g=g)
    ids = torch.tensor([[2, 5], [1, 2], [5, 0], [2, 7], [3, 5], [6, 2]])
    y = K.ops.moe.expert_outputs(x, ids, w13, w2)
    y32 = K.ops.moe.expert_outputs(x.float(), ids, w13.float(), w2.float())
    assert rel_err(y32, y) < 4 * REL_TOL[torch.float16]
    assert not torch.equal(y32.to(torch.float16), y)


def test_alignment_layout():
    """Pairs grouped by expert in pair order, each group padded to BLOCK_M with the sentinel, empty
    experts take no block, surplus blocks are -1; buffers sized by the worst case."""
    ids = torch.tensor([[3, 1], [3, 0], [1, 3], [6, 3]])  # experts 2, 4, 5, 7 empty
    bm = 4
    sp, be, nb = MT.align(ids, 8, bm)
    assert nb == -(-(8 + 8 * (bm - 1)) // bm) and sp.numel() == nb * bm
    N = ids.numel()
    flat = ids.reshape(-1)
    expect, blocks = [], []
    for e in range(8):
        mine = [p for p in range(N) if int(flat[p]) == e]
        if mine:
            padded = mine + [N] * (-len(mine) % bm)
            expect += padded
            blocks += [e] * (len(padded) // bm)
    assert sp[: len(expect)].tolist() == expect
    assert be.tolist() == blocks + [-1] * (nb - len(blocks))


def test_padding_rows_are_never_written():
    g = gen(6)
    _, w13, w2 = _weights(torch.float16, g)
    x = randn(5, H, dtype=torch.float16, g=g)
    ids = torch.tensor([[0, 1], [1, 0], [0, 4], [4, 1], [1, 0]])
    cfg = MT.expert_config(x, w13)
    sp, be, nb = MT.align(ids, E, cfg[0][0])
    act = torch.full((nb * cfg[0][0], I), 7.0, dtype=torch.float16)
    y = torch.full((ids.numel() + 3, H), 7.0, dtype=torch.float16)  # 3 rows past the pairs
    MT.expert_gemms(x, w13, w2, 2, sp, be, act, y[: ids.numel()], cfg)
    live = sp < ids.numel()
    live[be.repeat_interleave(cfg[0][0]) < 0] = False
    assert (act[~live] == 7.0).all() and not (act[live] == 7.0).all(1).any()
    assert (y[ids.numel():] == 7.0).all() and not (y[: ids.numel()] == 7.0).all(1).any()


def test_router_tie_rule_distinct_experts_and_weights():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 1.0, 0.5, 1.0, 5.0]])
    _, ids = K.moe_route(logits, 3, False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [4, 1, 3]]
    w, ids2 = K.moe_route(logits[1:2], 2, True)
    assert ids2.tolist() == [[0, 1]] and w.tolist() == [[0.5, 0.5]]
    g = gen(5)
    for dtype in (torch.float32, torch.bfloat16):
        lg = randn(40, 13, dtype=dtype, g=g, scale=3.0)
        w, ids = K.moe_route(lg, 4, True)
        p = torch.softmax(lg.double(), -1)
        v, ref_ids = p.topk(4)
        assert torch.equal(ids, ref_ids)
        assert rel_err(w, v / v.sum(-1, keepdim=True)) < 1e-6
        w1, ids1 = K.moe_route(lg[7:8], 4, True)
        assert torch.equal(ids1, ids[7:8]) and torch.equal(w1, w[7:8])
    # a NaN row (vLLM's warm-up feeds garbage): still k distinct experts in range
    _, ids = K.moe_route(torch.tensor([[float("nan")] * 6, [0.0, float("nan"), 1.0, 0, 0, 0]]), 3, True,
                         check_finite=False)
    for row in ids.tolist():
        assert len(set(row)) == 3 and all(0 <= e < 6 for e in row)


def test_combine_slot_order_one_rounding_and_control():
    y = torch.tensor([[[1.0, 3.0], [2.0 ** -9, 1.0]]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0]])
    assert torch.equal(K.moe_combine(y, w), (y[:, 0].float() + y[:, 1].float()).to(torch.bfloat16))
    g = gen(8)
    y = randn(9, 4, 40, g=g)  # fp32 out: the slot order's last bits survive (fp16/bf16 would mostly hide them)
    w = torch.rand(9, 4, generator=g)
    ref = y[:, 0].float() * w[:, :1]
    for j in range(1, 4):
        ref = ref + y[:, j].float() * w[:, j:j + 1]
    out = K.moe_combine(y, w)
    assert torch.equal(out, ref)  # the CPU path's formula, bit for bit (no FMA contraction)
    assert torch.equal(K.moe_combine(y[4:5], w[4:5]), out[4:5])
    rev = y[:, 3].float() * w[:, 3:]
    for j in (2, 1, 0):
        rev = rev + y[:, j].float() * w[:, j:j + 1]
    assert not torch.equal(rev, out)  # control: the slot order shows in the bits


def test_backward_by_standard_ops_matches_the_cpu_path(monkeypatch):
    """The trainer's backward on the Triton path (per-expert recomputation) == the CPU path's, fp32."""
    g = gen(10)
    gate, w13, w2 = _weights(torch.float32, g, E=4)
    x, gr = randn(7, H, g=g), randn(7, H, g=g)
    grads = {}
    for backend in ("cpu", "triton"):
        monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", backend)
        ps = [t.clone().requires_grad_(True) for t in (x, gate, w13, w2)]
        out, logits = K.moe(*ps, 2, True)
        ((out * gr).sum() + logits.sum()).backward()
        grads[backend] = [p.grad for p in ps]
    for a, b in zip(grads["triton"], grads["cpu"]):
        assert rel_err(a, b) < 1e-5
