"""Trainer side of issue 32: `token_logprobs(..., top_k=, top_p=, min_p=)` scores the truncated distribution
with the kernels' one truncation, per sequence, padded or not, and refuses bad values naming them."""
import pytest
import torch

import onpolicy
import onpolicy_kernels as K
from onpolicy.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("trunc") / "qwen3", "qwen3", dtype=torch.bfloat16)
    return onpolicy.patch_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval())


def _ids(n=3, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 1024, (n, L), generator=g)


def _logits(model, ids):
    """The patched model's LM-head logits for every position (the trainer's own path)."""
    from onpolicy.trainer import forward as F

    hidden, plan, _ = F.packed_hidden(model.model, ids, None, None)
    rows = torch.empty(ids.numel(), dtype=torch.long)
    rows[plan.idx] = torch.arange(plan.idx.numel())
    h = hidden[rows].view(*ids.shape, -1)
    return K.linear(h[:, :-1].reshape(-1, h.shape[-1]), model.lm_head.weight).view(ids.shape[0], ids.shape[1] - 1, -1)


def _with_likely_tokens(model, ids, n=6):
    """ids followed by n tokens, each the most likely one or the 3rd most likely (inside most kept sets)."""
    with torch.no_grad():
        for i in range(n):
            last = _logits(model, torch.cat([ids, ids[:, :1]], 1))[:, -1].float()
            ids = torch.cat([ids, last.topk(3, -1).indices[:, (0 if i % 2 else 2):][:, :1]], 1)
    return ids


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=20, top_p=0.8, min_p=0.02)])
def test_token_logprobs_are_the_kernels_truncated_logprobs(model, kw):
    ids = _with_likely_tokens(model, _ids())
    with torch.no_grad():
        lp = onpolicy.token_logprobs(model, ids, temperature=0.7, **kw)
        ref = K.truncated_token_logprobs(_logits(model, ids), ids[:, 1:], 0.7, **kw)
        full = onpolicy.token_logprobs(model, ids, temperature=0.7)
    assert torch.equal(lp, ref)
    finite = torch.isfinite(lp)
    assert (~finite).any() and finite.any()  # random tokens: some outside the kept set (-inf), some inside
    assert (lp[finite] > full[finite]).all()  # renormalised over the kept set


def test_per_sequence_settings_padding_and_off_values(model):
    ids = _ids(3, 14, seed=1)
    top_p = torch.tensor([0.9, 1.0, 0.5])
    with torch.no_grad():
        both = onpolicy.token_logprobs(model, ids, temperature=torch.tensor([1.0, 0.7, 0.7]), top_p=top_p)
        for b in range(3):
            alone = onpolicy.token_logprobs(model, ids[b:b + 1], temperature=[1.0, 0.7, 0.7][b], top_p=float(top_p[b]))
            assert torch.equal(both[b], alone[0])
        # left padding changes nothing for the real tokens
        pad = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids[:1]], 1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 14, dtype=torch.long)], 1)
        padded = onpolicy.token_logprobs(model, pad, mask, temperature=1.0, top_p=0.9, logits_to_keep=13)
        assert torch.equal(padded[0], both[0])
        # settings that truncate nothing give the untruncated logprobs, bitwise
        plain = onpolicy.token_logprobs(model, ids, temperature=0.7)
        assert torch.equal(onpolicy.token_logprobs(model, ids, temperature=0.7, top_k=0, top_p=1.0, min_p=None), plain)
        assert torch.equal(onpolicy.token_logprobs(model, ids, temperature=0.7, top_k=-1, min_p=0.0), plain)


@pytest.mark.parametrize("kw, match", [
    (dict(top_p=0.0), "top_p must be in"), (dict(min_p=1.5), "min_p must be in"), (dict(top_k=-4), "top_k must be"),
    (dict(top_p=torch.tensor([0.9, 0.8])), "top_p must be a number or a tensor of one value per row"),
])
def test_bad_settings_are_refused_naming_them(model, kw, match):
    with pytest.raises(ValueError, match=match):
        onpolicy.token_logprobs(model, _ids(), **kw)


def test_nothing_to_score_still_has_a_backward(model):
    """TRL's mask_truncated_completions masks every completion of a batch whose completions all hit
    max_completion_length: no token is scored, and the loss must still have a backward (it raised
    "element 0 of tensors does not require grad"), with zero gradients and the logprobs all +0.0."""
    from onpolicy.trainer.logprobs import score_tokens

    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0  # the completions masked out of attention, as TRL does with a truncated completion
    lp, ent = score_tokens(model, ids, mask, score_mask=torch.zeros(2, 11, dtype=torch.bool), with_entropy=True,
                           top_p=0.9)
    assert lp.requires_grad and ent.requires_grad
    assert torch.equal(lp, torch.zeros_like(lp)) and not torch.signbit(lp).any()
    (-lp.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)
    model.zero_grad(set_to_none=True)
