"""vLLM adapter on the GPU machine (issue 5): bitwise acceptance and throughput, real vLLM 0.26.

    python benchmarks/bench_vllm.py make MODEL_DIR [--family qwen3|qwen2|llama] [--layers N]
    python benchmarks/bench_vllm.py accept MODEL_DIR           # plugin on: sampler vs trainer, batch invariance
    python benchmarks/bench_vllm.py throughput MODEL_DIR CONF [NxT,...]  # CONF: default | batch_invariant | onpolicy;
                                                                  # NxT: prompts x tokens, default 1000x100
    python benchmarks/bench_vllm.py profile MODEL_DIR CONF [NxT]    # top GPU kernels under torch.profiler
    python benchmarks/bench_vllm.py hostprofile MODEL_DIR CONF [NxT] # host (Python) time by function, cProfile
    python benchmarks/bench_vllm.py steptimes MODEL_DIR CONF [NxT]   # host time per step in the runner's calls
    python benchmarks/bench_vllm.py timeline MODEL_DIR CONF [NxT]    # GPU idle gaps, blocking calls, host ops in gaps
    python benchmarks/bench_vllm.py startup MODEL_DIR CONF          # LLM(...) to the first token, this process

`accept` samples 64 prompts x 32 tokens at T=1.0 and T=0.7 with the onpolicy
plugin (CUDA graphs and torch.compile as vLLM defaults them), recomputes every
sampled token's logprob with `onpolicy.token_logprobs` on the transformers model,
and counts bitwise-equal tokens; then a seeded prompt alone vs inside batches
of 7 and 64. `throughput` runs 1000 prompts x 100 tokens in one engine and
prints tokens/s (run each configuration in its own process).
"""
from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

SHAPES = {  # (hidden, intermediate, heads, kv heads, head_dim, vocab)
    "qwen3": (2048, 6144, 16, 8, 128, 151936),  # Qwen3-1.7B
    "qwen2": (1536, 8960, 12, 2, 128, 151936),  # Qwen2.5-1.5B
    "llama": (2048, 8192, 32, 8, 64, 128256),  # Llama-3.2-1B
}


def make(path: str, family: str = "qwen3", layers: int = 28, tied: bool = False, head_scale: float = 8.0):
    """A model of `family`'s shape with random bf16 weights; the LM head scaled by `head_scale` for
    sharper logits (a mismatch shows in the sampled tokens) -- unless `tied`, where that would scale
    the input embeddings too (and make the model degenerate)."""
    import torch

    from onpolicy.tiny import make_tokenizer

    h, i, nh, kvh, hd, v = SHAPES[family]
    if family == "qwen3":
        from transformers import Qwen3Config as C, Qwen3ForCausalLM as M
    elif family == "qwen2":
        from transformers import Qwen2Config as C, Qwen2ForCausalLM as M
    else:
        from transformers import LlamaConfig as C, LlamaForCausalLM as M
    kw = dict(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=layers, num_attention_heads=nh,
              num_key_value_heads=kvh, head_dim=hd, max_position_embeddings=4096, tie_word_embeddings=tied,
              bos_token_id=3, eos_token_id=1, pad_token_id=2)
    if family == "llama":
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = M(C(**kw)).to(torch.bfloat16)
        if not tied:
            with torch.no_grad():
                m.lm_head.weight.mul_(head_scale)
    m.save_pretrained(path)
    make_tokenizer(v).save_pretrained(path)
    print(f"made {family} model ({layers} layers) at {path}", flush=True)


