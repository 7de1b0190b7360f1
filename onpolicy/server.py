"""The trainer's side of TRL's server mode: asking the vLLM server what it runs.

In server mode the engine lives in another process (TRL's `trl vllm-serve`, i.e. vLLM's `vllm
serve`, or `onpolicy serve`), so nothing is read in-process: the trainer asks the server's workers
through vLLM's dev-mode `/collective_rpc` (the endpoints TRL's weight sync needs are dev-mode too),
calling the onpolicy worker's `onpolicy_audit` (vllm_plugin/worker.py): each worker audits its
layers and sampler and reports its dtype, tensor-parallel size and logprobs mode.
"""
from __future__ import annotations

from .vllm_plugin.serving import LAUNCH_HINT


class ServerCheckError(Exception):
    pass


def _http_post(url: str, payload: dict, timeout: float):
    import requests

    return requests.post(url, json=payload, timeout=timeout)


def _post(client, path: str, payload: dict, timeout: float = 120.0):
    # one attempt, not through TRL's session: it retries 5xx answers, and a server without the plugin
    # answers the audit 500 (its workers have no onpolicy_audit)
    return _http_post(f"{client.base_url}{path}", payload, timeout)


def audit_server(client) -> dict:
    """The onpolicy audit of every worker of the server behind TRL's `VLLMClient`; raises
    ServerCheckError naming the fix unless all run onpolicy as an RL server, alike."""
    from .trainer.forward import SUPPORTED_TP

    url = client.base_url
    r = _post(client, "/collective_rpc", {"method": "onpolicy_audit"})
    if r.status_code == 404:
        raise ServerCheckError(f"the vLLM server at {url} does not expose its dev-mode endpoints: {LAUNCH_HINT}")
    if r.status_code != 200:
        raise ServerCheckError(f"the vLLM server at {url} does not run the onpolicy plugin (its workers answered "
                               f"onpolicy_audit with {r.status_code}: {r.text[:300]}): {LAUNCH_HINT}")
    per_rank = r.json().get("results") or []
    if not per_rank or not all(isinstance(x, dict) and x.get("onpolicy") for x in per_rank):
        raise ServerCheckError(f"the vLLM server at {url} did not report an onpolicy audit ({per_rank!r}): {LAUNCH_HINT}")
    first = {k: v for k, v in per_rank[0].items() if k != "rank"}
    if any({k: v for k, v in x.items() if k != "rank"} != first for x in per_rank):
        raise ServerCheckError(f"the workers of the vLLM server at {url} report different settings: {per_rank!r}")
    problems = []
    if not first.get("rl_server"):
        problems.append("it has no weight-transfer engine, so TRL's weight sync cannot reach it (pass "
                        "--weight-transfer-config '{\"backend\": \"nccl\"}')")
    if first.get("logprobs_mode") != "processed_logprobs":
        problems.append(f"logprobs_mode={first.get('logprobs_mode')!r} (pass --logprobs-mode processed_logprobs)")
    if first.get("tensor_parallel_size") not in SUPPORTED_TP:
        problems.append(f"tensor_parallel_size={first.get('tensor_parallel_size')} (onpolicy mirrors "
                        f"{', '.join(map(str, SUPPORTED_TP))})")
    if problems:
        raise ServerCheckError(f"the vLLM server at {url} cannot sample on-policy: " + "; ".join(problems)
                               + f". {LAUNCH_HINT}")
    return {**first, "url": url, "workers": len(per_rank)}


def server_report(client) -> dict:
    """What the server ran, for a mismatch report: its workers' audit and vLLM's sha256 of every weight it
    holds (`/weight_checker`; copies each weight to the host, so only at a mismatch)."""
    report = {"server": client.base_url}
    try:
        report["audit"] = audit_server(client)
    except ServerCheckError as e:
        report["audit_error"] = str(e)
    r = _post(client, "/weight_checker", {"action": "checksum"}, timeout=600)
    report["weight_checksums"] = r.json().get("checksums") if r.status_code == 200 else f"{r.status_code}: {r.text[:300]}"
    return report
