"""Issue 33, TRL's server mode (`vllm_mode="server"`) on the CPU: one `onpolicy serve` server for the module.

TRL 1.16's `trl vllm-serve` runs vLLM's own `vllm serve` (weight-transfer engine, processed logprobs,
dev-mode endpoints); `onpolicy serve` runs the same with the plugin on (onpolicy/serve.py). The trainer
talks to it with TRL's own `VLLMClient`, as GRPOTrainer does: generation through `/v1/completions`
(the sampled tokens' logprobs travel as JSON floats), the weight sync through `/start_weight_update`,
`/update_weights`, `/finish_weight_update`, `/reset_prefix_cache` -- with NCCL's broadcast replaced by a
file (fake_weight_transfer.py; NCCL needs GPUs). Checked here:

* the server starts with the plugin; its workers pass the onpolicy audit the trainer asks for;
* its logprobs equal the patched trainer's bitwise at T=1.0 and 0.7 (several distinct completions,
  logprobs well below 0); control: plain transformers differs on the same tokens;
* requests the trainer cannot reproduce (penalties, logit bias, ...) get a 400 naming the option, and
  the next request is served; top-k / top-p / min-p requests are served, a bad value gets a 400;
* after a weight update through TRL's client (every parameter changed), the server samples bitwise
  what the patched trainer with the new weights computes; control: the old weights differ;
* the same server without the plugin (ONPOLICY_VLLM=0) differs from the patched trainer (last test:
  the onpolicy server is stopped first, never two vLLM servers at once).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from vllm_helpers import MAX_MODEL_LEN, plain_logprobs, prompt_ids, trainer_logprobs

pytestmark = [pytest.mark.vllm]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PROMPTS = [prompt_ids(i) for i in range(3)]
N = 4


def _env(plugin: bool) -> dict:
    from onpolicy.serve import serve_env

    env = serve_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's own engine process, as users run it
    env["ONPOLICY_VLLM"] = "1" if plugin else "0"
    # this checkout (kernels, onpolicy) and the test's worker extension, in every server process
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "kernels"), str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return env


def _command(model_dir, port: int, extra=()) -> list[str]:
    from onpolicy.serve import serve_command

    return serve_command(str(model_dir), ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
                                          "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
                                          "--max-num-batched-tokens", "2048", "--gpu-memory-utilization", "0.3",
                                          "--seed", "0", "--enforce-eager", *extra])


class Servers:
    """The module's server (one at a time)."""

    def __init__(self, model_dir, logs: Path):
        self.model_dir, self.logs, self.current = model_dir, logs, None

    def start(self, plugin: bool, extra=(), env=None, name=None):
        from onpolicy.bench.server import VllmServer, free_port

        self.stop()
        if plugin:
            extra = ("--worker-extension-cls", "fake_weight_transfer.FakeTransferExtension", *extra)
        srv = VllmServer(_command(self.model_dir, free_port(), extra), {**_env(plugin), **(env or {})},
                         self.logs / f"server-{name or ('onpolicy' if plugin else 'plain')}.log")
        srv.start()
        self.current = srv
        srv.wait_healthy(300)
        return srv

    def stop(self):
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    s = Servers(model_dir, tmp_path_factory.mktemp("trl-server"))
    s.start(plugin=True)
    yield s
    s.stop()


@pytest.fixture
def client(servers):
    from trl.generation.vllm_client import VLLMClient

    srv = servers.current
    assert srv is not None and srv.running()
    return VLLMClient(base_url=srv.url, connection_timeout=30)


def _generate(client, temperature: float, seed: int = 0):
    """TRL's call (as GRPOTrainer makes it in server mode), plus a seed so reruns repeat."""
    out = client.generate(PROMPTS, n=N, temperature=temperature, max_tokens=12, logprobs=0,
                          generation_kwargs={"seed": seed})
    rows = []
    for i, (comp, lps) in enumerate(zip(out["completion_ids"], out["logprobs"])):
        prompt = out["prompt_ids"][i // N]
        assert prompt == PROMPTS[i // N]
        rows.append((prompt, comp, torch.tensor([lp[0] for lp in lps], dtype=torch.float32)))
    return rows


def _compare(rows, model, temperature: float, score=trainer_logprobs):
    """(rows bitwise equal, total rows); asserts non-degenerate sampling."""
    assert len({tuple(c) for _, c, _ in rows}) >= 3, "sampling is degenerate (too few distinct completions)"
    all_lp = torch.cat([lp for _, _, lp in rows])
    assert all_lp.max() < 0 and all_lp.mean() < -1.0, all_lp
    equal = 0
    for prompt, comp, lp in rows:
        mine = score(model, prompt, comp, temperature).float()
        equal += int(torch.equal(mine, lp))
    return equal, len(rows)


def _assert_serving(srv):
    """The server is up and healthy, and its log shows no dead engine and no onpolicy error."""
    assert srv.healthy() and srv.running()
    text = srv.log_text()
    assert "EngineDeadError" not in text and "OnpolicyVllmError" not in text, text[-3000:]


def test_server_starts_with_plugin_and_passes_the_trainer_audit(servers, client):
    from onpolicy.server import audit_server

    audit = audit_server(client)
    assert audit["rl_server"] and audit["logprobs_mode"] == "processed_logprobs" and audit["dtype"] == "bfloat16"
    assert audit["tensor_parallel_size"] == 1 and audit["counts"]["attention"] > 0, audit
    # (the plugin's log lines are not checked: whether vLLM's logging shows them depends on the environment
    # the server inherits; the audit above is each worker's own answer)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_round_trip_is_bitwise_the_trainer(client, hf_model, temperature):
    rows = _generate(client, temperature)
    assert _compare(rows, hf_model, temperature) == (len(rows), len(rows))
    # control: plain transformers on the same tokens differs
    plain, total = _compare(rows, hf_model, temperature, score=plain_logprobs)
    assert plain < total


BAD = [({"repetition_penalty": 1.3}, "repetition_penalty"), ({"presence_penalty": 0.5}, "presence_penalty"),
       ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"logit_bias": {"105": 5.0}}, "logit_bias"),
       ({"min_tokens": 2}, "min_tokens"), ({"allowed_token_ids": [5, 6, 7]}, "allowed_token_ids"),
       ({"structured_outputs": {"regex": "a+"}}, "structured_outputs")]