def prompts(n: int, vocab: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    return [[3] + [rng.randrange(100, vocab) for _ in range(rng.randint(8, 48))] for _ in range(n)]


def vocab_of(path: str) -> int:
    """Prompt token ids stay below the model's vocabulary (150000 for the Qwen3 shape)."""
    import json

    with open(os.path.join(path, "config.json")) as f:
        return min(150000, json.load(f)["vocab_size"])


def accept(path: str):
    import torch

    import onpolicy
    import onpolicy.vllm_plugin as plugin
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    plugin.enable()
    llm = LLM(model=path, dtype="bfloat16", max_model_len=1024, seed=0, logprobs_mode="processed_logprobs",
              gpu_memory_utilization=0.4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    vocab = hf.config.vocab_size
    ps = prompts(64, vocab)
    for T in (1.0, 0.7):
        sp = [SamplingParams(temperature=T, max_tokens=32, logprobs=0, seed=100 + i, ignore_eos=True)
              for i in range(len(ps))]
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        eq = tot = 0
        dmax = 0.0
        for p, o in zip(ps, outs):
            c = o.outputs[0]
            ids = torch.tensor([p + list(c.token_ids)], device="cuda")
            with torch.no_grad():
                tl = onpolicy.token_logprobs(hf, ids, temperature=T, logits_to_keep=len(c.token_ids))[0].cpu()
            sl = torch.tensor([c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)])
            eq += int((sl == tl).sum())
            tot += sl.numel()
            dmax = max(dmax, float((sl - tl).abs().max()))
        print(f"T={T}: {eq}/{tot} sampled tokens bitwise equal (max |dlogp| {dmax:.3g})", flush=True)
    sp = SamplingParams(temperature=1.0, max_tokens=32, logprobs=0, seed=7, ignore_eos=True)
    target = ps[5]
    alone = llm.generate([{"prompt_token_ids": target}], sp, use_tqdm=False)[0].outputs[0]
    for n in (7, 64):
        batch = ps[:n]
        batch[n // 2] = target
        params = [SamplingParams(temperature=1.0, max_tokens=32, logprobs=0, seed=1000 + i, ignore_eos=True)
                  for i in range(n)]
        params[n // 2] = sp
        got = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)[n // 2].outputs[0]
        same_lp = [alone.logprobs[k][t].logprob for k, t in enumerate(alone.token_ids)] == \
                  [got.logprobs[k][t].logprob for k, t in enumerate(got.token_ids)]
        print(f"seeded prompt alone vs inside a batch of {n}: identical completion "
              f"{list(alone.token_ids) == list(got.token_ids)}, identical logprobs {same_lp}", flush=True)


def engine(path: str, conf: str, max_tokens: int):
    """An in-process engine in configuration `conf` (default | batch_invariant | onpolicy)."""
    if conf == "batch_invariant":
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    elif conf == "onpolicy":
        import onpolicy.vllm_plugin as plugin

        plugin.enable()
    elif conf != "default":
        raise SystemExit(f"unknown configuration {conf!r}: default | batch_invariant | onpolicy")
    from vllm import LLM

    return LLM(model=path, dtype="bfloat16", max_model_len=max(1024, max_tokens + 64), seed=0,
               gpu_memory_utilization=float(os.environ.get("BENCH_MEMORY_UTILIZATION", "0.6")))  # CPU: 0.3


def startup(path: str, conf: str):
    """Engine start-up as a user meets it: from `LLM(...)` to the first generated token (one prompt,
    one token), this process only -- run each configuration in a process of its own, alternately;
    the first start after a machine's boot also fills vLLM's compile cache."""
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = engine(path, conf, 16)
    t1 = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompts(1, vocab_of(path), seed=3)[0]}],
                 SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    t2 = time.perf_counter()
    print(f"STARTUP {conf}: LLM() {t1 - t0:.1f} s, first token {t2 - t0:.1f} s", flush=True)


def throughput(path: str, conf: str, loads: str = "1000x100"):
    """One engine for `conf`; each load in `loads` ("NxT,NxT...": prompts x tokens) timed in turn."""
    from vllm import SamplingParams

    shapes = [tuple(int(x) for x in load.split("x")) for load in loads.split(",")]
    llm = engine(path, conf, max(t for _, t in shapes))
    # Warm-up at each load's batch size (other prompts, 16 tokens): the Triton kernels compile
    # once per tile configuration and M specialization, on first use; vLLM's JIT monitor showed
    # onpolicy's linear kernels compiling inside a timed run warmed up with 32 prompts only.
    warm = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    vocab = vocab_of(path)
    for n_prompts, _ in shapes:
        llm.generate([{"prompt_token_ids": p} for p in prompts(n_prompts, vocab, seed=2)], warm, use_tqdm=False)
    for n_prompts, n_tokens in shapes:
        ps = prompts(n_prompts, vocab, seed=1)
        sp = SamplingParams(temperature=1.0, max_tokens=n_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"THROUGHPUT {conf} {n_prompts}x{n_tokens}: {n / dt:.0f} tok/s ({n} tokens in {dt:.1f} s)", flush=True)
    if conf == "onpolicy":
        from onpolicy.vllm_plugin.worker import decode_graph_stats

        print(f"DECODE GRAPHS {conf}: {llm.collective_rpc(decode_graph_stats)}", flush=True)
        print(f"LINEAR CHOICES {conf}: {llm.collective_rpc(linear_choices)}", flush=True)


def linear_choices(_worker=None) -> dict:
    """{(N, K): {M bucket: what runs}} for every bucket the Hopper linear chooser tuned in this process:
    "T" the Triton kernel, else the cuBLASLt algorithm's "tile/stages/cluster"."""
    from onpolicy_kernels.ops.linear import chooser as linear_choice

    ch = linear_choice._CHOOSER
    out: dict = {}
    for k, c in sorted((ch.buckets if ch is not None else {}).items(), key=lambda kv: kv[0][2:]):
        lab = c.label
        if lab.startswith("cuBLASLt"):
            f = lab.split()
            lab = f"{f[2]}/{f[4]}/{f[6]}"
        else:
            lab = "T"
        out.setdefault(f"{k[2]}x{k[3]}", {})[k[4]] = lab
    return out


def profile(path: str, conf: str, load: str = "256x128"):
    """Where the GPU time goes: torch.profiler over one load, top kernels by GPU time."""
    import torch
    from vllm import SamplingParams

    n_prompts, n_tokens = (int(x) for x in load.split("x"))
    llm = engine(path, conf, n_tokens)
    ps = prompts(n_prompts, vocab_of(path), seed=1)
    sp = SamplingParams(temperature=1.0, max_tokens=n_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in ps[:32]], sp, use_tqdm=False)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        dt = time.perf_counter() - t0
    print(f"PROFILE {conf} {load}: {n_prompts * n_tokens / dt:.0f} tok/s under the profiler", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70),
          flush=True)


