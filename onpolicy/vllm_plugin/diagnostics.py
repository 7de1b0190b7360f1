"""What an engine ran: the report a mismatch is filed with.

Everything the plugin decides at run time, per worker: the linear kernel's pick per
(weight shape, M bucket) (kernels/onpolicy_kernels/ops/linear/chooser.py: a Triton tile or a verified
cuBLASLt algorithm, chosen per process), whether vLLM compiled the model afresh or
loaded it from its compile cache, which decode-graph buckets the LM head and the
sampler captured and replayed (graphs.py), the switches in the environment, the
device and the versions. `engine_report(llm)` gathers it from every worker; strict
mode writes it next to the run's metrics when a token differs, so a report of a
mismatch can be diagnosed after the fact.
"""
from __future__ import annotations

import os
import platform

from onpolicy_kernels import envs

from . import compat

SWITCHES = envs.NAMES + ("VLLM_BATCH_INVARIANT", "VLLM_CACHE_ROOT", "VLLM_ENABLE_V1_MULTIPROCESSING")


def compile_report() -> dict:
    """This process's torch.compile activity in vLLM: graphs compiled afresh vs loaded from the cache."""
    try:
        from vllm.compilation.counter import compilation_counter as cc
    except ImportError:
        return {"state": "unknown (this vLLM has no compilation counter)"}
    total = int(getattr(cc, "num_backend_compilations", 0))
    fresh = int(getattr(cc, "num_cache_entries_updated", 0))
    state = ("no compilation counted (an eager engine, or a compile path vLLM's counter does not see)"
             if total == 0 else "compiled afresh" if fresh else "loaded from vLLM's compile cache")
    return {"state": state, "backend_compilations": total, "compiled_and_stored": fresh}


def graphs_report(runner, model) -> dict:
    """The decode graphs installed in this worker: per graphed op, the buckets captured, captures, replays."""
    from . import graphs

    out = {}
    for g in graphs.installed(runner, model):
        out[g.name] = {"buckets": sorted({k[0] for k, v in g._graphs.items() if v}), "captures": g.captures,
                       "replays": g.replays, "max_rows": g.max_rows}
    return out


def worker_report(worker) -> dict:
    """Run inside a vLLM worker (`LLM.collective_rpc`): what this worker runs."""
    import torch

    from onpolicy_kernels.ops.linear import chooser as linear_choice

    runner = getattr(worker, "model_runner", None)
    rep: dict = {"pid": os.getpid(), "host": platform.node(),
                 "env": {k: os.environ[k] for k in SWITCHES if k in os.environ}}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import vllm

    rep["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
                       "vllm": getattr(vllm, "__version__", None)}
    if torch.cuda.is_available():
        rep["device"] = torch.cuda.get_device_name()
    rep["linear"] = linear_choice.snapshot()
    rep["compile"] = compile_report()
    rep["decode_graphs"] = graphs_report(runner, compat.runner_model(runner)) if runner is not None else {}
    return rep


def engine_report(llm) -> list[dict]:
    """`worker_report` of every worker of an onpolicy engine (one per tensor-parallel rank)."""
    return llm.collective_rpc(worker_report)
