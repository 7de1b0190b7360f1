"""`onpolicy check` at the Qwen3-1.7B shape on the GPU machine (issue 10), three ways.

    python3 benchmarks/bitwise_check.py MODEL_DIR OUT_DIR [--tp N]

1. plugin on: `onpolicy check --model M --prompts 64 --max-tokens 32 --json` (must be 100%);
2. plugin on, trainer perturbed (layer 13's post-attention norm epsilon) through run_check's
   trainer_hook: the divergence must name layers.13.post_attention_layernorm;
3. plugin off (`--off`): plain vLLM vs plain transformers, the first diverging layer;
4. plugin on with `--cuda-graphs` (the production engine: vLLM's graphs for the model, onpolicy's
   for the LM head and sampler), at temperature 1 and 0.7 (the sampler's two graph kinds).
Each runs in its own process (a vLLM plugin is process-global). Prints one RESULT line each.
With --tp N (2, 4, 8) only (1) runs, at tensor_parallel_size=N. CHECK_RUNS=on,on_graphs (names as in the
RESULT lines) runs only those.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

PERTURB = textwrap.dedent("""
    import json, sys
    from onpolicy.check import run_check, load_trainer
    m = sys.argv[1]
    def perturb(model):
        model.model.layers[13].post_attention_layernorm.variance_epsilon = 1e-2
    r = run_check(m, prompts=16, max_tokens=32, trainer=load_trainer(m, True), trainer_hook=perturb)
    print(json.dumps({"metrics": r.metrics, "divergence": r.divergence, "notes": r.notes}))
""")


def run(name, cmd, out):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    with open(os.path.join(out, f"check_{name}.log"), "w") as f:
        f.write(r.stdout + "\n---- stderr\n" + r.stderr)
    graphs = [ln.split("onpolicy: ", 1)[-1] for ln in (r.stdout + r.stderr).splitlines()
              if "LM head and sampler" in ln or "CUDA graphs of the" in ln]
    last = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    res = json.loads(last[-1]) if last else {"error": r.stderr[-2000:]}
    m, d = res.get("metrics", {}), res.get("divergence")
    print(f"RESULT {name}: exit {r.returncode}, {time.time() - t:.0f} s, tokens {m.get('tokens')}, bitwise "
          f"{m.get('bitwise_equal_frac')}, mean |dlogp| {m.get('logp_abs_diff_mean')}, max {m.get('logp_abs_diff_max')}"
          f", divergence {json.dumps(d)}" + (f" ERROR {res['error'][-800:]}" if "error" in res else ""), flush=True)
    for ln in graphs:
        print(f"  {name}: {ln[-160:]}", flush=True)


def main():
    model, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    cli = [sys.executable, "-m", "onpolicy.cli", "check", "--model", model, "--prompts", "64", "--max-tokens", "32",
           "--json"]
    if "--tp" in sys.argv:
        tp = sys.argv[sys.argv.index("--tp") + 1]
        run(f"on_tp{tp}", cli + ["--tp", tp], out)
        return
    runs = {"on": cli, "perturbed": [sys.executable, "-c", PERTURB, model], "off": cli + ["--off"],
            "on_graphs": cli + ["--cuda-graphs"],
            "on_graphs_t07": cli + ["--cuda-graphs", "--temperature", "0.7"]}
    wanted = os.environ.get("CHECK_RUNS", ",".join(runs)).split(",")
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        sys.exit(f"CHECK_RUNS: unknown {unknown}; choose from {','.join(runs)}")
    for name in wanted:
        run(name, runs[name], out)


if __name__ == "__main__":
    main()
