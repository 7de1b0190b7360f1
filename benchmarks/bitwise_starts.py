"""Bitwise across cold engine starts: `onpolicy check --cuda-graphs` as a stress test (GPU).

One engine start = one fresh process with an empty vLLM compile cache (its own
VLLM_CACHE_ROOT), vLLM's CUDA graphs and torch.compile on, the plugin on; it samples
P prompts x T tokens at each temperature and the patched trainer recomputes every
sampled token's logprob in the same process. A start passes when every token is
bitwise equal (torch.equal of the fp32 logprobs) at every temperature. Each start
also records what the engine ran: the linear chooser's pick per (weight shape, M
bucket), the compile counters, the decode graphs' captures and replays.

    python3 benchmarks/bitwise_starts.py make DIR --family llama_tied [--layers 4]
    python3 benchmarks/bitwise_starts.py run --model qwen3=DIR1 --model llama_tied=DIR2 \
        --configs shipped,cublaslt_off,graphs_off,off --starts 10 --parallel 4 --out OUT
    python3 benchmarks/bitwise_starts.py table OUT/starts.jsonl

Configurations (`--configs shipped:10,cublaslt_off:3,off`): shipped (defaults), cublaslt_off (ONPOLICY_LINEAR_CUBLASLT=0),
graphs_off (ONPOLICY_DECODE_GRAPHS=0), picks_timed (ONPOLICY_LINEAR_CACHE=0: every start
times its own linear picks, as before the picks were stored), off (plugin off, unpatched trainer: the control,
which must fail). Starts run `--parallel` at a time on one GPU (each engine gets a fixed
KV-cache size and a small memory share, so concurrent starts cannot upset vLLM's
memory profiling); concurrency only perturbs timing, never a kernel's bits.
Non-degeneracy is recorded per start: distinct completions and the mean logprob.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "shipped": {},
    "cublaslt_off": {"ONPOLICY_LINEAR_CUBLASLT": "0"},
    "graphs_off": {"ONPOLICY_DECODE_GRAPHS": "0"},
    "picks_timed": {"ONPOLICY_LINEAR_CACHE": "0"},  # no stored picks: each start times its own
    "off": {},
}
FAMILIES = {  # name: (bench_vllm.py's shape, tied embeddings)
    "qwen3": ("qwen3", False),  # Qwen3-1.7B
    "llama_tied": ("llama", True),  # Llama-3.2-1B (tied embeddings, llama3 RoPE)
    "qwen2": ("qwen2", False),  # Qwen2.5-1.5B (q/k/v bias)
}


def make(path: str, family: str, layers: int) -> None:
    """bench_vllm.make at `family`'s shape (untied heads scaled x4, as the stress runs used)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_vllm import make as make_model

    base, tied = FAMILIES[family]
    make_model(path, base, layers, tied=tied, head_scale=4.0)


