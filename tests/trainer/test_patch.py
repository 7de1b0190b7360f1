"""Trainer side (issue 4): patched transformers models, bitwise properties and correctness."""
import copy

import pytest
import torch

import onpolicy
import onpolicy_kernels as K
from onpolicy.tiny import make_tiny_model

FAMILIES = ["qwen3", "qwen2", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def model_bf16(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param, dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return onpolicy.patch_model(m)


def _seqs(n, lens, vocab=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (L,), generator=g) for L in lens][:n]


def decode_logprobs(model, ids, prompt_len, temperature=1.0):
    """Prefill ids[:prompt_len], then feed one token at a time with the KV cache (the sampler's path)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        o = model(ids[None, :prompt_len], past_key_values=cache, use_cache=True)
        logits = o.logits[0, -1:]
        for i in range(prompt_len, ids.numel()):
            out.append(K.token_logprobs(logits, ids[i : i + 1], temperature))
            if i + 1 < ids.numel():
                o = model(ids[None, i : i + 1], past_key_values=cache, use_cache=True)
                logits = o.logits[0, -1:]
    return torch.cat(out)


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_full_forward_equals_incremental_decode(model_bf16, prompt_len):
    ids = _seqs(1, [40], seed=prompt_len)[0]
    with torch.no_grad():
        full = onpolicy.token_logprobs(model_bf16, ids[None], temperature=0.7)[0]
    dec = decode_logprobs(model_bf16, ids, prompt_len, temperature=0.7)
    assert torch.equal(full[prompt_len - 1 :], dec)


def test_alone_padded_and_packed_are_identical(model_bf16):
    lens = [23, 9, 31, 16]
    seqs = _seqs(4, lens, seed=3)
    with torch.no_grad():
        alone = [onpolicy.token_logprobs(model_bf16, s[None])[0] for s in seqs]
        L = max(lens)
        for side in ("right", "left"):
            ids = torch.full((4, L), 2)
            mask = torch.zeros(4, L, dtype=torch.long)
            for b, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
                ids[b, sl] = s
                mask[b, sl] = 1
            lp = onpolicy.token_logprobs(model_bf16, ids, mask)
            for b, s in enumerate(seqs):
                got = lp[b, : len(s) - 1] if side == "right" else lp[b, L - len(s) :]
                assert torch.equal(got, alone[b]), (side, b)
        # packed: one row, position_ids restarting at 0 for each sequence
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        hidden_lp = onpolicy.token_logprobs(model_bf16, ids, position_ids=pos)[0]
        start = 0
        for b, s in enumerate(seqs):
            assert torch.equal(hidden_lp[start : start + len(s) - 1], alone[b]), b
            start += len(s)


def test_logits_to_keep_and_per_row_temperature(model_bf16):
    seqs = _seqs(3, [20, 20, 20], seed=5)
    ids = torch.stack(seqs)
    t = torch.tensor([1.0, 0.7, 1.3])
    with torch.no_grad():
        kept = onpolicy.token_logprobs(model_bf16, ids, logits_to_keep=6, temperature=t)
        for b in range(3):
            full = onpolicy.token_logprobs(model_bf16, ids[b : b + 1], temperature=float(t[b]))[0]
            assert torch.equal(kept[b], full[-6:])


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_unpatched_and_gradients(family, tmp_path):
    """fp32: the patched model is the same function (logprobs and gradients agree to fp32 noise)."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / family, family, dtype=torch.float32, head_scale=1.0)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    pat = copy.deepcopy(ref)
    onpolicy.patch_model(pat)
    ids = torch.stack(_seqs(2, [24, 24], seed=1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    lp_ref = torch.log_softmax(ref(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, :-1].float(), -1)
    lp_ref = lp_ref.gather(-1, ids[:, 1:, None])[..., 0]
    lp_pat = onpolicy.token_logprobs(pat, ids, mask)
    valid = (mask[:, 1:] & mask[:, :-1]).bool()  # the token and its predecessor are real
    assert (lp_ref - lp_pat)[valid].abs().max() < 1e-4
    lp_ref[valid].sum().backward()
    lp_pat[valid].sum().backward()
    for (n, p1), (_, p2) in zip(ref.named_parameters(), pat.named_parameters()):
        if p1.grad is None:
            assert p2.grad is None or p2.grad.abs().max() == 0, n
            continue
        err = (p1.grad - p2.grad).norm() / p1.grad.norm().clamp(min=1e-12)
        assert err < 1e-3, (n, float(err))


def test_gradient_checkpointing_gives_same_grads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "gc", "qwen3", dtype=torch.bfloat16)
    a = onpolicy.patch_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).train())
    b = onpolicy.patch_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).train())
    b.gradient_checkpointing_enable()
    ids = torch.stack(_seqs(2, [16, 16], seed=2))
    for m in (a, b):
        onpolicy.token_logprobs(m, ids).sum().backward()
    for (n, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p1.grad, p2.grad), n


def test_unpatch_restores_and_nests(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "u", "qwen3", dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.stack(_seqs(1, [12], seed=4))
    with torch.no_grad():
        before = m(ids).logits
        with onpolicy.patched(m):
            with onpolicy.patched(m):
                inner = m(ids).logits
            assert onpolicy.is_patched(m)
            assert torch.equal(m(ids).logits, inner)
        assert not onpolicy.is_patched(m)
        assert torch.equal(m(ids).logits, before)
        assert not torch.equal(before, inner)  # the patch really changed the kernels


def test_unsupported_models_and_dtypes_get_clear_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(onpolicy.UnsupportedModelError, match="supported families: Qwen3"):
        onpolicy.patch_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "sw", "qwen2", dtype=torch.float32,
                           overrides={"use_sliding_window": True, "sliding_window": 16})
    with pytest.raises(onpolicy.UnsupportedModelError, match="sliding-window"):
        onpolicy.patch_model(AutoModelForCausalLM.from_pretrained(path))
    path = make_tiny_model(tmp_path / "f64", "qwen3", dtype=torch.float32)
    with pytest.raises(onpolicy.UnsupportedModelError, match="dtype"):
        onpolicy.patch_model(AutoModelForCausalLM.from_pretrained(path).double())


def test_bad_masks_are_rejected(model_bf16):
    ids = torch.stack(_seqs(1, [10], seed=6))
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="contiguous"):
        onpolicy.token_logprobs(model_bf16, ids, holes)


def test_token_plan_bounds_the_longest_sequence_without_a_sync():
    """plan.max_len (a host int that sizes the attention grids) bounds every sequence."""
    from onpolicy.trainer.forward import plan_tokens

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    plan = plan_tokens(3, 4, mask, None, 0, "cpu")
    assert plan.max_len == 4 >= int((plan.cu_seqlens[1:] - plan.cu_seqlens[:-1]).max())
    packed = plan_tokens(1, 7, None, torch.tensor([[0, 1, 2, 0, 1, 0, 1]]), 0, "cpu")
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 7] and packed.max_len == 3
    assert plan_tokens(2, 5, None, None, 0, "cpu").max_len == 5
