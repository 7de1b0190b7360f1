"""The trainer's mirror of vLLM tensor parallelism (tensor_parallel_size 2, 4, 8), on the CPU.

The end-to-end proof (a real vLLM engine at TP=2 and TP=4 == this trainer, bitwise) is
tests/vllm/test_families.py::test_tensor_parallel_bitwise; here: what a TP=N forward must
compute, emulated rank by rank with vLLM's sharding (whole model at N = 4 and 8), and the
settings it refuses.
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


def _rank_order_fp32(partials):
    """The reduction onpolicy runs beyond two ranks, spelled out: float32, rank 0 first, one rounding."""
    acc = partials[0].float()
    for p in partials[1:]:
        acc = acc + p.float()
    return acc.to(partials[0].dtype)


def _ranks_row_parallel_n(x, w, b, tp):
    """tp 'ranks', each with its own copy of its contiguous K-slice (vLLM's RowParallelLinear split;
    the bias on rank 0 only), then the gathered partials summed in rank order."""
    s = x.shape[1] // tp
    partials = [K.linear(x[:, r * s:(r + 1) * s].clone(), w[:, r * s:(r + 1) * s].clone(), b if r == 0 else None)
                for r in range(tp)]
    return _rank_order_fp32(partials), partials


@pytest.mark.parametrize("tp", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_row_parallel_linear_is_the_rank_order_sum(tp, m):
    g = torch.Generator().manual_seed(10 * tp + m)
    x = torch.randn(m, 512, generator=g).to(torch.bfloat16)
    w = torch.randn(96, 512, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    out = row_parallel_linear(x, w, b, tp)
    ref, partials = _ranks_row_parallel_n(x, w, b, tp)
    assert torch.equal(out, ref)
    for i in (0, m - 1):  # batch-invariant
        assert torch.equal(row_parallel_linear(x[i:i + 1], w, b, tp), out[i:i + 1])
    # controls: the unsharded linear and a bf16 running sum give other bits
    assert not torch.equal(out, K.linear(x, w, b))
    bf16_sum = partials[0]
    for p in partials[1:]:
        bf16_sum = bf16_sum + p
    if m > 1:
        assert not torch.equal(out, bf16_sum)


def test_rank_sum_op():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        parts = (torch.randn(8, 33, 7, generator=g) * torch.logspace(-3, 3, 7)).to(dtype)
        assert torch.equal(K.rank_sum(parts), _rank_order_fp32(list(parts)))
        assert torch.equal(K.rank_sum(parts[:, 5:6]), K.rank_sum(parts)[5:6])  # elementwise: shape-invariant
    # one rounding at the end, where bf16 steps lose the small terms: 1 + 2^-8 + 2^-9 + 2^-9 = 1 + 2^-7
    # (a bf16 number), but 1 + 2^-8 rounds to 1 in bf16 (a tie, to even), and so on
    t = torch.tensor([[1.0], [2.0 ** -8], [2.0 ** -9], [2.0 ** -9]], dtype=torch.bfloat16)
    assert K.rank_sum(t).item() == 1 + 2.0 ** -7 and (t[0] + t[1] + t[2] + t[3]).item() == 1.0
    p = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    K.rank_sum(p).sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        K.rank_sum(torch.ones(4, 3, dtype=torch.int32))


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
    for bad in (3, 6, 16, 0, "2"):
        with pytest.raises(ValueError, match="tensor_parallel_size=.* is not supported.*1, 2, 4 and 8"):
            onpolicy.patch_model(model, tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of 8"):
        onpolicy.patch_model(model, tensor_parallel_size=8)  # 4 heads: vLLM cannot split them over 8 ranks
    assert not onpolicy.trainer.patch.is_patched(model)
    with onpolicy.patched(model, 2):
        assert model.model._onpolicy_tp == 2
        with onpolicy.patched(model):  # nests, keeps the size
            assert onpolicy.trainer.patch.tensor_parallel_size(model) == 2
        with pytest.raises(ValueError, match="already patched for tensor_parallel_size=2"):
            onpolicy.patch_model(model, tensor_parallel_size=1)
    assert not hasattr(model.model, "_onpolicy_tp") and not onpolicy.trainer.patch.is_patched(model)


# ---------------------------------------------------------------------------
# The whole forward at TP = 4 and 8 against ranks emulated one by one, sharded as vLLM shards
# ---------------------------------------------------------------------------

def _reduce(partials, tp):
    return partials[0] + partials[1] if tp == 2 else _rank_order_fp32(partials)


def _emulated_tp_logits(model, ids, tp):
    """What `tp` vLLM ranks compute for one unpadded batch, each rank on its own weight shards.

    vLLM's splits (model_executor/layers): VocabParallelEmbedding and ParallelLMHead, the vocabulary
    padded to a multiple of 64 and cut into tp contiguous ranges (the embedding writes zeros for ids
    outside the rank's range, then all-reduce; the LM head's logits are gathered); QKVParallelLinear,
    rank r holding query heads [r*Hq/tp, (r+1)*Hq/tp) and key/value heads [r*Hkv/tp, ...) or, when
    Hkv < tp, the one head r // (tp/Hkv) (replicated); MergedColumnParallelLinear, the r-th slice
    of gate and of up; RowParallelLinear (o_proj, down_proj), the r-th contiguous K-slice; then the
    reduction (TP=2: one rounding; beyond: float32 rank order)."""
    from onpolicy.families import cos_sin_cache_for

    cfg, base = model.config, model.model
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    B, L = ids.shape
    flat = ids.reshape(-1)
    T = flat.numel()
    positions = torch.arange(L).repeat(B)
    cu = torch.arange(B + 1, dtype=torch.int32) * L
    cache = cos_sin_cache_for(cfg)
    padded = -(-cfg.vocab_size // 64) * 64
    per = padded // tp
    emb_w = base.embed_tokens.weight

    def rows(w, r, n):  # rank r's contiguous n-row block
        return w[r * n:(r + 1) * n].clone()

    parts = []
    for r in range(tp):
        lo, hi = r * per, min((r + 1) * per, cfg.vocab_size)
        inside = (flat >= lo) & (flat < hi)
        local = torch.zeros(T, cfg.hidden_size, dtype=emb_w.dtype)
        if hi > lo:
            local[inside] = emb_w[lo:hi].clone()[flat[inside] - lo]
        parts.append(local)
    hidden = _reduce(parts, tp)
    residual = None
    q_per = hq // tp
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if residual is None:
            residual, x = hidden, K.rms_norm(hidden, n1.weight, n1.variance_epsilon)
        else:
            x, residual = K.fused_add_rms_norm(hidden, residual, n1.weight, n1.variance_epsilon)
        partials = []
        for r in range(tp):
            if hkv >= tp:
                kv_heads = list(range(r * hkv // tp, (r + 1) * hkv // tp))
            else:
                kv_heads = [r // (tp // hkv)]
            wq = rows(attn.q_proj.weight, r, q_per * hd)
            wk = torch.cat([attn.k_proj.weight[h * hd:(h + 1) * hd] for h in kv_heads]).clone()
            wv = torch.cat([attn.v_proj.weight[h * hd:(h + 1) * hd] for h in kv_heads]).clone()
            qkv = K.linear(x, torch.cat([wq, wk, wv]))
            q, k, v = qkv.split([wq.shape[0], wk.shape[0], wv.shape[0]], dim=-1)
            q, k, v = q.reshape(T, -1, hd), k.reshape(T, -1, hd), v.reshape(T, -1, hd)
            if getattr(attn, "q_norm", None) is not None:
                q = K.rms_norm(q, attn.q_norm.weight, attn.q_norm.variance_epsilon)
                k = K.rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
            q, k = K.rotary_embedding(positions, q, k, cache, is_neox=True)
            o = K.attention_contiguous(q, k, v, cu, attn.scaling, max_seqlen=L).reshape(T, -1)
            wo = attn.o_proj.weight[:, r * q_per * hd:(r + 1) * q_per * hd].clone()
            partials.append(K.linear(o, wo))
        a = _reduce(partials, tp)
        x, residual = K.fused_add_rms_norm(a, residual, n2.weight, n2.variance_epsilon)
        i = cfg.intermediate_size // tp
        partials = []
        for r in range(tp):
            gate_up = K.linear(x, torch.cat([rows(mlp.gate_proj.weight, r, i), rows(mlp.up_proj.weight, r, i)]))
            partials.append(K.linear(K.silu_and_mul(gate_up), mlp.down_proj.weight[:, r * i:(r + 1) * i].clone()))
        hidden = _reduce(partials, tp)
    x, _ = K.fused_add_rms_norm(hidden, residual, base.norm.weight, base.norm.variance_epsilon)
    head = model.lm_head.weight
    logits = torch.cat([K.linear(x, head[r * per:min((r + 1) * per, cfg.vocab_size)].clone()) for r in range(tp)
                        if r * per < cfg.vocab_size], dim=-1)  # the gather
    return logits.view(B, L, -1)


@pytest.fixture(scope="module")
def models8(tmp_path_factory):
    """Tiny Qwen3 (q/k norm) with 8 query heads of 32 over 2 key/value heads, so TP=8 splits it
    (one query head a rank, each key/value head replicated on four ranks), and tiny Llama with 4/4
    heads (TP=4: one of each a rank, no replication)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for family, overrides in (("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32)),
                              ("llama", dict(num_key_value_heads=4))):
        path = make_tiny_model(tmp_path_factory.mktemp("tp8") / family, family, dtype=torch.bfloat16,
                               vocab_size=1000, overrides=overrides)
        out[family] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return out


@pytest.mark.parametrize("family, tp", [("qwen3", 4), ("qwen3", 8), ("llama", 4), ("qwen3", 2)])
def test_whole_forward_equals_emulated_ranks(models8, family, tp):
    """patch_model(tensor_parallel_size=tp) == tp emulated vLLM ranks, logits bitwise; the plain
    (TP=1) patched forward and the mirror of another size differ (controls)."""
    model = models8[family]
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(tp))
    with torch.no_grad():
        ranks = _emulated_tp_logits(model, ids, tp)
        with onpolicy.patched(model, tp):
            mirror = model(ids).logits
        with onpolicy.patched(model, 1):
            plain = model(ids).logits
        with onpolicy.patched(model, 2 if tp != 2 else 4):
            other = model(ids).logits
    assert torch.equal(mirror, ranks)
    assert not torch.equal(plain, ranks) and not torch.equal(other, ranks)
    assert float((plain.float() - ranks.float()).abs().max()) < 0.5  # only rounding apart
    assert float(ranks.float().std()) > 0.1  # a real distribution of logits, not a degenerate one


def test_tp4_gradients_flow(models8):
    model = models8["qwen3"]
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    onpolicy.token_logprobs(model, ids, tensor_parallel_size=4).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "o_proj" in n or "down_proj" in n]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() and g.abs().sum() > 0 for g in grads)
    model.zero_grad()
