"""The sampler hook alone (no engine): vLLM's V1 Sampler re-classed by onpolicy."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.vllm

V = 1024


def _sampler(mode: str):
    import onpolicy.vllm_plugin as plugin

    plugin.enable()
    from vllm.v1.sample.sampler import Sampler

    from onpolicy.vllm_plugin.sampler import install

    runner = SimpleNamespace(sampler=Sampler(logprobs_mode=mode))
    install(runner)
    return runner.sampler


def _metadata(temperature, *, logprobs=0, top_k=None, top_p=None, seeds=None):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    n = len(temperature)
    t = torch.tensor(temperature, dtype=torch.float32)
    zeros = torch.zeros(n)
    gens = {}
    for i, s in enumerate(seeds or []):
        if s is not None:
            gens[i] = torch.Generator().manual_seed(s)
    return SamplingMetadata(
        temperature=t, all_greedy=bool((t < 1e-5).all()), all_random=bool((t >= 1e-5).all()),
        top_p=top_p, top_k=top_k, generators=gens, max_num_logprobs=logprobs, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=zeros, presence_penalties=zeros,
        repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )


def _logits(n, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g) * 4).to(dtype)


def _sampled_logprob(out):
    return out.logprobs_tensors.logprobs[:, 0], out.sampled_token_ids[:, 0].long()


def test_processed_logprobs_are_onpolicy_log_softmax():
    import onpolicy_kernels as K

    s = _sampler("processed_logprobs")
    temps = [1.0, 0.7, 1.3, 0.5]
    logits = _logits(4)
    out = s(logits.clone(), _metadata(temps))
    lp, tok = _sampled_logprob(out)
    ref = K.token_logprobs(logits, tok, torch.tensor(temps))
    assert torch.equal(lp.view(torch.int32), ref.view(torch.int32))


def test_raw_logprobs_are_temperature_one():
    import onpolicy_kernels as K

    s = _sampler("raw_logprobs")
    logits = _logits(3, seed=1)
    out = s(logits.clone(), _metadata([0.7, 0.7, 0.7]))
    lp, tok = _sampled_logprob(out)
    ref = K.token_logprobs(logits, tok, 1.0)
    assert torch.equal(lp.view(torch.int32), ref.view(torch.int32))


def test_mixed_greedy_and_random_rows():
    import onpolicy_kernels as K

    s = _sampler("processed_logprobs")
    logits = _logits(3, seed=2)
    out = s(logits.clone(), _metadata([0.0, 0.8, 0.0]))
    lp, tok = _sampled_logprob(out)
    argmax = logits.float().argmax(-1)
    assert tok[0] == argmax[0] and tok[2] == argmax[2]
    ref = K.token_logprobs(logits, tok, torch.tensor([1.0, 0.8, 1.0]))
    assert torch.equal(lp.view(torch.int32), ref.view(torch.int32))


def test_seeded_row_is_batch_invariant():
    s = _sampler("processed_logprobs")
    big = _logits(9, seed=3)
    row = 4
    alone = s(big[row:row + 1].clone(), _metadata([0.9], seeds=[11]))
    seeds = [None] * 9
    seeds[row] = 11
    batch = s(big.clone(), _metadata([0.9] * 9, seeds=seeds))
    a_lp, a_tok = _sampled_logprob(alone)
    b_lp, b_tok = _sampled_logprob(batch)
    assert a_tok[0] == b_tok[row]
    assert torch.equal(a_lp[0:1].view(torch.int32), b_lp[row:row + 1].view(torch.int32))


def _min_p_processor(values):
    """vLLM's own MinPLogitsProcessor holding `values` (one per row), as the input batch fills it."""
    from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

    proc = MinPLogitsProcessor.__new__(MinPLogitsProcessor)
    proc.min_p_count = sum(v > 0 for v in values)
    proc.min_p = torch.tensor(values, dtype=torch.float32)[:, None]
    return proc