def test_bad_requests_get_400_and_the_server_serves_the_next(servers, client):
    import httpx

    srv = servers.current
    body = {"model": client.model, "prompt": PROMPTS[0], "max_tokens": 4, "logprobs": 0, "temperature": 0.7}
    with httpx.Client(timeout=120, trust_env=False) as http:
        for extra, name in BAD:
            r = http.post(srv.url + "/v1/completions", json={**body, **extra})
            assert r.status_code == 400, (extra, r.status_code, r.text)
            assert name in r.text and "onpolicy" in r.text, r.text
            r = http.post(srv.url + "/v1/completions", json=body)  # the next request is served
            assert r.status_code == 200, r.text
            assert all(x < 0 for x in r.json()["choices"][0]["logprobs"]["token_logprobs"])
    # through TRL's client, as a GRPOConfig(repetition_penalty=1.2) run would send it
    with pytest.raises(Exception, match="400.*repetition_penalty"):
        client.generate(PROMPTS[:1], n=1, repetition_penalty=1.2, max_tokens=4)
    _assert_serving(srv)


TRUNCATED = {"prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0, "top_k": 5}  # issue 28's request, now served


def test_truncation_requests_served_a_bad_value_gets_400_and_the_server_stays_up(servers, client):
    """Issue 28 item 2, issue 32: top-k / top-p / min-p requests get the truncated distribution's logprobs
    (which the trainer reproduces: test_truncation.py); a bad value gets vLLM's 400 naming the parameter,
    and the next request is served with its logprobs."""
    import httpx

    srv = servers.current
    url = srv.url + "/v1/completions"
    with httpx.Client(timeout=120, trust_env=False) as http:
        for req in (TRUNCATED, {**TRUNCATED, "top_k": None, "top_p": 0.5}, {**TRUNCATED, "min_p": 0.1}):
            r = http.post(url, json={"model": client.model, **req})
            assert r.status_code == 200, (r.status_code, r.text)
            lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            assert len(lps) == 4 and all(isinstance(x, float) and x <= 0 for x in lps), lps
        r = http.post(url, json={"model": client.model, **{**TRUNCATED, "top_k": None, "top_p": 1.5}})
        assert r.status_code == 400 and "top_p" in r.text, (r.status_code, r.text)
        r = http.post(url, json={"model": client.model, "prompt": [5, 6, 7], "max_tokens": 4, "logprobs": 0})
        assert r.status_code == 200, r.text
        lps = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert len(lps) == 4 and all(isinstance(x, float) and x < 0 for x in lps), lps
    _assert_serving(srv)


def test_weight_update_through_trls_client_then_bitwise(client, hf_model, tmp_path, monkeypatch):
    from fake_weight_transfer import install_trainer_side

    from onpolicy.server import audit_server

    install_trainer_side(monkeypatch, tmp_path)
    new = copy.deepcopy(hf_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():  # every parameter changes: a layer left stale would show
            p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
    client.init_communicator(device="cpu")
    with client.weight_update():  # TRL's session: start, one /update_weights per tensor group, finish
        client.update_model_params(new)
    client.reset_prefix_cache()
    audit_server(client)  # still every layer on onpolicy's kernels
    for temperature in (1.0, 0.7):
        rows = _generate(client, temperature, seed=1)
        assert _compare(rows, new, temperature) == (len(rows), len(rows)), temperature
        old, total = _compare(rows, hf_model, temperature)  # control: the weights before the update
        assert old == 0, (old, total)


def _reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def test_grpo_run_in_server_mode_strict(servers, model_dir, tmp_path, monkeypatch):
    """OnPolicyGRPOTrainer(vllm_mode="server") for 3 steps in strict mode (a step whose tokens differ fails):
    TRL's generation through the server, TRL's weight sync before steps 2 and 3 (NCCL replaced by a file)."""
    import json

    from datasets import Dataset
    from fake_weight_transfer import install_trainer_side
    from trl import GRPOConfig

    from onpolicy.trl_grpo import OnPolicyGRPOTrainer

    install_trainer_side(monkeypatch, tmp_path)
    ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})
    out = tmp_path / "run"
    trainer = OnPolicyGRPOTrainer(
        model=str(model_dir), reward_funcs=_reward, train_dataset=ds, onpolicy="strict",
        args=GRPOConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url=servers.current.url,
                        model_init_kwargs={"dtype": "bfloat16"}, use_cpu=True, max_steps=3, output_dir=str(out),
                        temperature=0.7, max_completion_length=12, per_device_train_batch_size=8, num_generations=4,
                        learning_rate=1e-3, warmup_steps=0, logging_steps=1, report_to="none", seed=0))
    assert trainer.onpolicy_server["rl_server"]
    trainer.train()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("step") is not None and "bitwise_equal_frac" in r]
    assert [r["step"] for r in steps] == [1, 2, 3], steps
    assert all(r["bitwise_equal_frac"] == 1.0 and r["tokens"] > 20 for r in steps), steps
    assert len({r["weights"] for r in steps}) == 3, "the policy did not change between steps (no sync tested)"
    for row in trainer.state.log_history:
        if "sampling/sampling_logp_difference/max" in row:
            assert row["sampling/sampling_logp_difference/max"] == 0.0, row


