"""Trainer side on the GPU at a Qwen3-1.7B-like shape (issue 4): bitwise properties + step time/memory.

    python benchmarks/bench_trainer.py [--layers 28] [--batch 8] [--seq 512] [--profile] [--skip-checks]
                                     [--routes triton,fa3]

Checks (torch.equal): one full-sequence forward == prefill + token-by-token
decode with a KV cache; a sequence alone == in a padded batch == in a packed
batch. Then times a training step (forward + backward of the token logprobs of
a padded batch) of the patched vs the unpatched model (transformers' SDPA),
interleaved step by step in one process (--rounds each), and prints the median
times, the fastest/slowest step and peak memory, with their ratios. --routes
times the patched model once per attention route (ONPOLICY_ATTENTION), all
interleaved in the same rounds.
--profile adds, for one step of each, the GPU kernels that take the most time.
--timeline adds, for one step of each: the GPU's busy time against the step's span, its
idle gaps and what the host did meanwhile (bench_vllm.py's analysis), the host time to
enqueue the forward and the backward (no sync), and the host syncs the patched step makes
(torch.cuda sync debug mode) with the line of ours that made each.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

import torch


def build(layers: int, family: str = "qwen3"):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    return m


def check_bitwise(model, seq: int):
    import onpolicy
    import onpolicy_kernels as K
    from transformers import DynamicCache

    g = torch.Generator(device="cuda").manual_seed(1)
    lens = [seq // 2, seq // 5, seq // 3, seq // 7]
    seqs = [torch.randint(10, 150000, (n,), device="cuda", generator=g) for n in lens]
    onpolicy.patch_model(model)
    res = {}
    with torch.no_grad():
        alone = [onpolicy.token_logprobs(model, s[None])[0] for s in seqs]
        # decode: prefill 8 tokens then one at a time
        s = seqs[1]
        cache = DynamicCache(config=model.config)
        out = model(s[None, :8], past_key_values=cache, use_cache=True).logits[0, -1:]
        dec = []
        for i in range(8, s.numel()):
            dec.append(K.token_logprobs(out, s[i : i + 1]))
            if i + 1 < s.numel():
                out = model(s[None, i : i + 1], past_key_values=cache, use_cache=True).logits[0, -1:]
        res["full forward == decode"] = torch.equal(alone[1][7:], torch.cat(dec))
        L = max(lens)
        ids = torch.full((4, L), 2, device="cuda")
        mask = torch.zeros_like(ids)
        for b, x in enumerate(seqs):
            ids[b, L - len(x):] = x
            mask[b, L - len(x):] = 1
        lp = onpolicy.token_logprobs(model, ids, mask)
        res["alone == left-padded batch"] = all(torch.equal(lp[b, L - len(x):], alone[b]) for b, x in enumerate(seqs))
        packed = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(len(x), device="cuda") for x in seqs])[None]
        lpp = onpolicy.token_logprobs(model, packed, position_ids=pos)[0]
        ok, st = True, 0
        for b, x in enumerate(seqs):
            ok &= torch.equal(lpp[st : st + len(x) - 1], alone[b])
            st += len(x)
        res["alone == packed batch"] = bool(ok)
    onpolicy.unpatch_model(model)
    return res


def forward_loss(model, ids, mask, patched: bool):
    import onpolicy

    if patched:
        lp = onpolicy.token_logprobs(model, ids, mask)
    else:
        logits = model(ids, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()


def step_fn(model, ids, mask, patched: bool):
    loss = forward_loss(model, ids, mask, patched)
    loss.backward()
    return loss


def _timed_step(model, ids, mask, patched):
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step_fn(model, ids, mask, patched)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _set_route(route):
    import os

    if route is None:
        os.environ.pop("ONPOLICY_ATTENTION", None)
    else:
        os.environ["ONPOLICY_ATTENTION"] = route


def bench_steps(model, ids, mask, rounds=10, routes=(None,)):
    """Unpatched and patched steps interleaved (A B A B ..., or A B C ... with several attention
    routes), so that drift of the machine (clocks, other load) hits all alike; returns per
    configuration (median s, all s, peak GiB). Configurations: "unpatched", then one per route
    (None: ONPOLICY_ATTENTION as set, else "triton" / "fa3"; restored afterwards)."""
    import os

    import onpolicy

    before = os.environ.get("ONPOLICY_ATTENTION")
    configs = [("unpatched", False, before)] + [(r or "onpolicy", True, r or before) for r in routes]
    res = {}

    def timed(name, patched, route):
        _set_route(route)
        if patched:
            onpolicy.patch_model(model)
        try:
            return _timed_step(model, ids, mask, patched)
        finally:
            if patched:
                onpolicy.unpatch_model(model)

    try:
        for name, patched, route in configs:  # warm-up step each (compiles, allocator), then the peak-memory step
            timed(name, patched, route)
            torch.cuda.reset_peak_memory_stats()
            timed(name, patched, route)
            res[name] = ([], torch.cuda.max_memory_allocated() / 2**30)
        gc.collect()
        gc.disable()  # no collection inside a timed step (one H200 showed 153-276 ms for the same step)
        for _ in range(rounds):
            for name, patched, route in configs:
                res[name][0].append(timed(name, patched, route))
    finally:
        gc.enable()
        _set_route(before)
    return {name: (sorted(times)[len(times) // 2], times, mem) for name, (times, mem) in res.items()}


def _profiled_step(model, ids, mask, patched):
    """One warm-up step, then one step under torch.profiler (CPU and CUDA); returns the profile."""
    from torch.profiler import ProfilerActivity, profile

    for p in model.parameters():
        p.grad = None
    step_fn(model, ids, mask, patched)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step_fn(model, ids, mask, patched)
        torch.cuda.synchronize()
    return prof


def profile_step(model, ids, mask, patched, top=22):
    prof = _profiled_step(model, ids, mask, patched)
    ev = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith(("aten::", "onpolicy::"))]
    total = sum(e.device_time_total for e in ev)
    print(f"profile ({'onpolicy' if patched else 'unpatched'}): GPU kernel time {total / 1e3:.1f} ms")
    for e in sorted(ev, key=lambda e: -e.device_time_total)[:top]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:110]}")


def timeline_step(model, ids, mask, patched, top=10):
    """One step under torch.profiler, analysed as bench_vllm.py's timeline; then enqueue times."""
    import json
    import os
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_vllm import print_timeline

    prof = _profiled_step(model, ids, mask, patched)
    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    print(f"TIMELINE {'onpolicy' if patched else 'unpatched'} (one step under the profiler)")
    print_timeline(events, top)
    # host time to enqueue forward / backward (no sync in between unless the code makes one)
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = forward_loss(model, ids, mask, patched)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    print(f"  enqueue: forward {1e3 * (t1 - t0):.1f} ms, backward {1e3 * (t2 - t1):.1f} ms, "
          f"then waiting for the GPU {1e3 * (t3 - t2):.1f} ms (step {1e3 * (t3 - t0):.1f} ms)")