@pytest.mark.parametrize("temps", [[1.0, 1.0, 1.0, 1.0], [0.7, 1.0, 0.7, 0.0]], ids=["T1", "T0.7-greedy"])
def test_truncating_requests_return_the_shared_truncation_and_sample_inside_it(temps):
    """Processed logprobs of a batch mixing top-k, top-p, min-p and untruncated rows are the kernel's
    truncated logprobs row by row (untruncated rows: plain log_softmax), and each sampled token lies
    in its row's kept set."""
    import onpolicy_kernels as K
    from vllm.v1.sample.logits_processor import LogitsProcessors

    s = _sampler("processed_logprobs")
    logits = _logits(4, seed=6)
    k = torch.tensor([5, V, V, V], dtype=torch.int32)  # rows without top-k hold vocab_size (vLLM's input batch)
    p = torch.tensor([1.0, 0.8, 1.0, 1.0])
    mp = [0.0, 0.0, 0.05, 0.0]
    md = _metadata(temps, top_k=k, top_p=p)
    md.logitsprocs = LogitsProcessors([_min_p_processor(mp)])
    out = s(logits.clone(), md)
    lp, tok = _sampled_logprob(out)
    t = torch.tensor([x if x > 0 else 1.0 for x in temps])
    ref = K.truncated_log_softmax(logits, t, top_k=k, top_p=p, min_p=torch.tensor(mp))
    assert torch.equal(lp, ref.gather(1, tok[:, None])[:, 0])
    assert torch.isfinite(lp).all()  # every sampled token is inside its row's kept set
    assert (ref[:3] == float("-inf")).any(-1).all()  # rows 0-2 truncate ...
    assert torch.equal(ref[3], K.log_softmax(logits[3:], t[3:])[0])  # ... row 3 is untouched, bitwise
    if temps[3] == 0.0:
        assert tok[3] == logits[3].float().argmax()


def test_truncated_row_is_batch_invariant():
    """A top-p request alone and inside a batch whose other rows set top-k or nothing: same token,
    same bits (seeded)."""
    s = _sampler("processed_logprobs")
    big = _logits(6, seed=8)
    row = 2
    alone = s(big[row:row + 1].clone(), _metadata([0.8], top_p=torch.tensor([0.9]), seeds=[5]))
    seeds = [None] * 6
    seeds[row] = 5
    k = torch.tensor([3, V, V, 40, V, V], dtype=torch.int32)
    p = torch.tensor([1.0, 1.0, 0.9, 0.5, 1.0, 1.0])
    batch = s(big.clone(), _metadata([0.8] * 6, top_k=k, top_p=p, seeds=seeds))
    a_lp, a_tok = _sampled_logprob(alone)
    b_lp, b_tok = _sampled_logprob(batch)
    assert a_tok[0] == b_tok[row] and torch.equal(a_lp[0:1], b_lp[row:row + 1])


def test_custom_argmax_invariant_processor_with_logprobs_fails_loudly():
    """A processor onpolicy cannot reproduce in the trainer (not min-p): processed logprobs refused."""
    from vllm.v1.sample.logits_processor import LogitsProcessors

    from onpolicy.vllm_plugin import OnpolicyVllmError

    class Custom:
        def apply(self, logits):
            return logits

        def is_argmax_invariant(self):
            return True

    s = _sampler("processed_logprobs")
    md = _metadata([1.0, 1.0])
    md.logitsprocs = LogitsProcessors([Custom()])
    with pytest.raises(OnpolicyVllmError, match="custom argmax-invariant logits processor"):
        s(_logits(2).clone(), md)
    md = _metadata([1.0, 1.0], logprobs=None)
    md.logitsprocs = LogitsProcessors([Custom()])
    s(_logits(2).clone(), md)  # without logprobs it samples


def test_top_k_without_logprobs_samples_inside_the_top_k():
    s = _sampler("processed_logprobs")
    logits = _logits(2, seed=4)
    md = _metadata([1.0, 1.0], logprobs=None, top_k=torch.tensor([3, 3]))
    out = s(logits.clone(), md)
    # vLLM's top-k keeps every token at or above the k-th largest logit: ties included (row 0 of
    # these bf16 logits ties at 3rd place, so four tokens are in its top 3)
    third = logits.float().topk(3, dim=-1).values[:, -1]
    tok = out.sampled_token_ids[:, 0].long()
    assert all(logits[i, tok[i]].float() >= third[i] for i in range(2))


@pytest.mark.parametrize("kw", [dict(k=5), dict(p=0.9), dict(mp=0.05), dict(k=40, p=0.8, mp=0.01)],
                         ids=["top_k", "top_p", "min_p", "all"])
