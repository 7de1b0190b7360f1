"""Tiny models built locally (no hub): for tests, the demo recipe and `onpolicy check`.

`make_tiny_model(path, family="qwen3", ...)` writes a randomly initialised
model of the family (transformers config + save_pretrained) and a
character-level tokenizer that both transformers and vLLM load. Shapes can be
scaled up to real ones (e.g. a Qwen3-1.7B shape on the GPU machine).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

import torch

# Characters the tokenizer knows, one token each; specials first.
SPECIALS = ["<unk>", "<eos>", "<pad>", "<bos>"]
ALPHABET = list(string.digits + string.ascii_letters + " +-*/=?.,:;()!'\"\n")

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    # Qwen3-1.7B's shape (28 layers, 2048 wide, 16/8 heads of 128, vocab 151936).
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936),
    # Qwen3-30B-A3B's shape per layer (2048 wide, 128 experts of 768, top-8, 32/4 heads of 128,
    # vocab 151936), with fewer layers (family "qwen3_moe" only).
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                          num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936),
}
# The MoE part of the tiny shape (family "qwen3_moe"): 8 experts of 128, top-2, every layer sparse.
TINY_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[])


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ALPHABET)}
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>", bos_token="<bos>")


def make_tiny_model(path, family: str = "qwen3", shape: str = "tiny", dtype: torch.dtype = torch.bfloat16,
                    vocab_size: int = 1024, seed: int = 0, head_scale: float = 8.0,
                    max_position_embeddings: int = 2048, overrides: Optional[dict] = None,
                    router_scale: float = 4.0) -> Path:
    """Save a random model of `family` ('qwen3', 'qwen2', 'llama', 'qwen3_moe') and its tokenizer to `path`.

    'qwen3_moe' is a Qwen3-MoE (Qwen3-30B-A3B's architecture: top-k softmax routing with
    norm_topk_prob, no shared expert); with shape 'tiny' it has 8 experts of 128, top-2 (TINY_MOE).

    head_scale multiplies the logits so they are sharp enough that a mismatch
    shows in the sampled tokens (random weights give flat logits). It scales
    the LM head; with tied embeddings (overrides={"tie_word_embeddings": True})
    the LM head *is* the input embedding table, and scaling it would scale
    every input embedding too (the residual stream then drowns the layers and
    the model repeats its input with probability 1), so the final norm's
    weight is scaled instead: the same logits x head_scale, inputs untouched.
    router_scale multiplies a MoE model's router (gate) weights, for the same reason.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    classes = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "llama": (LlamaConfig, LlamaForCausalLM), "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM)}
    if family not in classes:
        raise ValueError(f"family must be one of {sorted(classes)}, got {family!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    kw = dict(SHAPES[shape])
    moe_keys = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
    if family == "qwen3_moe":
        kw = {**TINY_MOE, **kw}
    elif any(key in kw for key in moe_keys):
        raise ValueError(f"shape {shape!r} is a mixture-of-experts shape: use family='qwen3_moe'")
    kw.setdefault("vocab_size", vocab_size)
    kw.update(max_position_embeddings=max_position_embeddings, tie_word_embeddings=False,
              bos_token_id=3, eos_token_id=1, pad_token_id=2)
    if family == "llama":
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 256}
    kw.update(overrides or {})
    cfg_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    with torch.device("cpu"):
        model = model_cls(cfg)
    if family == "qwen2":  # Qwen2 has q/k/v biases: make them visible
        with torch.no_grad():
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.02)
    with torch.no_grad():
        if family == "qwen3_moe":  # sharper routing than the 0.02-std init: the experts a token takes matter
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.weight.mul_(router_scale)
        if cfg.tie_word_embeddings:
            model.model.norm.weight.mul_(head_scale)  # see the docstring: the head is the embedding table
        else:
            model.lm_head.weight.mul_(head_scale)
    model = model.to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    make_tokenizer(kw["vocab_size"]).save_pretrained(path)
    return path
