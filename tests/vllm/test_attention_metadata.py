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


def test_forward_writes_in_place_and_shares_one_schedule_per_step(monkeypatch):
    """The backend's forward, layer after layer on one step's metadata: the kernel writes into
    vLLM's output buffer (no copy), the step's shared schedule is computed once for all layers
    and again for the next step's new metadata object; an output buffer of another dtype takes
    the copy path, rows past the step's tokens untouched. Same values as a plain call."""
    from onpolicy.vllm_plugin import attention as backend
    from onpolicy.vllm_plugin import compat
    from onpolicy_kernels.ops.attention import attention

    attention_fn, cache_fn, schedule_fn = compat.attention_ops()
    asked = []

    def counting_schedule(*args):
        asked.append(args)
        return schedule_fn(*args)

    monkeypatch.setattr(compat, "attention_ops", lambda: (attention_fn, cache_fn, counting_schedule))
    Hq, Hkv, D, bs, n = 4, 2, 16, 16, 3
    impl = backend.OnpolicyAttentionImpl(num_heads=Hq, head_size=D, scale=0.25, num_kv_heads=Hkv)
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(4, Hkv, bs, 2 * D, generator=g) for _ in range(3)]  # one cache per layer
    qs = [torch.randn(n + 2, Hq, D, generator=g) for _ in range(3)]  # 2 padded rows past the n tokens

    def metadata():
        return backend.OnpolicyAttentionMetadata(
            num_actual_tokens=n, num_reqs=n, query_start_loc=torch.arange(n + 1, dtype=torch.int32),
            seq_lens=torch.tensor([5, 17, 2], dtype=torch.int32),
            block_table=torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32),
            slot_mapping=torch.arange(n, dtype=torch.int64), max_query_len=1)

    def plain(q, cache):
        k, v = compat.split_kv_cache(cache, D)
        md = metadata()
        return attention(q[:n], k, v, md.block_table, md.query_start_loc, md.seq_lens, 0.25, max_seqlen_q=1)

    for step in range(2):
        md = metadata()
        for q, cache in zip(qs, kv):
            output = torch.full((n + 2, Hq, D), float("nan"))
            ptr = output.data_ptr()
            assert impl.forward(None, q, q, q, cache, md, output) is output and output.data_ptr() == ptr
            assert torch.equal(output[:n], plain(q, cache)) and torch.isnan(output[n:]).all()
        assert len(asked) == step + 1  # once per step's metadata object, not once per layer
    wide = torch.full((n + 2, Hq, D), float("nan"), dtype=torch.float64)  # another dtype: the copy path
    impl.forward(None, qs[0], qs[0], qs[0], kv[0], metadata(), wide)
    assert torch.equal(wide[:n], plain(qs[0], kv[0]).double()) and torch.isnan(wide[n:]).all()
    assert len(asked) == 2  # the copy path needs no schedule
    assert backend.OnpolicyAttentionMetadataBuilder.supports_update_block_table is False  # no reused objects
