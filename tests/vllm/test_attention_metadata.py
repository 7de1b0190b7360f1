"""The attention backend's metadata under CUDA graphs (unit, no engine).

The backend declares full-graph support for uniform (decode) batches. That is sound only
if every per-step value the kernel reads comes from vLLM's persistent buffers -- views,
never copies, so a captured graph reads the current step's values on replay -- and if
the rest of the metadata are shapes. These tests pin both down.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import AttentionCGSupport  # noqa: E402

from onpolicy.vllm_plugin.attention import OnpolicyAttentionMetadataBuilder  # noqa: E402
from onpolicy.vllm_plugin.errors import OnpolicyVllmError  # noqa: E402


def common(num_reqs=3, padded=8, causal=True):
    """vLLM's persistent buffers, sliced to the padded batch as its model runner does."""
    qsl = torch.arange(padded + 1, dtype=torch.int32)
    return SimpleNamespace(num_reqs=num_reqs, num_actual_tokens=padded, causal=causal, max_query_len=1,
                           query_start_loc=qsl, seq_lens=torch.full((padded,), 5, dtype=torch.int32),
                           block_table_tensor=torch.zeros(padded, 4, dtype=torch.int32),
                           slot_mapping=torch.arange(padded, dtype=torch.int64))


def build(cm, prefix=0):
    builder = object.__new__(OnpolicyAttentionMetadataBuilder)  # build() reads only its arguments
    return builder.build(prefix, cm)


def test_declares_full_graphs_for_uniform_batches_only():
    assert OnpolicyAttentionMetadataBuilder._cudagraph_support == AttentionCGSupport.UNIFORM_BATCH


def test_per_step_tensors_are_views_of_the_persistent_buffers():
    cm = common()
    md = build(cm)
    for got, buf in ((md.query_start_loc, cm.query_start_loc), (md.seq_lens, cm.seq_lens),
                     (md.block_table, cm.block_table_tensor), (md.slot_mapping, cm.slot_mapping)):
        assert got.data_ptr() == buf.data_ptr() and got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert (md.num_reqs, md.num_actual_tokens) == (3, 8)
    assert md.max_query_len == 1  # a host int: sizes the FA3 route's grid, fixed in a captured graph
    assert md.query_start_loc.shape[0] == 4 and md.seq_lens.shape[0] == 3 and md.block_table.shape[0] == 3


@pytest.mark.parametrize("prefix,causal,msg", [(4, True, "cascade"), (0, False, "non-causal"),
                                               (0, torch.ones(1, dtype=torch.bool), "non-causal")])
def test_unsupported_batches_fail_loudly(prefix, causal, msg):
    with pytest.raises(OnpolicyVllmError, match=msg):
        build(common(causal=causal), prefix)
