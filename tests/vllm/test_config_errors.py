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
        ({"pipeline_parallel_size": 2}, "this parallelism is not supported ({'pipeline_parallel_size': 2})"),
    ],
)
def test_rejected_settings(model_dir, overrides, match):
    with pytest.raises(ValueError, match=PREFIX + ".*" + match.replace("(", r"\(").replace(")", r"\)")):
        make_llm(model_dir, **overrides)


def test_tensor_parallel_sizes():
    """1, 2, 4 and 8 pass; other sizes fail naming the supported ones (an engine with 3 or 6 ranks is
    refused by vLLM itself first when the head count does not split, so the check is called here)."""
    from types import SimpleNamespace

    from onpolicy.vllm_plugin.config import check_parallel_config
    from onpolicy.vllm_plugin.errors import OnpolicyVllmError

    for tp in (1, 2, 4, 8):
        assert check_parallel_config(SimpleNamespace(tensor_parallel_size=tp)) == tp
    for tp in (3, 6, 16):
        with pytest.raises(OnpolicyVllmError, match=f"tensor_parallel_size={tp} is not supported: onpolicy mirrors "
                                                    "tensor_parallel_size 1, 2, 4, 8 in the trainer"):
            check_parallel_config(SimpleNamespace(tensor_parallel_size=tp))
    with pytest.raises(OnpolicyVllmError, match="pipeline_parallel_size"):
        check_parallel_config(SimpleNamespace(tensor_parallel_size=4, pipeline_parallel_size=2))


def test_tp_pins_collective_fusions_off():
    """At TP > 1 the compile passes that fuse the all-reduce with norms or matmuls are pinned off."""
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


def test_platform_hands_vllm_the_rank_order_communicator():
    """onpolicy's platform returns its subclass of vLLM's communicator; beyond two ranks its all_reduce
    all-gathers (vLLM's own all_gather, dim 0) and sums in rank order, in float32, rounding once; at two
    ranks and for integer tensors it is vLLM's all_reduce."""
    import torch
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    import onpolicy_kernels as K
    from onpolicy.vllm_plugin import collectives
    from onpolicy.vllm_plugin.platform import subclass_for

    platform = subclass_for(CpuPlatform, "OnpolicyCpuPlatform")
    assert platform.vllm_device_communicator_cls() == CpuPlatform.get_device_communicator_cls()
    ours = collectives.subclass_for(CpuCommunicator)
    assert platform.get_device_communicator_cls() == f"{ours.__module__}.{ours.__qualname__}"
    assert resolve_obj_by_qualname(platform.get_device_communicator_cls()) is ours
    assert issubclass(ours, CpuCommunicator)

    class FakeBase:  # stands in for vLLM's communicator: world_size, all_gather, all_reduce
        def __init__(self, partials):
            self.partials, self.world_size, self.gathered = partials, len(partials), []

        def all_gather(self, x, dim=-1):
            assert dim == 0 and x.shape[0] == 1
            self.gathered.append(x.shape)
            return torch.cat([p.unsqueeze(0) for p in self.partials], 0)

        def all_reduce(self, x):
            return "vllm"

    fake = collectives.subclass_for(FakeBase)
    g = torch.Generator().manual_seed(0)
    partials = [torch.randn(3, 8, generator=g).to(torch.bfloat16) for _ in range(4)]
    comm = fake(partials)
    out = comm.all_reduce(partials[0])
    acc = partials[0].float()
    for p in partials[1:]:
        acc = acc + p.float()
    assert torch.equal(out, acc.to(torch.bfloat16)) and torch.equal(out, K.rank_sum(torch.stack(partials)))
    assert comm.gathered == [torch.Size([1, 3, 8])]
    assert comm.all_reduce(torch.ones(3, dtype=torch.int64)) == "vllm"  # integers add exactly in any order
    assert fake(partials[:2]).all_reduce(partials[0]) == "vllm"  # two ranks: vLLM's (one rounding anyway)
