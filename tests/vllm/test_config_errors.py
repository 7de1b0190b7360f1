"""Setups onpolicy cannot make bitwise equal fail when the engine is built, with a clear message.

These fail in vLLM's config stage (before any engine starts), so they are cheap.
vLLM wraps the error in pydantic's ValidationError (a ValueError) keeping our text.
"""
from __future__ import annotations

import pytest
from vllm_helpers import make_llm

pytestmark = pytest.mark.vllm

PREFIX = "onpolicy vLLM plugin: "


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"attention_config": {"backend": "FLASH_ATTN"}}, "attention backend FLASH_ATTN was requested"),
        ({"attention_config": {"backend": "CPU_ATTN"}}, "attention backend CPU_ATTN was requested"),
        ({"logprobs_mode": "processed_logits"}, "logprobs_mode='processed_logits' is not supported"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8' is not supported"),
        ({"tensor_parallel_size": 4}, "this parallelism is not supported ({'tensor_parallel_size': 4})"),
        ({"pipeline_parallel_size": 2}, "this parallelism is not supported ({'pipeline_parallel_size': 2})"),
    ],
)
def test_rejected_settings(model_dir, overrides, match):
    with pytest.raises(ValueError, match=PREFIX + ".*" + match.replace("(", r"\(").replace(")", r"\)")):
        make_llm(model_dir, **overrides)


def test_tp2_pins_collective_fusions_off():
    """At TP=2 the compile passes that fuse the all-reduce with norms or matmuls are pinned off."""
    from types import SimpleNamespace

    from onpolicy.vllm_plugin.config import keep_collectives_plain

    pc = SimpleNamespace(fuse_allreduce_rms=True, enable_sp=None, fuse_gemm_comms=False, fuse_norm_quant=True)
    cfg = SimpleNamespace(compilation_config=SimpleNamespace(pass_config=pc))
    assert keep_collectives_plain(cfg) == ["fuse_allreduce_rms"]
    assert (pc.fuse_allreduce_rms, pc.enable_sp, pc.fuse_gemm_comms, pc.fuse_norm_quant) == (False, False, False, True)


def test_forced_custom_backend_is_accepted_by_the_check():
    from onpolicy.vllm_plugin.config import check_attention_selection

    assert check_attention_selection(None, None) == "CUSTOM"
    assert check_attention_selection("CUSTOM", None) == "CUSTOM"


def test_unsupported_architecture(tmp_path):
    """A model vLLM runs but onpolicy does not cover (GPT-2) fails at load."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from onpolicy.tiny import make_tokenizer

    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=1024, n_positions=256, bos_token_id=3,
                     eos_token_id=1)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    make_tokenizer(1024).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=PREFIX + r"model architecture \['GPT2LMHeadModel'\] is not supported"):
        make_llm(tmp_path, max_model_len=256)


def test_unsupported_feature_of_supported_family(tmp_path):
    """Qwen2 with sliding-window attention: the family is supported, the feature is not."""
    import torch

    from onpolicy.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "qwen2-sw", "qwen2", dtype=torch.bfloat16,
                           overrides={"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0})
    with pytest.raises(ValueError, match=PREFIX + ".*sliding-window attention"):
        make_llm(path)