def test_the_server_without_the_plugin_differs(servers, hf_model):
    from trl.generation.vllm_client import VLLMClient

    servers.start(plugin=False)  # stops the onpolicy server first
    try:
        client = VLLMClient(base_url=servers.current.url, connection_timeout=30)
        for temperature in (1.0, 0.7):
            rows = _generate(client, temperature)
            equal, total = _compare(rows, hf_model, temperature)
            assert equal < total, (temperature, equal, total)
        from onpolicy.server import ServerCheckError, audit_server

        with pytest.raises(ServerCheckError, match="onpolicy serve"):
            audit_server(client)  # the trainer refuses it, naming the launch
        assert servers.current.running()  # the unknown RPC did not kill it
    finally:
        servers.stop()


def test_a_misconfigured_rl_server_is_refused_at_start_naming_the_fix(servers, model_dir):
    import subprocess

    from onpolicy.bench.server import free_port

    servers.stop()
    cmd = _command(model_dir, free_port(), ("--logprobs-mode", "raw_logprobs"))
    r = subprocess.run(cmd, env=_env(True), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert "--logprobs-mode processed_logprobs" in out and "onpolicy serve" in out, out[-2000:]


def _tp2_logprobs(model, prompt, completion, temperature):
    import onpolicy

    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        return onpolicy.token_logprobs(model, ids, temperature=temperature, logits_to_keep=len(completion),
                                       tensor_parallel_size=2)[0]


@pytest.mark.slow
def test_tensor_parallel_2_server_bitwise_before_and_after_a_weight_update(servers, hf_model, tmp_path, monkeypatch):
    """The server at tensor_parallel_size=2 (two worker processes, one core each): the trainer mirrors it
    (its audit reports 2), bitwise at T=1.0 and 0.7; the TP=1 forward differs; a weight update reaches both ranks
    (this is the suite's TP=2 engine test: vLLM's all-reduce of two partials, mirrored by the trainer)."""
    from fake_weight_transfer import install_trainer_side
    from trl.generation.vllm_client import VLLMClient

    from onpolicy.server import audit_server

    servers.start(plugin=True, extra=("--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"),
                  env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, name="tp2")
    try:
        client = VLLMClient(base_url=servers.current.url, connection_timeout=30)
        audit = audit_server(client)
        assert audit["tensor_parallel_size"] == 2 and audit["workers"] == 2, audit
        for t in (1.0, 0.7):
            rows = _generate(client, t)
            assert _compare(rows, hf_model, t, score=_tp2_logprobs) == (len(rows), len(rows))
            tp1, total = _compare(rows, hf_model, t)  # control: the unsharded forward's reductions
            assert tp1 < total
        install_trainer_side(monkeypatch, tmp_path)
        new = copy.deepcopy(hf_model)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in new.parameters():
                p.add_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))
        client.init_communicator(device="cpu")
        with client.weight_update():
            client.update_model_params(new)
        client.reset_prefix_cache()
        rows = _generate(client, 0.7, seed=1)
        assert _compare(rows, new, 0.7, score=_tp2_logprobs) == (len(rows), len(rows))
        assert _compare(rows, hf_model, 0.7, score=_tp2_logprobs)[0] == 0  # the old weights
    finally:
        servers.stop()
