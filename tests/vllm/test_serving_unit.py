"""Issue 33, server mode, without an engine: `onpolicy serve`'s command line, the RL-server checks at
build and per request (vllm_plugin/serving.py), and the trainer's audit of a server (onpolicy/server.py)
against stand-in answers."""
from __future__ import annotations

import json
import types

import pytest

from onpolicy.server import ServerCheckError, audit_server
from onpolicy.serve import serve_command, serve_env
from onpolicy.vllm_plugin import OnpolicyVllmError, serving


def test_serve_command_adds_what_an_onpolicy_rl_server_needs():
    cmd = serve_command("M", ["--port", "8765"], python="py")
    assert cmd[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "M"]
    args = dict(zip(cmd[7::2], cmd[8::2]))
    assert json.loads(args["--weight-transfer-config"]) == {"backend": "nccl"}
    assert args["--logprobs-mode"] == "processed_logprobs" and args["--generation-config"] == "vllm"
    env = serve_env({})
    assert env["ONPOLICY_VLLM"] == "1" and env["VLLM_SERVER_DEV_MODE"] == "1"


@pytest.mark.parametrize("given", [["--logprobs-mode", "raw_logprobs"], ["--logprobs_mode", "raw_logprobs"],
                                   ["--logprobs-mode=raw_logprobs"]])
def test_serve_command_keeps_what_the_user_set(given):
    cmd = serve_command("M", given)
    assert cmd.count("raw_logprobs") + sum("=raw_logprobs" in a for a in cmd) >= 1
    assert "processed_logprobs" not in cmd  # the engine refuses it at build, naming the fix


def test_serve_command_needs_the_model_first():
    with pytest.raises(ValueError, match="MODEL"):
        serve_command("--port", ["8765"])


def _config(mode="processed_logprobs", backend="nccl", procs=None, transfer=True):
    mc = types.SimpleNamespace(logprobs_mode=mode, logits_processors=procs)
    wt = types.SimpleNamespace(backend=backend) if transfer else None
    return types.SimpleNamespace(model_config=mc, weight_transfer_config=wt, watermark_config=None)


def test_check_engine_refuses_a_misconfigured_rl_server_naming_the_fix(monkeypatch):
    monkeypatch.setattr(serving, "_rl_server", False)
    assert serving.check_engine(_config(mode="raw_logprobs", transfer=False)) is False  # not an RL server
    for cfg, fix in ((_config(mode="raw_logprobs"), "--logprobs-mode processed_logprobs"),
                     (_config(backend="ipc"), "--weight-transfer-config"),
                     (_config(procs=["my.Proc"]), "remove --logits-processors")):
        with pytest.raises(OnpolicyVllmError, match="onpolicy serve") as e:
            serving.check_engine(cfg)
        assert fix in str(e.value)
    assert not serving.rl_server()
    assert serving.check_engine(_config()) is True and serving.rl_server()


def test_requests_an_rl_server_refuses(monkeypatch):
    from vllm import SamplingParams

    monkeypatch.setattr(serving, "_rl_server", True)
    ok = (SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, logprobs=0, seed=3, n=4),
          SamplingParams(temperature=1.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0))
    for p in ok:
        serving.check_request(p)
    bad = {"repetition_penalty": dict(repetition_penalty=1.1), "presence_penalty": dict(presence_penalty=0.2),
           "frequency_penalty": dict(frequency_penalty=-0.2), "min_tokens": dict(min_tokens=1),
           "logit_bias": dict(logit_bias={5: 1.0}), "allowed_token_ids": dict(allowed_token_ids=[1, 2]),
           "bad_words": dict(bad_words=["x"])}
    from vllm.exceptions import VLLMClientError

    for name, kw in bad.items():
        with pytest.raises(VLLMClientError, match=name) as e:  # vLLM answers its client errors 400
            serving.check_request(SamplingParams(**kw))
        assert e.value.parameter == name
    monkeypatch.setattr(serving, "_rl_server", False)  # a plain `vllm serve`: vLLM's options as documented
    serving.check_request(SamplingParams(repetition_penalty=1.1))


class _Resp:
    def __init__(self, status, body):
        self.status_code, self._body, self.text = status, body, json.dumps(body)

    def json(self):
        return self._body


def _client(status, body):
    return types.SimpleNamespace(base_url="http://h:1", answer=_Resp(status, body))


@pytest.fixture(autouse=True)
def _answers(monkeypatch):
    import onpolicy.server as srv

    calls = []

    def post(url, payload, timeout):
        calls.append((url, payload))
        return _CURRENT[0].answer

    monkeypatch.setattr(srv, "_http_post", post)
    return calls


_CURRENT = [None]


def _audit(client):
    _CURRENT[0] = client
    return audit_server(client)


GOOD = {"onpolicy": True, "counts": {"attention": 2}, "dtype": "bfloat16", "logprobs_mode": "processed_logprobs",
        "tensor_parallel_size": 1, "rl_server": True, "rank": 0}


def test_audit_server_accepts_an_onpolicy_rl_server_and_names_the_fix_otherwise(_answers):
    assert _audit(_client(200, {"results": [GOOD]}))["dtype"] == "bfloat16"
    two = _audit(_client(200, {"results": [GOOD, {**GOOD, "rank": 1}]}))
    assert two["workers"] == 2
    cases = [(_client(404, {}), "dev-mode"), (_client(500, {"error": "no_such"}), "does not run the onpolicy plugin"),
             (_client(200, {"results": [{**GOOD, "logprobs_mode": "raw_logprobs"}]}), "processed_logprobs"),
             (_client(200, {"results": [{**GOOD, "rl_server": False}]}), "--weight-transfer-config"),
             (_client(200, {"results": [GOOD, {**GOOD, "dtype": "float32"}]}), "different settings")]
    for client, words in cases:
        with pytest.raises(ServerCheckError, match=words) as e:
            _audit(client)
        assert "onpolicy serve" in str(e.value) or "different" in words
    assert _answers[0] == ("http://h:1/collective_rpc", {"method": "onpolicy_audit"})


def test_trainer_refuses_structured_outputs_before_the_engine():
    from trl import GRPOConfig

    from onpolicy.trl_grpo import check_settings

    cfg = GRPOConfig(use_vllm=True, vllm_mode="server", use_cpu=True, output_dir="/tmp/x", report_to="none",
                     vllm_structured_outputs_regex="a+")
    with pytest.raises(ValueError, match="vllm_structured_outputs_regex"):
        check_settings(cfg, "strict")


def test_server_report_holds_the_audit_and_the_servers_weight_checksums(monkeypatch):
    """What a strict-mode mismatch records in server mode (the engine is not in this process)."""
    import onpolicy.server as srv

    answers = {"/collective_rpc": _Resp(200, {"results": [GOOD]}),
               "/weight_checker": _Resp(200, {"checksums": {"model.embed_tokens.weight": "ab12"}})}
    monkeypatch.setattr(srv, "_http_post", lambda url, payload, timeout: answers[url.removeprefix("http://h:1")])
    report = srv.server_report(types.SimpleNamespace(base_url="http://h:1"))
    assert report["server"] == "http://h:1" and report["audit"]["dtype"] == "bfloat16"
    assert report["weight_checksums"] == {"model.embed_tokens.weight": "ab12"}
