"""The trainer's mirror of vLLM tensor parallelism (tensor_parallel_size=2), on the CPU.

The end-to-end proof (a real vLLM engine at TP=2 == this trainer, bitwise) is
tests/vllm/test_families.py::test_tensor_parallel_2_bitwise; here: what a TP=2
forward must compute, emulated rank by rank, and the settings it refuses.
"""
from __future__ import annotations

import pytest
import torch

import onpolicy
import onpolicy_kernels as K
from onpolicy.tiny import make_tiny_model
from onpolicy.trainer.forward import row_parallel_linear


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("tp") / "qwen2", "qwen2", dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _ranks_row_parallel(x, w, b):
    """Two 'ranks' as separate tensors (no shared views), each its own partial, then the all-reduce."""
    k = x.shape[1] // 2
    shards = [(x[:, :k].clone(), w[:, :k].clone(), b), (x[:, k:].clone(), w[:, k:].clone(), None)]
    partials = [K.linear(xs, ws, bs) for xs, ws, bs in shards]
    return (partials[1].float() + partials[0].float()).to(x.dtype)  # any order: one rounding


@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_row_parallel_linear_is_the_two_rank_sum(m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=g).to(torch.bfloat16)
    w = torch.randn(96, 256, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    out = row_parallel_linear(x, w, b, 2)
    assert torch.equal(out, _ranks_row_parallel(x, w, b))
    # and batch-invariant like every onpolicy op: row i alone == row i in the batch
    for i in (0, m - 1):
        assert torch.equal(row_parallel_linear(x[i:i + 1], w, b, 2), out[i:i + 1])
    assert torch.equal(row_parallel_linear(x, w, b, 1), K.linear(x, w, b))


def test_tp2_forward_differs_from_tp1_only_by_rounding(model):
    ids = torch.randint(4, 1000, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp1 = onpolicy.token_logprobs(model, ids)
        lp2 = onpolicy.token_logprobs(model, ids, tensor_parallel_size=2)
        lp2b = onpolicy.token_logprobs(model, ids[1:2], tensor_parallel_size=2)
    assert not torch.equal(lp1, lp2)  # the mirror changes the bits (else it mirrors nothing)
    assert torch.allclose(lp1, lp2, atol=0.1)
    assert torch.equal(lp2[1:2], lp2b)  # batch-invariant at TP=2 too
    assert onpolicy.trainer.patch.tensor_parallel_size(model) == 1  # token_logprobs unpatched it


def test_tp2_gradients_flow(model):
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    onpolicy.token_logprobs(model, ids, tensor_parallel_size=2).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "o_proj" in n or "down_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_tp_settings_are_validated(model):
    for bad in (3, 4, 0, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size=.* is not supported.*1 or 2"):
            onpolicy.patch_model(model, tensor_parallel_size=bad)
    assert not onpolicy.trainer.patch.is_patched(model)
    with onpolicy.patched(model, 2):
        assert model.model._onpolicy_tp == 2
        with onpolicy.patched(model):  # nests, keeps the size
            assert onpolicy.trainer.patch.tensor_parallel_size(model) == 2
        with pytest.raises(ValueError, match="already patched for tensor_parallel_size=2"):
            onpolicy.patch_model(model, tensor_parallel_size=1)
    assert not hasattr(model.model, "_onpolicy_tp") and not onpolicy.trainer.patch.is_patched(model)
