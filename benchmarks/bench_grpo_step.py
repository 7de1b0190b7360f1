"""One GRPO step, phase by phase: onpolicy vs the control (TRL with onpolicy off), CPU or GPU.

    python3 benchmarks/bench_grpo_step.py --config recipes/cpu_demo.yaml [--steps 8] [--warmup 2] [--rounds 2]
    python3 benchmarks/bench_grpo_step.py --config recipes/gpu_qwen3_1p7b.yaml --model DIR [--max_completion_length 1024]
    python3 benchmarks/bench_grpo_step.py table OUT/steps.jsonl

Each run is `recipes/grpo.py`'s trainer (same config, seed, model and data) in a process of its own
(the vLLM plugin, once on, stays on in its process), onpolicy and the control alternately, --rounds
times. Inside a run, TRL's own methods are wrapped to time the phases of every step:

  generation     vLLM sampling (`vllm_generation.generate`)
  weight_sync    the weights pushed into vLLM (`vllm_generation.sync_weights`)
  rewards        the reward functions
  scoring        the trainer's no-grad forward that recomputes the sampled tokens' logprobs (TRL's
                 `old_per_token_logps`, and the reference model's when beta > 0)
  compare_log    onpolicy's comparison of sampler and trainer logprobs, its metrics and the
                 per-token samples written to the run directory
  loss_forward   the forward of the loss (with grad)
  backward       `accelerator.backward`
  optimizer      `optimizer.step`
  other          the rest of the step (TRL's bookkeeping, advantages, data loading, logging)

On a GPU every phase boundary synchronises (so each phase's time is its own), and the host
synchronisations each phase makes are counted with torch.cuda's sync debug mode (ours excluded).
The table gives the median of the steps after --warmup, per phase, onpolicy vs control, with
their ratio; peak GPU memory per run; and the trainer's construction time (the vLLM engine's
start-up included).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PHASES = ["generation", "weight_sync", "rewards", "scoring", "compare_log", "loss_forward", "backward", "optimizer",
          "other"]


class Phases:
    """Wall time and host syncs per phase of the current step (nested phases count for the innermost)."""

    def __init__(self, cuda: bool, profile: str | None = None):
        self.cuda = cuda
        self.profile = profile  # a phase whose Python time cProfile records (over every step)
        self.profiler = None
        if profile:
            import cProfile

            self.profiler = cProfile.Profile()
        self.stack: list = []
        self.time: dict = {}
        self.syncs: dict = {}
        self._own = False

    def _sync(self):
        if self.cuda:
            import torch

            self._own = True
            torch.cuda.synchronize()
            self._own = False

    @contextlib.contextmanager
    def phase(self, name: str):
        self._sync()
        t = time.perf_counter()
        if self.stack:  # the outer phase's clock stops while the inner one runs
            outer, t0 = self.stack[-1]
            self.time[outer] = self.time.get(outer, 0.0) + t - t0
        self.stack.append((name, t))
        prof = self.profiler if name == self.profile else None
        if prof:
            prof.enable()
        try:
            yield
        finally:
            if prof:
                prof.disable()
            self._sync()
            now = time.perf_counter()
            n, t0 = self.stack.pop()
            self.time[n] = self.time.get(n, 0.0) + now - t0
            if self.stack:
                outer, _ = self.stack[-1]
                self.stack[-1] = (outer, now)

    def on_sync_warning(self):
        if not self._own:
            name = self.stack[-1][0] if self.stack else "other"
            self.syncs[name] = self.syncs.get(name, 0) + 1

    def take(self):
        t, s = self.time, self.syncs
        self.time, self.syncs = {}, {}
        return t, s


def wrap(obj, attr: str, phases: Phases, name, when=None):
    """Time obj.attr as phase `name` (a str, or a function of the call giving one or None: not timed)."""
    fn = getattr(obj, attr)

    @functools.wraps(fn)
    def timed(*a, **k):
        n = name(*a, **k) if callable(name) else name
        if n is None:
            return fn(*a, **k)
        with phases.phase(n):
            return fn(*a, **k)

    setattr(obj, attr, timed)


def one(a, extra: list) -> None:
    """One run (this process): build the recipe's trainer, instrument it, train, write a record per step."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(ROOT / "recipes"))
    import grpo as recipe_mod  # recipes/grpo.py
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, TrlParser

    recipe, cfg = TrlParser((recipe_mod.RecipeArgs, GRPOConfig)).parse_args_and_config(
        ["--config", a.config, *extra, "--max_steps", str(a.warmup + a.steps), "--report_to", "none",
         "--logging_steps", "1", "--save_strategy", "no"])
    cuda = torch.cuda.is_available()
    phases = Phases(cuda, a.profile)
    count_syncs = cuda and a.round < a.sync_rounds
    if count_syncs:
        torch.cuda.set_sync_debug_mode("warn")
        show = warnings.showwarning

        def count(message, category, *rest, **kw):
            if "synchronizing" in str(message):
                phases.on_sync_warning()
            else:
                show(message, category, *rest, **kw)

        warnings.showwarning = count
        warnings.filterwarnings("always", message=".*synchronizing.*")
    model = a.model
    cfg.model_init_kwargs = {**(cfg.model_init_kwargs or {}), "dtype": "bfloat16"}
    data = (recipe_mod.arithmetic_dataset(recipe.num_prompts, cfg.seed, recipe.max_operand)
            if recipe.dataset == "arithmetic" else recipe_mod.hub_dataset(recipe.dataset, recipe.dataset_config))
    run_dir = Path(a.out) / f"run_{a.mode}_{a.round}"
    cfg.output_dir = str(run_dir)
    from onpolicy.trl_grpo import OnPolicyGRPOTrainer
    from onpolicy import trl_grpo

    t0 = time.perf_counter()
    trainer = OnPolicyGRPOTrainer(model=model, reward_funcs=recipe_mod.REWARDS[recipe.reward], args=cfg,
                                  train_dataset=data, onpolicy=a.mode, run_dir=str(run_dir), overwrite_run_dir=True)
    build_s = time.perf_counter() - t0

    gen = trainer.vllm_generation
    wrap(gen, "generate", phases, "generation")
    wrap(gen, "sync_weights", phases, "weight_sync")
    wrap(trainer, "_calculate_rewards", phases, "rewards")
    wrap(trainer, "_get_per_token_logps_and_entropies", phases,
         lambda *x, **k: "loss_forward" if torch.is_grad_enabled() else "scoring")
    wrap(trainer.accelerator, "backward", phases, "backward")
    # onpolicy's comparison, metrics and samples: what its _generate_and_score_completions adds to TRL's
    for fn in ("mismatch_metrics", "weights_fingerprint", "_token_samples"):
        wrap(trl_grpo, fn, phases, "compare_log")
    from onpolicy.runlog import RunLog

    wrap(RunLog, "log_step", phases, "compare_log")
    records = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            opt = optimizer if optimizer is not None else trainer.optimizer
            wrap(opt, "step", phases, "optimizer")

        def on_step_begin(self, args, state, control, **kw):
            phases._sync()
            phases.take()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            phases._sync()
            step_s = time.perf_counter() - self.t
            t, s = phases.take()
            t["other"] = step_s - sum(t.values())
            rec = {"mode": a.mode, "round": a.round, "step": state.global_step, "step_s": step_s, "phases": t,
                   "syncs": s, "syncs_counted": count_syncs, "build_s": build_s}
            if cuda:
                free, total = torch.cuda.mem_get_info()
                rec.update(peak_allocated_gb=torch.cuda.max_memory_allocated() / 2**30,
                           device_used_gb=(total - free) / 2**30)
            records.append(rec)

    trainer.add_callback(Timer())
    trainer.train()
    with open(Path(a.out) / "steps.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if phases.profiler:  # where the profiled phase's host time goes (top functions, cumulative and own time)
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(phases.profiler, stream=buf).sort_stats("cumulative").print_stats(30)
        pstats.Stats(phases.profiler, stream=buf).sort_stats("tottime").print_stats(30)
        phases.profiler.dump_stats(str(Path(a.out) / f"profile_{a.profile}_{a.mode}_{a.round}.prof"))
        (Path(a.out) / f"profile_{a.profile}_{a.mode}_{a.round}.txt").write_text(buf.getvalue())
    print(f"RUN {a.mode} round {a.round}: {len(records)} steps, build {build_s:.1f} s, median step "
          f"{statistics.median(r['step_s'] for r in records[a.warmup:]):.3f} s", flush=True)


def table(path: str, warmup: int) -> str:
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    control = "off" if "off" in modes else modes[-1]
    ours = [m for m in modes if m != control]

    def steps(m, counted=None):
        """A mode's steps after the warm-up; counted=False: the timed ones (from the runs that did not
        count host syncs, where there are such runs: the sync debug mode costs host time), True: the
        runs that counted syncs."""
        rs = [r for r in rows if r["mode"] == m and r["step"] > warmup]
        if counted is None:
            return rs
        picked = [r for r in rs if bool(r.get("syncs_counted")) == counted]
        return picked or rs

    def med(m, key, counted=False):
        v = [key(r) for r in steps(m, counted)]
        return statistics.median(v) if v else float("nan")

    cols = [*ours, control]
    head = "| phase | " + " | ".join(f"{m} s" for m in cols) + " | " + " | ".join(f"{m} / {control}" for m in ours)
    head += " | " + " | ".join(f"{m} host syncs" for m in cols) + " |"
    out = [head, "|" + "---|" * (1 + len(cols) * 2 + len(ours))]
    for p in PHASES + ["step"]:
        key = (lambda r: r["step_s"]) if p == "step" else (lambda r, p=p: r["phases"].get(p, 0.0))
        vals = [med(m, key) for m in cols]
        ratios = [f"{v / vals[-1]:.2f}x" if vals[-1] > 1e-4 else "-" for v in vals[:-1]]
        syncs = [str(round(med(m, lambda r, p=p: sum(r["syncs"].values()) if p == "step" else r["syncs"].get(p, 0),
                               counted=True))) for m in cols]
        name = f"**{p}**" if p == "step" else p
        out.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " | " + " | ".join(ratios) + " | "
                   + " | ".join(syncs) + " |")
    n = {m: len(steps(m, False)) for m in cols}
    out.append(f"\nmedians of {', '.join(f'{m}: {k} steps' for m, k in n.items())} (steps after the first {warmup} "
               f"of each run); trainer construction incl. the vLLM engine: "
               + ", ".join(f"{m} {statistics.median(r['build_s'] for r in rows if r['mode'] == m):.1f} s" for m in cols))
    if any("peak_allocated_gb" in r for r in rows):
        out.append("GPU memory, max over steps: " + ", ".join(
            f"{m}: torch peak {max(r['peak_allocated_gb'] for r in rows if r['mode'] == m):.1f} GiB, device "
            f"{max(r['device_used_gb'] for r in rows if r['mode'] == m):.1f} GiB used" for m in cols))
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("path")
        ap.add_argument("--warmup", type=int, default=2)
        a = ap.parse_args()
        print(table(a.path, a.warmup))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="other flags go to the recipe (GRPOConfig / RecipeArgs), e.g. "
                                        "--max_completion_length 1024")
    ap.add_argument("--config", default=str(ROOT / "recipes" / "cpu_demo.yaml"))
    ap.add_argument("--model", default="tiny", help="a model directory ('tiny': the recipe's tiny model)")
    ap.add_argument("--modes", default="strict,off", help="onpolicy modes, the last one the control")
    ap.add_argument("--steps", type=int, default=8, help="steps timed after the warm-up steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--out", default="/tmp/bench_grpo_step")
    ap.add_argument("--sync-rounds", type=int, default=1,
                    help="GPU: the first N rounds count host syncs (torch.cuda sync debug mode, which costs host "
                         "time); the times come from the other rounds where there are any")
    ap.add_argument("--profile", choices=PHASES, help="cProfile this phase in every run (OUT/profile_PHASE_MODE_ROUND"
                    ".txt, and .prof for pstats / snakeviz); its times then include the profiler's cost, so use it in a run "
                    "of its own")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # a child: one run
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    a, extra = ap.parse_known_args()
    if a.mode:
        one(a, extra)
        return
    os.makedirs(a.out, exist_ok=True)
    (Path(a.out) / "steps.jsonl").unlink(missing_ok=True)
    model = a.model
    if model == "tiny":  # built once, before the runs (the recipe's warm-up), so no run pays for it
        sys.path.insert(0, str(ROOT / "recipes"))
        import yaml

        import grpo as recipe_mod

        c = yaml.safe_load(open(a.config))
        model = recipe_mod.tiny_model(Path(a.out) / "tiny-model", c.get("family", "qwen3"),
                                      c.get("sft_warmup_steps", 0), c.get("seed", 0), c.get("sft_error_rate", 0.3),
                                      c.get("max_operand", 9))
    env = {k: v for k, v in os.environ.items() if k != "ONPOLICY_VLLM"}
    for r in range(a.rounds):
        for m in a.modes.split(","):
            cmd = [sys.executable, __file__, "--config", a.config, "--model", model, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--out", a.out, "--mode", m, "--round", str(r),
                   "--sync-rounds", str(a.sync_rounds), *(["--profile", a.profile] if a.profile else []), *extra]
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RUN ")]
            print(line[-1] if line else f"RUN {m} round {r}: failed (exit {p.returncode})\n{p.stdout[-3000:]}",
                  flush=True)
    print(table(str(Path(a.out) / "steps.jsonl"), a.warmup))


if __name__ == "__main__":
    main()
