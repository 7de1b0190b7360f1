"""`onpolicy bench determinism`: is a vLLM server deterministic under load, and equal to the trainer?

For each configuration (onpolicy plugin on, vLLM default, vLLM's VLLM_BATCH_INVARIANT=1), one
after another: start `python -m vllm.entrypoints.openai.api_server` (multiprocess engine, as users
run it) on 127.0.0.1, send one target prompt N times at temperature 0 (and N/4 times at
temperature 1 with a fixed seed) mixed into seeded random traffic of other prompts and lengths, plus
bad input, then stop the server. Reported per configuration: distinct completions of the target
and where they part, throughput, latency, the status of each bad input, whether the server stayed
up, and how many sampled-token logprobs equal `onpolicy.token_logprobs` of the transformers model
bitwise. Exit 1 if the onpolicy configuration is not deterministic or not equal to the trainer, or
if any configuration failed to run cleanly; 2 on bad command-line input.
"""
from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Callable

from rich.markup import escape

from . import analysis, load
from .server import CONFIGS, PLUGIN_LOG_LINE, ServerError, VllmServer, free_port, server_command, server_env


class BenchError(Exception):
    """Bad input to the bench (reported in one line, no traceback)."""


def parse_configs(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad or not names:
        raise BenchError(f"--configs: unknown configuration {', '.join(bad) or '(none given)'}; "
                         f"choose from {', '.join(CONFIGS)}")
    return list(dict.fromkeys(names))


def logprobs_mode(server_args: list[str]) -> str:
    mode = "raw_logprobs"  # vLLM's default
    for i, a in enumerate(server_args):
        if a == "--logprobs-mode" and i + 1 < len(server_args):
            mode = server_args[i + 1]
        elif a.startswith("--logprobs-mode="):
            mode = a.split("=", 1)[1]
    return mode


def prepare(model: str) -> tuple[list, int]:
    """Validate the model; (token ids to draw prompts from, one past the largest known id)."""
    from ..families import UnsupportedModelError, load_model_config

    try:
        cfg = load_model_config(model)
    except UnsupportedModelError as e:
        raise BenchError(str(e)) from None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchError(f"cannot load the tokenizer of {model}: {first}") from None
    specials = set(tok.all_special_ids)
    n = min(len(tok), cfg.vocab_size)
    pool = [i for i in range(n) if i not in specials]
    if len(pool) < 2:
        raise BenchError(f"the tokenizer of {model} has no ordinary tokens to build prompts from")
    return pool, max(len(tok), cfg.vocab_size)


def run_config(s: dict, name: str, pool: list, vocab_end: int, target: list, schedule: list, log_dir: Path,
               say: Callable[[str], None], progress) -> tuple[dict, list]:
    """Start the server for one configuration, run the schedule, stop it. (record, results)."""
    cfg = CONFIGS[name]
    rec = {"config": name, "label": cfg.label, "env": cfg.env, "error": None, "server_start_s": None,
           "alive_after": None}
    port = free_port()
    cmd = server_command(s["python"], s["model"], port, max_model_len=s["max_model_len"],
                         max_num_seqs=s["max_num_seqs"], max_num_batched_tokens=s["max_num_batched_tokens"],
                         seed=s["seed"], gpu_memory_utilization=s["gpu_memory_utilization"], extra=s["server_args"])
    rec["command"] = " ".join(shlex.quote(c) for c in cmd)
    log_path = log_dir / f"vllm-{name}.log"
    results: list = []
    task = progress.add_task(f"{name}: starting vLLM", total=len(schedule))
    try:
        with VllmServer(cmd, server_env(cfg), log_path) as srv:
            say(f"{name}: starting the vLLM server on port {port} (log: {log_path})")
            rec["server_start_s"] = round(srv.wait_healthy(s["start_timeout"]), 1)
            loaded = PLUGIN_LOG_LINE in srv.log_text()
            if loaded and name != "onpolicy":
                raise ServerError(f"the onpolicy plugin was loaded by the server of the '{name}' configuration "
                                  f"('{PLUGIN_LOG_LINE}' in {log_path}) although ONPOLICY_VLLM=0")
            if not loaded and name == "onpolicy":
                raise ServerError(f"the onpolicy plugin was not loaded by the server (no '{PLUGIN_LOG_LINE}' in "
                                  f"{log_path}): are onpolicy's vLLM entry points installed in the server's "
                                  "Python, and vLLM logging at INFO?")
            model_name = srv.served_model()
            progress.update(task, description=f"{name}: requests")
            results, probes, wall = asyncio.run(load.run(
                srv.url, model_name, schedule, concurrency=s["concurrency"], request_timeout=s["request_timeout"],
                run_timeout=s["run_timeout"], max_model_len=s["max_model_len"], vocab_end=vocab_end, pool=pool,
                target=target, max_tokens=s["max_tokens"], on_done=lambda: progress.advance(task)))
            rec["alive_after"] = srv.running() and srv.healthy()
            if not rec["alive_after"]:
                rec["error"] = (f"the server was not healthy after the run (log: {log_path})\n"
                                f"last lines of the log:\n{srv.log_tail()}")
    except ServerError as e:
        rec["error"] = str(e)
        progress.update(task, description=f"{name}: failed")
        return rec, results
    progress.update(task, description=f"{name}: done")
    ok = [r for r in results if r.ok]
    rec["requests"] = {"sent": len(results), "ok": len(ok), "failed": len(results) - len(ok),
                       "errors": sorted({r.error for r in results if not r.ok})[:5]}
    rec["target"] = analysis.distinct([r.tokens for r in ok if r.job.kind == "target"])
    rec["seeded"] = (analysis.distinct([r.tokens for r in ok if r.job.kind == "seeded"])
                     if s["seed_check"] else None)
    lat = [r.latency_s * 1000 for r in ok]
    gen = sum(r.completion_tokens for r in ok)
    rec.update(generated_tokens=gen, wall_s=round(wall, 2), throughput_tok_s=round(gen / wall, 1) if wall else None,
               latency_ms={"p50": analysis.percentile(lat, 50), "p99": analysis.percentile(lat, 99)})
    rec["bad_input"] = [vars(p) for p in probes]
    return rec, results


def verdict(rec: dict, seed_check: bool) -> dict:
    """Per configuration: ran cleanly? deterministic? equal to the trainer?"""
    v = {"ran": rec["error"] is None and rec.get("alive_after") is True
         and rec["requests"]["failed"] == 0 and all(p["ok"] for p in rec["bad_input"]),
         "deterministic": None, "logprobs_equal": None}
    if rec["error"] is None:
        v["deterministic"] = (rec["target"]["distinct"] == 1
                              and (not seed_check or (rec["seeded"] or {}).get("distinct") == 1))
        lp = rec.get("logprobs")
        v["logprobs_equal"] = None if lp is None else (lp["compared"] > 0 and lp["equal"] == lp["compared"])
    return v


def _fmt(x, spec="", none="-"):
    return none if x is None else format(x, spec)


def render(doc: dict, console) -> None:
    from rich.table import Table

    st = doc["settings"]
    t = Table(title=f"onpolicy bench determinism: {escape(doc['model'])}\n(target prompt x{st['n']} at T=0"
                    + (f" and x{st['n_seeded']} seeded at T=1" if st["seed_check"] else "")
                    + f", {st['max_tokens']} tokens, {st['n_background']} other requests, "
                      f"concurrency {st['concurrency']})")
    t.add_column("")
    for rec in doc["configs"]:
        t.add_column(rec["config"], justify="right")
    rows = {k: [] for k in ("distinct completions, T=0", "first diverging token", "distinct completions, seeded T=1",
                            "logprobs == trainer (tokens)", "throughput (generated tok/s)", "latency p50 / p99 (ms)",
                            "requests ok", "server start (s)", "server up after")}
    for rec in doc["configs"]:
        if rec["error"] is not None:
            for i, v in enumerate(rows.values()):
                v.append("-" if i else "[red]did not run[/]")
            continue
        gate = rec["config"] == "onpolicy"  # the configuration that must be deterministic and equal

        def mark(good, text):
            return f"[{'green' if good else ('red' if gate else 'yellow')}]{text}[/]"

        tg, sd, lp = rec["target"], rec["seeded"], rec.get("logprobs")
        lat = rec["latency_ms"]
        rows["distinct completions, T=0"].append(mark(tg["distinct"] == 1, f"{tg['distinct']} of {tg['requests']}"))
        rows["first diverging token"].append(_fmt(tg["first_divergence"]))
        rows["distinct completions, seeded T=1"].append(
            "off" if sd is None else mark(sd["distinct"] == 1, f"{sd['distinct']} of {sd['requests']}"))
        rows["logprobs == trainer (tokens)"].append(
            "n/a" if lp is None else mark(lp["compared"] and lp["equal"] == lp["compared"],
                                          f"{lp['equal']}/{lp['compared']}"))
        rows["throughput (generated tok/s)"].append(_fmt(rec["throughput_tok_s"], ".1f"))
        rows["latency p50 / p99 (ms)"].append(f"{_fmt(lat['p50'], '.0f')} / {_fmt(lat['p99'], '.0f')}")
        rq = rec["requests"]
        rows["requests ok"].append(f"[{'green' if not rq['failed'] else 'red'}]{rq['ok']}/{rq['sent']}[/]")
        rows["server start (s)"].append(_fmt(rec["server_start_s"]))
        rows["server up after"].append("yes" if rec["alive_after"] else "[red]no[/]")
    for k, v in rows.items():
        t.add_row(k, *v)
    console.print(t)
    ran = [r for r in doc["configs"] if r["error"] is None]
    if ran:
        b = Table(title="bad input → HTTP status (each sent twice during the load)")
        b.add_column("case")
        for r in ran:
            b.add_column(r["config"], justify="right")
        for case in load.PROBE_CASES:
            row = [case]
            for r in ran:
                got = [p for p in r["bad_input"] if p["case"] == case]
                txt = ", ".join(str(p["status"]) for p in got)
                row.append(f"[{'green' if all(p['ok'] for p in got) else 'red'}]{txt}[/]")
            b.add_row(*row)
        console.print(b)
    for rec in doc["configs"]:
        if rec["error"] is not None:
            console.print(f"[bold red]{rec['config']}:[/] {escape(rec['error'])}", soft_wrap=True)
            continue
        for e in rec["requests"]["errors"]:
            console.print(f"[red]{rec['config']}: failed request:[/] {escape(e)}", soft_wrap=True)
        for p in rec["bad_input"]:
            if not p["ok"]:
                console.print(f"[red]{rec['config']}: {p['case']}: got {p['status']}:[/] {escape(p['message'])}",
                              soft_wrap=True)
        fm = (rec.get("logprobs") or {}).get("first_mismatch")
        if fm:
            console.print(f"{rec['config']}: first logprob mismatch: {fm['kind']} request {fm['request']}, token "
                          f"{fm['token']}: server {fm['server']!r} vs trainer {fm['trainer']!r} "
                          f"(max |Δ| {rec['logprobs']['max_abs_diff']:.3g})")
    for note in doc["settings"]["notes"]:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    console.print(f"[bold {'green' if doc['ok'] else 'red'}]{escape(doc['summary'])}[/]", soft_wrap=True)
