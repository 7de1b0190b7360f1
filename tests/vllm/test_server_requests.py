"""Issue 28 item 2, issue 32: requests with top-k / top-p / min-p and processed logprobs are served (the
logprobs of the truncated distribution, which the trainer reproduces: test_truncation.py); a bad value
gets vLLM's 400 naming the parameter; the server (or the in-process engine) stays up and serves the
next request with its logprobs.

The server test runs vLLM's real OpenAI server (`python -m vllm.entrypoints.openai.api_server`,
multiprocess engine, 127.0.0.1 only, bounded waits) with ONPOLICY_VLLM=1 and
`--logprobs-mode processed_logprobs`, as docs/determinism-bench.md recommends for TRL's server mode.
"""
from __future__ import annotations

import sys

import pytest
from vllm_helpers import prompt_ids

pytestmark = pytest.mark.vllm

TRUNCATED = {"prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0, "top_k": 5}  # issue 28's request, now served


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


@pytest.mark.slow
def test_openai_server_serves_truncation_answers_400_and_stays_up(model_dir, tmp_path):
    import httpx

    from onpolicy.bench.server import CONFIGS, VllmServer, free_port, server_command, server_env

    port = free_port()
    cmd = server_command(sys.executable, str(model_dir), port, max_model_len=256, max_num_seqs=8,
                         max_num_batched_tokens=512, seed=0, gpu_memory_utilization=0.3,
                         extra=("--logprobs-mode", "processed_logprobs", "--enforce-eager"))
    log = tmp_path / "server.log"
    with VllmServer(cmd, server_env(CONFIGS["onpolicy"]), log) as srv:
        srv.wait_healthy(300)
        model = srv.served_model()
        url = srv.url + "/v1/completions"
        with httpx.Client(timeout=120, trust_env=False) as client:
            for req in (TRUNCATED, {**TRUNCATED, "top_k": None, "top_p": 0.5}, {**TRUNCATED, "min_p": 0.1}):
                r = client.post(url, json={"model": model, **req})
                assert r.status_code == 200, (r.status_code, r.text)
                lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                assert len(lps) == 4 and all(isinstance(x, float) and x <= 0 for x in lps), lps
            r = client.post(url, json={"model": model, **{**TRUNCATED, "top_k": None, "top_p": 1.5}})
            assert r.status_code == 400 and "top_p" in r.text, (r.status_code, r.text)
            # a normal request still returns its logprobs, and the server is healthy
            r = client.post(url, json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0})
            assert r.status_code == 200, r.text
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert len(lps) == 4 and all(isinstance(x, float) and x < 0 for x in lps), lps
            assert client.get(srv.url + "/health").status_code == 200
        assert srv.running()
        text = log.read_text(errors="replace")  # before the stop (its shutdown logs an EngineDeadError)
    assert "onpolicy vLLM plugin registered" in text
    assert "EngineDeadError" not in text and "OnpolicyVllmError" not in text, text[-3000:]
