"""Trainer side of Qwen3-MoE (issue 31): the patched sparse block runs onpolicy's MoE op; batch
invariance, decode == prefill, closeness to plain transformers, the router aux loss and gradients."""
import pytest
import torch

import onpolicy
from onpolicy.tiny import make_tiny_model


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("moe"), "qwen3_moe", dtype=torch.float32)


def _load(path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1024, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 11:] = 0  # right padding
    return ids, mask


def test_tiny_moe_shape(path):
    m = _load(path, torch.float32)
    block = m.model.layers[0].mlp
    assert type(block).__name__ == "Qwen3MoeSparseMoeBlock"
    assert block.experts.gate_up_proj.shape == (8, 256, 256) and block.gate.top_k == 2
    assert m.config.norm_topk_prob


def test_patched_rows_are_batch_invariant_bf16(path):
    m = onpolicy.patch_model(_load(path, torch.bfloat16))
    ids, mask = _batch()
    with torch.no_grad():
        full = m(input_ids=ids, attention_mask=mask).logits
        for i in range(3):
            keep = mask[i].bool()
            alone = m(input_ids=ids[i:i + 1, keep]).logits[0]
            assert torch.equal(alone, full[i, keep]), i


def test_patched_close_to_transformers_with_router_aux_loss_and_grads(path):
    """fp32: logits, the load-balancing aux loss (output_router_logits) and every parameter's gradient
    of loss + aux loss agree with transformers' own MoE."""
    m = _load(path, torch.float32).train()
    ids, mask = _batch(1)
    labels = ids.clone()
    labels[0, :5] = -100  # no loss on (or from) padding
    labels[2, 11:] = -100
    outs, grads = [], []
    for patch in (False, True):
        m.zero_grad()
        if patch:
            onpolicy.patch_model(m)
        o = m(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        o.loss.backward()
        outs.append(o)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    ref, ours = outs
    keep = mask.bool()
    assert (ours.logits[keep] - ref.logits[keep]).abs().max() < 1e-4
    assert len(ours.router_logits) == 4 and ours.router_logits[0].shape == (3 * 14, 8)
    assert torch.allclose(ours.aux_loss, ref.aux_loss, rtol=1e-5) and torch.allclose(ours.loss, ref.loss, rtol=1e-5)
    assert set(grads[0]) == set(grads[1]) and any("gate.weight" in n for n in grads[1])
    for n, g in grads[1].items():
        assert (g - grads[0][n]).norm() <= 1e-4 * grads[0][n].norm() + 1e-7, n
    onpolicy.unpatch_model(m)
    assert "forward" not in m.model.layers[0].mlp.__dict__


def test_moe_refuses_tensor_parallel_2(path):
    m = _load(path, torch.bfloat16)
    with pytest.raises(TypeError, match="tensor_parallel_size=2 .MoE is mirrored for tensor_parallel_size=1 only"):
        onpolicy.patch_model(m, tensor_parallel_size=2)
    assert not onpolicy.trainer.is_patched(m)
    assert all("forward" not in mod.__dict__ for mod in m.modules())  # nothing left half-patched
