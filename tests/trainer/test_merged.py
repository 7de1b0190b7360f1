"""The trainer's merged projections (onpolicy/trainer/merged.py): one linear over the
concatenated weights gives each projection's bits exactly (forward, bitwise) and the
standard gradients (backward, not promised bitwise)."""
from __future__ import annotations

import pytest
import torch

import onpolicy_kernels as K
from onpolicy.trainer import merged


def _projections(sizes, K_in, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, n in enumerate(sizes):
        m = torch.nn.Linear(K_in, n, bias=bias if not isinstance(bias, list) else bias[i], dtype=dtype)
        with torch.no_grad():
            m.weight.copy_(torch.randn(n, K_in, generator=g).to(dtype))
            if m.bias is not None:
                m.bias.copy_(torch.randn(n, generator=g).to(dtype))
        mods.append(m)
    return mods


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True, [True, False, True]], ids=["no_bias", "bias", "mixed_bias"])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_merged_equals_separate_bitwise(dtype, bias, rows):
    mods = _projections([32, 16, 16], 48, bias, dtype)
    x = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)).to(dtype)
    want = torch.cat([K.linear(x, m.weight, m.bias) for m in mods], dim=-1)
    with torch.no_grad():
        assert torch.equal(merged.merged_linear(x, mods), want)
    assert torch.equal(merged.merged_linear(x, mods).detach(), want)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_gradients_are_the_separate_ones(bias):
    mods = _projections([24, 8, 8], 40, bias, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 40, generator=g, requires_grad=True)
    up = torch.randn(3, 6, 40, generator=g)

    def grads(f):
        for m in mods:
            m.zero_grad(set_to_none=True)
        x.grad = None
        (f() * up).sum().backward()
        return [x.grad] + [p.grad for m in mods for p in m.parameters()]

    got = grads(lambda: merged.merged_linear(x, mods))
    want = grads(lambda: torch.cat([K.linear(x, m.weight, m.bias) for m in mods], dim=-1))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_weights_get_no_gradient():
    mods = _projections([8, 8], 16, False, torch.float32)
    mods[0].weight.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    merged.merged_linear(x, mods).sum().backward()
    assert mods[0].weight.grad is None and mods[1].weight.grad is not None and x.grad is not None


def test_the_concatenated_weight_is_not_kept_for_the_backward():
    mods = _projections([64, 64], 32, False, torch.float32)
    x = torch.randn(2, 32, requires_grad=True)
    out = merged.merged_linear(x, mods)
    saved = out.grad_fn.saved_tensors
    assert {t.data_ptr() for t in saved} == {x.data_ptr()} | {m.weight.data_ptr() for m in mods}