def host_profile(model, ids, mask, top=30):
    """cProfile of one patched forward (grad on, the trainer's case): where the host's time goes."""
    import cProfile
    import pstats

    import onpolicy

    onpolicy.patch_model(model)
    try:
        for p in model.parameters():
            p.grad = None
        onpolicy.token_logprobs(model, ids, mask).sum().backward()  # warm
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        lp = onpolicy.token_logprobs(model, ids, mask)
        pr.disable()
        lp.sum().backward()
        torch.cuda.synchronize()
    finally:
        onpolicy.unpatch_model(model)
    print("host profile of one patched forward (cProfile inflates every row; compare rows):")
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)


def count_syncs(model, ids, mask):
    """The host syncs of one patched step, by the innermost line of onpolicy's code that made them."""
    import traceback
    import warnings
    from collections import Counter

    import onpolicy

    for p in model.parameters():
        p.grad = None
    where = Counter()
    onpolicy.patch_model(model)
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            warnings.simplefilter("always")

            def record(message, category, filename, lineno, file=None, line=None):
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "onpolicy" in f.filename or "/kernels/" in f.filename]
                where[f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno} {frames[-1].line}"
                      if frames else "(not in onpolicy)"] += 1

            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step_fn(model, ids, mask, True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    finally:
        onpolicy.unpatch_model(model)
    print(f"host syncs in one patched step: {sum(where.values())}")
    for k, n in where.most_common(12):
        print(f"  {n:4d}  {k[:140]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=10)  # 0: no timing (e.g. with --timeline)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--timeline", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--routes", default="", help="attention routes to time side by side, e.g. triton,fa3 "
                    "(default: one onpolicy column with ONPOLICY_ATTENTION as set)")
    a = ap.parse_args()
    import onpolicy

    model = build(a.layers)
    print(f"model: Qwen3-1.7B shape, {a.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params",
          flush=True)
    if not a.skip_checks:
        for k, v in check_bitwise(model, a.seq).items():
            print(f"bitwise: {k}: {v}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(10, 150000, (a.batch, a.seq), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    for b in range(a.batch):  # ragged left padding like TRL batches
        mask[b, : (b * a.seq) // (4 * a.batch)] = 0
    model.train()
    routes = tuple(a.routes.split(",")) if a.routes else (None,)
    r = bench_steps(model, ids, mask, a.rounds, routes)
    t_ref, ts_ref, m_ref = r.pop("unpatched")
    names = list(r)
    print(f"| training step (fwd+bwd), {a.batch}x{a.seq} tokens | unpatched (SDPA) | "
          + " | ".join(f"{n} | ratio" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    print(f"| time, median of {a.rounds} interleaved steps | {t_ref * 1e3:.1f} ms | "
          + " | ".join(f"{r[n][0] * 1e3:.1f} ms | {r[n][0] / t_ref:.3f}x" for n in names) + " |")
    print(f"| fastest / slowest step | {min(ts_ref) * 1e3:.1f} / {max(ts_ref) * 1e3:.1f} ms | "
          + " | ".join(f"{min(r[n][1]) * 1e3:.1f} / {max(r[n][1]) * 1e3:.1f} ms | "
                       f"{min(r[n][1]) / min(ts_ref):.3f}x (fastest)" for n in names) + " |")
    print(f"| peak memory | {m_ref:.2f} GiB | "
          + " | ".join(f"{r[n][2]:.2f} GiB | {r[n][2] / m_ref:.3f}x" for n in names) + " |")
    for n in ["unpatched"] + names:
        ts = ts_ref if n == "unpatched" else r[n][1]
        print(f"steps, {n} (ms, in order): " + " ".join(f"{t * 1e3:.0f}" for t in ts))
    print(f"device: {torch.cuda.get_device_name()}")
    if a.profile:
        profile_step(model, ids, mask, patched=False)
        onpolicy.patch_model(model)
        profile_step(model, ids, mask, patched=True)
        onpolicy.unpatch_model(model)
    if a.timeline:  # on the first route of --routes
        timeline_step(model, ids, mask, patched=False)
        before = os.environ.get("ONPOLICY_ATTENTION")
        _set_route(routes[0] or before)
        onpolicy.patch_model(model)
        try:
            timeline_step(model, ids, mask, patched=True)
        finally:
            onpolicy.unpatch_model(model)
        try:
            count_syncs(model, ids, mask)
            host_profile(model, ids, mask)
        finally:
            _set_route(before)


if __name__ == "__main__":
    main()
