"""Issue 28 item 2, issue 32: requests with top-k / top-p / min-p and processed logprobs are served (the
logprobs of the truncated distribution, which the trainer reproduces: test_truncation.py); a bad value
gets vLLM's 400 naming the parameter; the in-process engine stays up and serves the next request.
(The same through vLLM's OpenAI server: test_trl_server.py, on the module's `onpolicy serve` server.)
"""
from __future__ import annotations

import pytest
from vllm_helpers import prompt_ids

pytestmark = pytest.mark.vllm


def test_in_process_engine_serves_truncation_with_logprobs_and_refuses_bad_values(llm):
    from vllm import SamplingParams

    prompt = {"prompt_token_ids": prompt_ids(1)}
    for params in (SamplingParams(max_tokens=4, logprobs=0, top_k=5, seed=0),
                   SamplingParams(max_tokens=4, logprobs=0, top_p=0.9, seed=0),
                   SamplingParams(max_tokens=4, logprobs=0, min_p=0.2, seed=0)):
        (out,) = llm.generate([prompt], params, use_tqdm=False)
        c = out.outputs[0]
        assert len(c.logprobs) == 4 and all(c.logprobs[k][t].logprob <= 0 for k, t in enumerate(c.token_ids))
    for kw, name in (({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"), ({"top_k": -3}, "top_k")):
        with pytest.raises(Exception, match=name) as e:
            llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=0, **kw), use_tqdm=False)
        assert type(e.value).__name__ in ("ValueError", "VLLMValidationError")  # vLLM's 400, not an engine error
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=0, seed=0), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4  # the engine is alive