def test_rule_keeps_the_set_vllm_keeps_when_no_tie_or_rounding_sits_at_the_boundary(kw):
    """onpolicy's truncation replaces vLLM's masking (min-p processor, then apply_top_k_top_p); on
    fp32 logits without ties the kept sets are the same except where a boundary is within rounding."""
    import onpolicy_kernels as K
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    g = torch.Generator().manual_seed(9)
    logits = torch.randn(32, V, generator=g) * 3
    k = torch.full((32,), kw.get("k", V), dtype=torch.int32)
    p = torch.full((32,), kw.get("p", 1.0))
    x = logits / 0.7
    if kw.get("mp"):
        x = _min_p_processor([kw["mp"]] * 32).apply(x.clone())
    vllm_kept = apply_top_k_top_p_pytorch(x.clone(), k if "k" in kw else None, p if "p" in kw else None) > -float("inf")
    ours = K.truncated_log_softmax(logits, 0.7, top_k=k, top_p=p, min_p=kw.get("mp", 0.0)) > -float("inf")
    assert (vllm_kept != ours).sum() <= 1, (vllm_kept != ours).nonzero()


# --- V2 (0.26): which settings a step truncates with, read off the requests' host arrays ------------------------------

def _v2_states(top_k, top_p, min_p, vocab=V):
    import numpy as np

    arr = lambda v, dt: SimpleNamespace(np=np.asarray(v, dtype=dt), gpu=torch.as_tensor(np.asarray(v, dtype=dt)))  # noqa: E731
    return SimpleNamespace(vocab_size=vocab, top_k=arr(top_k, np.int32), top_p=arr(top_p, np.float32),
                           min_p=arr(min_p, np.float32))


@pytest.mark.parametrize("top_k, top_p, min_p, rows, expected", [
    # defaults everywhere (what vLLM 0.26 stores for top_k=0/-1: vocab_size): nothing to truncate
    ([V, V, V], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0, 1, 2], (None, None, None)),
    # row 2 has top-k and top-p: both gathered for the step's rows
    ([V, V, 50], [1.0, 1.0, 0.9], [0.0, 0.0, 0.0], [0, 1, 2], ([V, V, 50], [1.0, 1.0, 0.9], None)),
    ([V, V], [1.0, 1.0], [0.0, 0.1], [0, 1], (None, None, [0.0, 0.1])),
    # the truncating request is not in this step's batch (idx mapping picks rows 0 and 2): nothing to do
    ([V, 7, V], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0, 2], (None, None, None)),
])
def test_v2_truncation_reads_request_parameters(top_k, top_p, min_p, rows, expected):
    import numpy as np

    from onpolicy.vllm_plugin.sampler import v2_truncation

    got = v2_truncation(_v2_states(top_k, top_p, min_p), torch.as_tensor(rows), np.asarray(rows))
    for g, e in zip(got, expected):
        assert (g is None) if e is None else g.tolist() == pytest.approx(e)


def test_default_parameters_with_logprobs_never_refuse():
    """top_k/top_p None (vLLM's "no request uses it") and no min-p: no error, whatever the logits."""
    s = _sampler("processed_logprobs")
    logits = _logits(4, seed=5)
    logits[0, :] = float("-inf")  # a row vLLM may hand over masked (e.g. grammar) must not trip the check
    logits[0, 7] = 0.0
    out = s(logits.clone(), _metadata([1.0, 0.7, 1.0, 1.3]))
    assert out.sampled_token_ids[0, 0] == 7


def test_warmup_requests_with_top_k_and_logprobs_run():
    """vLLM's warm-up samples with top-k, top-p, min-p and logprobs: served like any request."""
    from onpolicy.vllm_plugin.worker import sampler_warmup

    s = _sampler("processed_logprobs")
    md = _metadata([0.9, 0.9], logprobs=5, top_k=torch.tensor([50, 50]), top_p=torch.tensor([0.9, 0.9]))
    with sampler_warmup(SimpleNamespace(sampler=s)):
        out = s(_logits(2).clone(), md)
    assert not s._onpolicy_warmup and torch.isfinite(out.logprobs_tensors.logprobs[:, 0]).all()


# --- the V2 sampler's temperatures: a host decision, the same bits either way -----------------------------------------

def _v2_temperature_states(temps):
    import numpy as np

    t = np.asarray(temps, dtype=np.float32)
    return SimpleNamespace(temperature=SimpleNamespace(np=t, gpu=torch.from_numpy(t.copy())))