def one(a) -> dict:
    """One engine start (this process): sample at each temperature, recompute, compare."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    from onpolicy import check as chk

    plugin = a.config != "off"
    if plugin:
        from onpolicy import vllm_plugin

        vllm_plugin.enable()
    from vllm import LLM

    t0 = time.time()
    kw = dict(model=a.model, dtype="auto", max_model_len=512, seed=a.seed, enforce_eager=False,
              logprobs_mode="processed_logprobs")
    if torch.cuda.is_available():
        # A fixed KV cache and a share of the GPU small enough that `--parallel` engines fit at once
        # (vLLM refuses to start when less than its share is free).
        kw.update(kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=a.gpu_share)
    else:
        kw["gpu_memory_utilization"] = 0.3
    llm = LLM(**kw)
    engine_s = time.time() - t0
    cfg = chk.validate_model(a.model)
    prompts = chk.load_prompts(None, a.prompts, min(cfg.vocab_size, 150000), a.seed)
    trainer = chk.load_trainer(a.model, patch=plugin)
    res = {"config": a.config, "model": a.label, "engine_s": round(engine_s, 1), "temps": {}}
    for temp in [float(t) for t in a.temperatures.split(",")]:
        comps, slps = chk.sample(llm, prompts, a.max_tokens, temp, a.seed)
        tl = [chk.trainer_logprobs(trainer, p, c, temp, plugin) for p, c in zip(prompts, comps)]
        m, firsts = chk.compare(slps, tl)
        firsts = [f for f in firsts if f is not None]
        S = torch.tensor([x for s in slps for x in s])
        res["temps"][str(temp)] = {
            "tokens": m["tokens"], "equal": round(m["bitwise_equal_frac"] * m["tokens"]),
            "max_abs": m["logp_abs_diff_max"], "seqs_bad": len(firsts), "bad_at_token0": firsts.count(0),
            "distinct_completions": len({tuple(c) for c in comps}), "mean_logp": float(S.mean())}
    res["engine"] = engine_report(llm)
    return res


def engine_report(llm) -> dict:
    """What the engine ran (its one worker): linear picks, compile cache, decode graphs."""
    from onpolicy.vllm_plugin.diagnostics import engine_report as rep

    r = rep(llm)[0]
    r["linear_cublaslt_buckets"] = sum(v.startswith("cuBLASLt") for v in r["linear"]["picks"].values())
    return r


def run(a) -> None:
    os.makedirs(a.out, exist_ok=True)
    jobs = []
    for spec in a.model:
        label, path = spec.split("=", 1)
        for spec_c in a.configs.split(","):
            conf, _, n = spec_c.partition(":")
            n = int(n) if n else (1 if conf == "off" else a.starts)
            jobs += [(label, path, conf, i) for i in range(n)]
    # Interleave configurations and models so that a machine's drift hits them alike.
    jobs.sort(key=lambda j: (j[3], j[2], j[0]))
    results = os.path.join(a.out, "starts.jsonl")
    running: list = []
    t_all = time.time()

    def reap(block: bool) -> None:
        for p in list(running):
            proc, job, log, cache, t = p
            if proc.poll() is None and not block:
                continue
            proc.wait()
            running.remove(p)
            text = open(log).read()
            lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            rec = json.loads(lines[-1][7:]) if lines else {"config": job[2], "model": job[0],
                                                           "error": text[-1500:]}
            rec.update(start=job[3], exit=proc.returncode, wall_s=round(time.time() - t, 1))
            subprocess.run(["rm", "-rf", cache])
            temps = rec.get("temps", {})
            if temps and all(v["equal"] == v["tokens"] for v in temps.values()) and job[2] != "off":
                os.remove(log)  # a passing start's log says nothing the record does not; failures keep theirs
            with open(results, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(summary_line(rec), flush=True)
            block = False

    for job in jobs:
        if time.time() - t_all > a.budget_s:
            print(f"budget of {a.budget_s} s reached: {len(jobs) - jobs.index(job)} starts not made", flush=True)
            break
        while len(running) >= a.parallel:
            reap(block=False)
            if len(running) >= a.parallel:
                time.sleep(1)
        label, path, conf, i = job
        # Empty vLLM and Triton caches: every start compiles afresh, as a new machine's first run does.
        cache = tempfile.mkdtemp(prefix="vllm-cache-")
        env = dict(os.environ, VLLM_CACHE_ROOT=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"), **CONFIGS[conf])
        log = os.path.join(a.out, f"{label}_{conf}_{i}.log")
        cmd = [sys.executable, __file__, "one", "--model", path, "--label", label, "--config", conf,
               "--prompts", a.prompts.split(",")[i % len(a.prompts.split(","))], "--max-tokens", str(a.max_tokens),
               "--temperatures", a.temperatures, "--gpu-share", str(round(min(0.2, 0.6 / a.parallel), 3)),
               "--seed", str(a.seed)]
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        running.append((proc, job, log, cache, time.time()))
    while running:
        reap(block=True)
    print(table(results), flush=True)


def summary_line(r: dict) -> str:
    if "temps" not in r:
        return f"START {r['model']} {r['config']} #{r['start']}: ERROR exit {r.get('exit')} {r.get('error', '')[-300:]}"
    parts = [f"T={t}: {v['equal']}/{v['tokens']} ({v['seqs_bad']} seqs bad, {v['bad_at_token0']} at token 0; "
             f"{v['distinct_completions']} distinct, mean logp {v['mean_logp']:.2f})" for t, v in r["temps"].items()]
    e = r.get("engine", {})
    return (f"START {r['model']} {r['config']} #{r['start']}: " + "; ".join(parts)
            + f"; engine {r['engine_s']} s; linear picks {e.get('linear', {}).get('digest')} "
              f"({e.get('linear_cublaslt_buckets')} cuBLASLt buckets); compile: {e.get('compile', {}).get('state')}; "
              f"decode graphs {json.dumps({k: v.get('replays') for k, v in e.get('decode_graphs', {}).items()})}")


def table(path: str) -> str:
    """Per model and configuration: starts, those below 100%, tokens, and how many (weight shape, M
    bucket) keys the linear chooser picked differently in different starts."""
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    agg: dict = collections.OrderedDict()
    for r in rows:
        k = (r["model"], r["config"])
        a = agg.setdefault(k, {"starts": 0, "errors": 0, "below": 0, "tokens": 0, "equal": 0,
                               "picks": collections.defaultdict(set)})
        if "temps" not in r:
            a["errors"] += 1  # an engine that did not start (reported apart: no tokens compared)
            continue
        a["starts"] += 1
        tok = sum(v["tokens"] for v in r["temps"].values())
        eq = sum(v["equal"] for v in r["temps"].values())
        a["tokens"] += tok
        a["equal"] += eq
        a["below"] += eq < tok
        for key, label in r.get("engine", {}).get("linear", {}).get("picks", {}).items():
            a["picks"][key].add(label)
    out = ["| model | configuration | starts | starts below 100% | tokens bitwise | linear keys picked "
           "differently between starts | engines that did not start |", "|---|---|---|---|---|---|---|"]
    for (m, c), a in agg.items():
        differ = sum(len(v) > 1 for v in a["picks"].values())
        out.append(f"| {m} | {c} | {a['starts']} | {a['below']} | {a['equal']}/{a['tokens']} | "
                   f"{differ} of {len(a['picks'])} | {a['errors']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("path")
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--layers", type=int, default=4)
    p = sub.add_parser("one")
    p.add_argument("--model", required=True)
    p.add_argument("--label", default="model")
    p.add_argument("--config", choices=sorted(CONFIGS), default="shipped")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperatures", default="1.0,0.7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-share", type=float, default=0.2, help="vLLM's gpu_memory_utilization (run: 0.6 / parallel)")
    p = sub.add_parser("run")
    p.add_argument("--model", action="append", required=True, help="LABEL=DIR (repeat)")
    p.add_argument("--configs", default="shipped,off", help="NAME[:STARTS],... (off: 1 start unless given)")
    p.add_argument("--starts", type=int, default=10)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--prompts", default="16,64", help="prompts per start, cycled over the starts (batch shapes)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperatures", default="1.0,0.7")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new engine after this many seconds")
    p.add_argument("--out", required=True)
    p = sub.add_parser("table")
    p.add_argument("path")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.path, a.family, a.layers)
    elif a.cmd == "one":
        print("RESULT " + json.dumps(one(a)), flush=True)
    elif a.cmd == "run":
        run(a)
    else:
        print(table(a.path))


if __name__ == "__main__":
    main()
