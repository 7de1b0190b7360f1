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


def test_top_k_with_logprobs_fails_loudly():
    from onpolicy.vllm_plugin import OnpolicyVllmError

    s = _sampler("processed_logprobs")
    md = _metadata([1.0, 1.0], top_k=torch.tensor([5, 5]))
    with pytest.raises(OnpolicyVllmError, match="top-k / top-p / min-p"):
        s(_logits(2).clone(), md)


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


# --- when the sampler refuses: the requests' parameters decide, not the tensors ---------------------------------------

def _v2_states(top_k, top_p, min_p, num_logprobs, token_ids=None, vocab=V):
    import numpy as np

    arr = lambda v, dt: SimpleNamespace(np=np.asarray(v, dtype=dt))  # noqa: E731
    states = SimpleNamespace(vocab_size=vocab, top_k=arr(top_k, np.int32), top_p=arr(top_p, np.float32),
                             min_p=arr(min_p, np.float32), num_logprobs=np.asarray(num_logprobs, dtype=np.int32))
    ids = None if token_ids is None else SimpleNamespace(num_token_ids=arr(token_ids, np.int32))
    return states, ids


@pytest.mark.parametrize("top_k, top_p, min_p, num_logprobs, token_ids, rows, expected", [
    # defaults everywhere (what vLLM 0.26 stores for top_k=0/-1: vocab_size), logprobs requested: no mask, no error
    ([V, V, V], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0, 5, -1], None, [0, 1, 2], (False, False)),
    # row 2 masks but asks no logprobs; rows 0-1 ask logprobs without masking: sample masked, no error
    ([V, V, 50], [1.0, 1.0, 0.9], [0.0, 0.0, 0.0], [0, 0, -1], None, [0, 1, 2], (True, False)),
    # a request with top-p and logprobs: error
    ([V, V], [1.0, 0.9], [0.0, 0.0], [-1, 0], None, [0, 1], (True, True)),
    # min-p with explicit logprob token ids: error
    ([V, V], [1.0, 1.0], [0.0, 0.1], [-1, -1], [0, 3], [0, 1], (True, True)),
    # the masking request is not in this step's batch (idx mapping picks rows 0 and 2): nothing to do
    ([V, 7, V], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0, 0, 0], None, [0, 2], (False, False)),
])
def test_v2_masking_decision_reads_request_parameters(top_k, top_p, min_p, num_logprobs, token_ids, rows, expected):
    import numpy as np

    from onpolicy.vllm_plugin.sampler import v2_masking_with_logprobs

    states, ids = _v2_states(top_k, top_p, min_p, num_logprobs, token_ids)
    assert v2_masking_with_logprobs(states, ids, np.asarray(rows)) == expected


def test_default_parameters_with_logprobs_never_refuse():
    """top_k/top_p None (vLLM's "no request uses it") and no min-p: no error, whatever the logits."""
    s = _sampler("processed_logprobs")
    logits = _logits(4, seed=5)
    logits[0, :] = float("-inf")  # a row vLLM may hand over masked (e.g. grammar) must not trip the check
    logits[0, 7] = 0.0
    out = s(logits.clone(), _metadata([1.0, 0.7, 1.0, 1.3]))
    assert out.sampled_token_ids[0, 0] == 7


def test_warmup_requests_are_not_refused():
    """vLLM's warm-up samples with top-k and logprobs; the worker marks the sampler while it runs."""
    from onpolicy.vllm_plugin.worker import sampler_warmup

    s = _sampler("processed_logprobs")
    md = _metadata([0.9, 0.9], logprobs=5, top_k=torch.tensor([50, 50]))
    with sampler_warmup(SimpleNamespace(sampler=s)):
        s(_logits(2).clone(), md)
    assert not s._onpolicy_warmup
    from onpolicy.vllm_plugin import OnpolicyVllmError

    with pytest.raises(OnpolicyVllmError, match="top-k / top-p / min-p"):
        s(_logits(2).clone(), md)


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
                        min_p=SimpleNamespace(np=np.zeros(n)), num_logprobs=np.full(n, -1),
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