@pytest.mark.parametrize("temps, rows, unit", [
    ([1.0, 0.0, 1.0], [0, 1, 2], True),  # sampled at 1 and greedy: no per-row tensor needed
    ([1.0, 0.7, 1.0], [0, 2], True),  # the 0.7 request is not in this step
    ([1.0, 0.7, 0.0], [0, 1, 2], False),
    ([1.3], [0], False),
])
def test_v2_row_temperatures_skip_the_tensor_only_for_unit_batches_and_keep_the_bits(temps, rows, unit):
    import numpy as np

    import onpolicy_kernels as K
    from onpolicy.vllm_plugin.sampler import v2_row_temperatures

    states = _v2_temperature_states(temps)
    idx = np.asarray(rows)
    expanded = torch.as_tensor(rows)
    t = v2_row_temperatures(states, expanded, idx)
    assert (isinstance(t, float) and t == 1.0) if unit else isinstance(t, torch.Tensor)
    # what the rows are divided by: the request's temperature, greedy (0) rows at 1.0
    per_row = torch.tensor([temps[r] if temps[r] != 0.0 else 1.0 for r in rows], dtype=torch.float32)
    logits = _logits(len(rows), seed=11)
    assert torch.equal(K.log_softmax(logits, t), K.log_softmax(logits, per_row))


def test_unit_rows_are_ones_from_one_kept_buffer_with_the_float_paths_bits():
    import onpolicy_kernels as K
    from onpolicy.vllm_plugin.sampler import unit_rows

    owner = SimpleNamespace()
    with torch.inference_mode():
        a = unit_rows(owner, 8, "cpu")
        b = unit_rows(owner, 3, "cpu")
        assert torch.equal(a, torch.ones(8)) and b.data_ptr() == a.data_ptr()  # one buffer, sliced
        big = unit_rows(owner, 1000, "cpu")  # more rows than the buffer holds: a larger one
        assert big.numel() == 1000 and torch.equal(big, torch.ones(1000))
        logits = _logits(5, seed=3)
        assert torch.equal(K.log_softmax(logits, unit_rows(owner, 5, "cpu")), K.log_softmax(logits, 1.0))
    assert not owner._onpolicy_unit_rows.is_inference()  # made outside inference mode: any caller may use it


def _v2_sampler(temps, **extra):
    """A stand-in for 0.26's V2 sampler object: no logit bias, penalties, bad words or masking;
    the requests' temperatures `temps`; processed logprobs."""
    import numpy as np

    n = len(temps)
    noop = SimpleNamespace(apply_logit_bias=lambda *a: None, apply_penalties=lambda *a: None,
                           apply_bad_words=lambda *a: None)
    states = _v2_temperature_states(temps)
    vars(states).update(vocab_size=V, top_k=SimpleNamespace(np=np.full(n, V)), top_p=SimpleNamespace(np=np.ones(n)),
                        min_p=SimpleNamespace(np=np.zeros(n)),
                        seeds=SimpleNamespace(gpu=torch.zeros(n, dtype=torch.int64)))
    return SimpleNamespace(logit_bias_state=noop, penalties_state=noop, bad_words_state=noop, sampling_states=states,
                           _onpolicy_mode="processed_logprobs", _onpolicy_warmup=False, **extra)


@pytest.mark.parametrize("temps", [[1.0, 0.0, 1.0], [0.7, 1.0, 0.0]], ids=["unit", "per-row"])
def test_v2_sample_divides_each_row_by_its_temperature(monkeypatch, temps):
    """Model runner V2 (0.26's layout, GPU only in practice) with fake states: the returned
    logprobs are log_softmax(logits / t) per row, greedy rows at 1, whichever way t is built
    (the kept buffer of ones for a unit step, the per-row tensor otherwise), and vLLM's Gumbel
    sampler is handed those logprobs with its temperature step off."""
    import numpy as np

    import onpolicy_kernels as K
    from onpolicy.vllm_plugin.sampler import V2SamplerMixin026
    import vllm.v1.worker.gpu.sample.gumbel as gumbel

    seen = {}

    def fake_gumbel(x, idx, temp, seeds, pos, apply_temperature, use_fp64=False):
        seen.update(x=x, apply_temperature=apply_temperature)
        return x.argmax(-1)

    monkeypatch.setattr(gumbel, "gumbel_sample", fake_gumbel)
    n = len(temps)
    s = _v2_sampler(temps)
    logits = _logits(n, seed=5)
    idx = np.arange(n)
    with torch.inference_mode():
        sampled, lp = V2SamplerMixin026.sample(s, logits.clone(), torch.arange(n), idx, torch.zeros(n), None, None,
                                               return_logprobs=True)
    per_row = torch.tensor([x if x != 0.0 else 1.0 for x in temps], dtype=torch.float32)
    assert torch.equal(lp, K.log_softmax(logits, per_row))
    assert seen["x"] is lp and seen["apply_temperature"] is False
    assert torch.equal(sampled, lp.argmax(-1))
    assert hasattr(s, "_onpolicy_unit_rows") == (temps == [1.0, 0.0, 1.0])