def warm_engine(path: str, conf: str, load: str):
    """(engine, run): an engine for `conf`, warmed up on other prompts of the load's batch size
    (16 tokens each), and `run()` generating the load itself (prompts x tokens, "NxT")."""
    from vllm import SamplingParams

    n_prompts, n_tokens = (int(x) for x in load.split("x"))
    llm = engine(path, conf, n_tokens)
    vocab = vocab_of(path)
    llm.generate([{"prompt_token_ids": p} for p in prompts(n_prompts, vocab, seed=2)],
                 SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    inputs = [{"prompt_token_ids": p} for p in prompts(n_prompts, vocab, seed=1)]
    sp = SamplingParams(temperature=1.0, max_tokens=n_tokens, ignore_eos=True)
    return llm, lambda: llm.generate(inputs, sp, use_tqdm=False)


def hostprofile(path: str, conf: str, load: str = "256x128", top: int = 35):
    """Where the host's time goes: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0),
    so when the GPU waits on Python, the functions with the most own time say why. cProfile adds
    its own overhead, so compare configurations with each other, not with `throughput`."""
    import cProfile
    import pstats

    n_prompts, n_tokens = (int(x) for x in load.split("x"))
    llm, run = warm_engine(path, conf, load)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    dt = time.perf_counter() - t0
    print(f"HOSTPROFILE {conf} {load}: {n_prompts * n_tokens / dt:.0f} tok/s under cProfile, {dt:.2f} s", flush=True)
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def steptimes(path: str, conf: str, load: str = "256x128"):
    """Host wall time per engine step spent inside the model runner's `execute_model` and
    `sample_tokens` (V2; `execute_model` alone on V1), against the step's total. If the runner's
    calls take about the whole step, the host (or a sync inside them) sets the pace; if they are
    short and the step is long, the time goes elsewhere (scheduler, output processing, waiting
    for the GPU in the async output copy). Compare configurations on one machine."""
    from collections import defaultdict

    from onpolicy.vllm_plugin import compat

    n_prompts, n_tokens = (int(x) for x in load.split("x"))
    llm, run = warm_engine(path, conf, load)
    runner = compat.engine_runner(llm)
    if runner is None:
        raise SystemExit("steptimes needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    totals, counts = defaultdict(float), defaultdict(int)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t0
                counts[name] += 1
        return wrapper

    for name in ("execute_model", "sample_tokens"):
        if hasattr(runner, name):
            setattr(runner, name, timed(name, getattr(runner, name)))
    llm.llm_engine.step = timed("engine step", llm.llm_engine.step)
    t0 = time.perf_counter()
    run()
    dt = time.perf_counter() - t0
    print(f"STEPTIMES {conf} {load}: {n_prompts * n_tokens / dt:.0f} tok/s, {dt:.2f} s", flush=True)
    for name in totals:
        print(f"  {name:14s} {counts[name]:6d} calls  {totals[name] * 1e3 / max(counts[name], 1):8.3f} ms per call  "
              f"{totals[name]:7.2f} s in all", flush=True)


def timeline(path: str, conf: str, load: str = "256x128", top: int = 15):
    """Is the GPU waiting on the host? torch.profiler over one load (in-process engine), then from
    its trace: the GPU's busy time (union of kernels and copies) against the wall time, its idle
    gaps by size and by the kernels around them, GPU time by kernel, host ops by time, the CUDA
    calls that block the host (synchronize, blocking copies), the host ops running while the GPU
    sat idle for over 200 us (weighted by the overlap), and one decode step laid out (from one
    graph launch to the next: with FULL decode graphs, one step)."""
    import json
    import tempfile

    import torch

    from onpolicy.vllm_plugin import compat

    n_prompts, n_tokens = (int(x) for x in load.split("x"))
    llm, run = warm_engine(path, conf, load)
    if compat.engine_runner(llm) is None:  # the profiler sees this process only
        raise SystemExit("timeline needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    print(f"TIMELINE {conf} {load}: {n_prompts * n_tokens / dt:.0f} tok/s under the profiler, {dt:.2f} s", flush=True)
    print_timeline(events, top)


def print_timeline(events: list, top: int = 15) -> None:
    """`timeline`'s analysis of chrome-trace "X" events (ts, dur in us)."""
    import bisect
    from collections import defaultdict

    def span(e):
        return float(e["ts"]), float(e["ts"]) + float(e["dur"])

    def short(name, n=48):
        return name if len(name) <= n else name[: n - 3] + "..."

    kernels = sorted((span(e) + (e.get("name", ""),) for e in events
                      if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda k: k[0])
    host = sorted((span(e) + (e.get("cat", ""), e.get("name", "")) for e in events
                   if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")),
                  key=lambda h: h[0])
    print(f"  {len(kernels)} GPU events")
    merged = []  # [start, end, first kernel, last kernel to end]
    for a, b, name in kernels:
        if merged and a <= merged[-1][1]:
            if b >= merged[-1][1]:
                merged[-1][1], merged[-1][3] = b, name
        else:
            merged.append([a, b, name, name])
    gaps = [(merged[i][1], merged[i + 1][0], merged[i][3], merged[i + 1][2]) for i in range(len(merged) - 1)]
    if merged:
        total = merged[-1][1] - merged[0][0]
        busy = sum(m[1] - m[0] for m in merged)
        print(f"  GPU busy {busy / 1e3:.1f} ms of a {total / 1e3:.1f} ms span ({100 * busy / max(total, 1e-9):.0f}%)")
        edges = (0, 20, 100, 1000, 10000, float("inf"))
        for lo, hi in zip(edges, edges[1:]):
            sel = [g[1] - g[0] for g in gaps if lo <= g[1] - g[0] < hi]
            print(f"  idle gaps {lo:>6}-{hi:<6} us: {len(sel):7d}, {sum(sel) / 1e3:9.1f} ms")
    def table(title, items, rows, fmt="    {key:60s} {n:7d} {total:9.1f}"):
        """Print (count, total ms) per key of `items` ((key, us) pairs), largest total first."""
        tally = defaultdict(lambda: [0, 0.0])
        for key, us in items:
            tally[key][0] += 1
            tally[key][1] += us
        print(f"  {title}:")
        for key, (n, d) in sorted(tally.items(), key=lambda kv: -kv[1][1])[:rows]:
            print(fmt.format(key=key, n=n, total=d / 1e3))

    table("GPU time by kernel (count, total ms)", ((short(name, 60), b - a) for a, b, name in kernels), top)
    table("idle gaps over 200 us by the kernels around them (count, total ms, last before -> first after)",
          (((short(before), short(after)), b - a) for a, b, before, after in gaps if b - a > 200), top,
          fmt="    {n:6d} {total:8.1f}  {key[0]} -> {key[1]}")
    table("host ops over the whole run by total time (count, total ms)",
          ((short(name, 60), b - a) for a, b, cat, name in host if cat != "user_annotation"), top * 2)
    table("blocking CUDA calls, the host waiting on the GPU (count, total ms)",
          ((name, b - a) for a, b, cat, name in host if cat in ("cuda_runtime", "cuda_driver") and (
              "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2", "cudaMemcpy2D"))), top)
    big = [g for g in gaps if g[1] - g[0] > 200]
    if big:
        during = defaultdict(float)
        starts = [g[0] for g in big]
        for a, b, cat, name in host:
            i = max(bisect.bisect_right(starts, a) - 1, 0)
            while i < len(big) and big[i][0] < b:
                lap = min(b, big[i][1]) - max(a, big[i][0])
                if lap > 0:
                    during[f"{cat}: {short(name, 60)}"] += lap
                i += 1
        print(f"  host ops during the {len(big)} GPU idle gaps over 200 us ({sum(g[1] - g[0] for g in big) / 1e3:.1f} "
              "ms; nested ops each count):")
        for name, d in sorted(during.items(), key=lambda kv: -kv[1])[:top * 2]:
            print(f"    {d / 1e3:9.1f} ms  {name}")
    launches = [h for h in host if h[3] == "cudaGraphLaunch"]
    if len(launches) >= 3:  # one step in the middle: graph launch to graph launch
        lo, hi = launches[len(launches) // 2][0], launches[len(launches) // 2 + 1][0]
        print(f"  one step, {(hi - lo) / 1e3:.2f} ms from a graph launch to the next (us from its start):")
        rows = [(g[0], f"GPU idle {g[1] - g[0]:7.0f} us  {short(g[2], 40)} -> {short(g[3], 40)}")
                for g in gaps if lo <= g[0] < hi and g[1] - g[0] > 30]
        rows += [(a, f"host {b - a:7.0f} us  {cat}: {short(name, 60)}") for a, b, cat, name in host
                 if lo <= a < hi and b - a > 30]
        for t, text in sorted(rows)[:60]:
            print(f"    {t - lo:8.0f}  {text}")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        args = sys.argv[2:]
        fam = args[args.index("--family") + 1] if "--family" in args else "qwen3"
        layers = int(args[args.index("--layers") + 1]) if "--layers" in args else 28
        make(args[0], fam, layers)
    elif cmd == "accept":
        accept(sys.argv[2])
    elif cmd == "hostprofile":
        hostprofile(*sys.argv[2:5])
    elif cmd == "timeline":
        timeline(*sys.argv[2:5])
    elif cmd == "steptimes":
        steptimes(*sys.argv[2:5])
    elif cmd == "throughput":
        throughput(*sys.argv[2:5])
    elif cmd == "profile":
        profile(*sys.argv[2:5])
    elif cmd == "startup":
        startup(*sys.argv[2:4])
    else:
        raise SystemExit(__doc__)
