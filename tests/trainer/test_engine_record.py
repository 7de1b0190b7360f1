"""A mismatching step records what the sampler's engine ran (strict: every time; monitor: once)."""
import json
import types

import pytest


class _FakeLLM:
    def __init__(self, fail=False):
        self.fail, self.calls = fail, 0

    def collective_rpc(self, fn):
        self.calls += 1
        if self.fail:
            raise RuntimeError("worker gone")
        return [{"linear": {"digest": "abc", "picks": {"2048x2048 bfloat16 @ M<=64": "triton"}},
                 "compile": {"state": "compiled afresh"}, "rpc": fn.__name__}]


def _me(tmp_path, mode, llm):
    from onpolicy.runlog import RunLog

    return types.SimpleNamespace(accelerator=types.SimpleNamespace(is_main_process=True), onpolicy_mode=mode,
                                 onpolicy_log=RunLog(tmp_path), vllm_generation=types.SimpleNamespace(llm=llm))


def test_strict_records_every_mismatch_and_monitor_the_first(tmp_path):
    pytest.importorskip("trl")
    from onpolicy.trl_grpo import make_trainer_class

    cls = make_trainer_class()
    llm = _FakeLLM()
    me = _me(tmp_path / "s", "strict", llm)
    p3 = cls._record_engine(me, 3)
    assert p3.name == "engine_step3.json" and cls._record_engine(me, 4).name == "engine_step4.json"
    rep = json.loads(p3.read_text())
    assert rep[0]["rpc"] == "worker_report" and rep[0]["linear"]["digest"] == "abc"
    mon = _me(tmp_path / "m", "monitor", llm)
    assert cls._record_engine(mon, 2) is not None and cls._record_engine(mon, 5) is None
    assert sorted(p.name for p in (tmp_path / "m").glob("engine_step*.json")) == ["engine_step2.json"]


def test_a_failed_report_never_hides_the_mismatch(tmp_path, caplog):
    pytest.importorskip("trl")
    from onpolicy.trl_grpo import make_trainer_class

    cls = make_trainer_class()
    me = _me(tmp_path, "strict", _FakeLLM(fail=True))
    assert cls._record_engine(me, 1) is None
    assert "could not record what the engine ran" in caplog.text
    me.vllm_generation = types.SimpleNamespace(llm=None)  # server mode: no engine in this process
    assert cls._record_engine(me, 1) is None


def test_overwriting_a_run_dir_removes_its_engine_reports(tmp_path):
    from onpolicy.runlog import RunLog

    log = RunLog(tmp_path)
    log.log_step(1, {"tokens": 1, "bitwise_equal_frac": 0.0})
    log.write_engine_report(1, [{}])
    RunLog.open(tmp_path, overwrite=True)
    assert not list(tmp_path.glob("engine_step*.json"))


def test_the_end_record_closes_a_run_and_a_resume_reopens_it(tmp_path):
    """`{"event": "finished"}` after the last step (the dashboard's "finished"); readers of steps skip it;
    resuming drops it with the steps after the checkpoint."""
    from onpolicy.dashboard.sources import JsonlSource
    from onpolicy.runlog import RunLog, read_steps

    log = RunLog(tmp_path)
    for s in (1, 2, 3):
        log.log_step(s, {"tokens": 4, "bitwise_equal_frac": 1.0})
    log.finish()
    assert [r["step"] for r in read_steps(log.path)] == [1, 2, 3]
    last = json.loads(log.path.read_text().splitlines()[-1])
    assert last["event"] == "finished" and last["time"] > 0
    src = JsonlSource(log.path)
    src.read_new()
    assert src.finished is not None
    RunLog.open(tmp_path, resume_step=2)
    assert [json.loads(x).get("step") for x in log.path.read_text().splitlines()] == [1, 2]