@pytest.mark.parametrize("temps", [[1.0, 0.0, 1.0], [0.7, 1.0, 0.0]], ids=["unit", "per-row"])
def test_v2_sample_goes_through_its_decode_graphs(monkeypatch, temps):
    """With decode graphs installed (graphs.py; GPU), the log-softmax is the graphs' call: the float
    1.0 baked in for a unit step (no per-row ones), the per-row temperatures as graph rows otherwise."""
    import numpy as np

    import onpolicy_kernels as K
    from onpolicy.vllm_plugin.graphs import RowGraphs
    from onpolicy.vllm_plugin.sampler import V2SamplerMixin026
    import vllm.v1.worker.gpu.sample.gumbel as gumbel

    monkeypatch.setattr(gumbel, "gumbel_sample", lambda x, *a, **k: x.argmax(-1))
    calls = []

    def fn(logits, t):
        calls.append(t)
        return K.log_softmax(logits, t)

    n = len(temps)
    s = _v2_sampler(temps, _onpolicy_graphs=RowGraphs(fn, "log_softmax"))
    logits = _logits(n, seed=6)
    with torch.inference_mode():
        _, lp = V2SamplerMixin026.sample(s, logits.clone(), torch.arange(n), np.arange(n), torch.zeros(n), None,
                                         None, return_logprobs=True)
    per_row = torch.tensor([x if x != 0.0 else 1.0 for x in temps], dtype=torch.float32)
    assert torch.equal(lp, K.log_softmax(logits, per_row))
    assert len(calls) == 1
    assert (calls[0] == 1.0 and isinstance(calls[0], float)) if temps[0] == 1.0 else torch.equal(calls[0], per_row)
    assert not hasattr(s, "_onpolicy_unit_rows")


def test_v2_sample_truncates_the_rows_that_ask(monkeypatch):
    """0.26's V2 layout (stand-in states): a step with a top-p row, a top-k + min-p row and a plain row
    returns (and hands vLLM's Gumbel sampler) the shared truncation of each row."""
    import numpy as np

    import onpolicy_kernels as K
    import vllm.v1.worker.gpu.sample.gumbel as gumbel
    from onpolicy.vllm_plugin.sampler import V2SamplerMixin026

    seen = {}
    monkeypatch.setattr(gumbel, "gumbel_sample", lambda x, *a, **k: seen.setdefault("x", x).argmax(-1))
    temps = [0.7, 1.0, 0.7]
    s = _v2_sampler(temps)
    st = s.sampling_states
    for name, vals, dt in (("top_k", [V, 9, V], np.int32), ("top_p", [0.8, 1.0, 1.0], np.float32),
                           ("min_p", [0.0, 0.02, 0.0], np.float32)):
        a = np.asarray(vals, dtype=dt)
        setattr(st, name, SimpleNamespace(np=a, gpu=torch.as_tensor(a)))
    logits = _logits(3, seed=12)
    with torch.inference_mode():
        _, lp = V2SamplerMixin026.sample(s, logits.clone(), torch.arange(3), np.arange(3), torch.zeros(3), None, None,
                                         return_logprobs=True)
    t = torch.tensor(temps)
    ref = K.truncated_log_softmax(logits, t, top_k=torch.tensor([V, 9, V]), top_p=torch.tensor([0.8, 1.0, 1.0]),
                                  min_p=torch.tensor([0.0, 0.02, 0.0]))
    assert torch.equal(lp, ref) and seen["x"] is lp
    assert (lp[:2] == float("-inf")).any(-1).all() and torch.equal(lp[2], K.log_softmax(logits[2:], 0.7)[0])
