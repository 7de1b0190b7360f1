"""Truly on-policy GRPO: TRL's GRPOTrainer + vLLM (colocated), onpolicy's kernels on both sides.

    accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/grpo.py --config recipes/cpu_demo.yaml

The default config builds a tiny Qwen3 locally, warms it up briefly with SFT on
a synthetic arithmetic task ('a+b=' with digits 0..4) from a sloppy teacher
(most of its answers are one too high), then runs GRPO with the strict reward
(the completion must be a bare number: 1 if right, partial credit by distance),
which trains the teacher's mistake away, so the reward rises over the run.
onpolicy runs in strict mode: every step, vLLM's sampled-token logprobs must
equal the trainer's bitwise, and the step fails otherwise. With `control: true`
a second run with onpolicy off (plain TRL) follows from the same seed, for the
dashboard to compare: `onpolicy dashboard runs/demo/onpolicy runs/demo/control`.
With the control, each run has a process of its own, one after the other (the
vLLM plugin, once on, stays on in its process; and the second run must not share
the GPU with the first's engine and model): this process starts neither engine.

Run directories hold one run each: a re-run into the same --run_dir is refused
unless `--overwrite_run_dir true` (the earlier records are removed) or
`--resume_from_checkpoint PATH|true` (the run continues after that checkpoint,
metrics included; `save_strategy` must have written one).

Point it at a real model and data set by flags, e.g.
`--model Qwen/Qwen3-0.6B --dataset openai/gsm8k --dataset_config main`.
"""
from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class RecipeArgs:
    model: str = field(default="tiny", metadata={"help": "model path or hub id; 'tiny' builds a tiny model locally"})
    family: str = field(default="qwen3", metadata={"help": "family of the tiny model: qwen3, qwen2, llama, qwen3_moe"})
    dataset: str = field(default="arithmetic", metadata={"help": "'arithmetic' (synthetic) or a hub data set id"})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "hub data set config (e.g. 'main')"})
    num_prompts: int = field(default=512, metadata={"help": "synthetic prompts to make"})
    max_operand: int = field(default=9, metadata={
        "help": "arithmetic task: the operands are 0..max_operand (4: 25 distinct prompts, one-digit answers)"})
    onpolicy: str = field(default="strict", metadata={"help": "strict | monitor | off"})
    control: bool = field(default=False, metadata={"help": "after the run, repeat it with onpolicy off"})
    sft_warmup_steps: int = field(default=0, metadata={"help": "SFT steps on the task before GRPO (tiny model)"})
    sft_error_rate: float = field(default=0.3, metadata={
        "help": "share of SFT warm-up examples whose answer is one too high (a sloppy teacher: the mistake the "
                "GRPO reward then trains away)"})
    reward: str = field(default="correctness", metadata={
        "help": "'correctness' (the first number in the completion vs the answer), 'strict' (the completion must "
                "be a bare number: 1 if it is the answer, partial credit by distance, 0 for anything else) or "
                "'digits' (share of digit characters in the completion: a dense signal even an untrained model "
                "varies on, so every step updates the weights)"})
    lora_r: int = field(default=0, metadata={
        "help": "train a LoRA adapter of this rank on every linear projection (PEFT; lora_alpha = 2 x rank) "
                "instead of the full model; 0: full fine-tuning"})
    run_dir: str = field(default="runs/demo", metadata={"help": "where metrics.jsonl and checkpoints go"})
    overwrite_run_dir: bool = field(default=False, metadata={
        "help": "replace an earlier run's records in the run directory (else a re-run is refused)"})


# --- the synthetic task -------------------------------------------------------------------------------------------

def arithmetic_dataset(n: int, seed: int, max_operand: int = 9):
    """Prompts 'a+b=' with 0 <= a, b <= max_operand (one digit); the answer is their sum."""
    from datasets import Dataset

    if not 0 <= max_operand <= 9:
        raise ValueError(f"max_operand must be a digit, 0..9 (got {max_operand})")
    rng = random.Random(seed)
    pairs = [(rng.randint(0, max_operand), rng.randint(0, max_operand)) for _ in range(n)]
    return Dataset.from_dict({"prompt": [f"{a}+{b}=" for a, b in pairs], "answer": [str(a + b) for a, b in pairs]})


def hub_dataset(name: str, config: Optional[str]):
    from datasets import load_dataset

    ds = load_dataset(name, config, split="train")
    if "question" in ds.column_names and "answer" in ds.column_names:  # GSM8K layout
        return ds.map(lambda r: {"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip()})
    raise ValueError(f"data set {name!r} needs 'question' and 'answer' columns (GSM8K layout)")


LEADING_NUMBER = re.compile(r"\s*(-?\d+)")
BARE_NUMBER = re.compile(r"\s*(-?\d+)\s*")


def _text(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


def _score(m, answer: str) -> float:
    """1 for the answer, partial credit for a number close to it, 0 for no number."""
    if m is None:
        return 0.0
    return 1.0 if m.group(1) == answer else max(0.05, 0.5 - 0.1 * abs(int(m.group(1)) - int(answer)))


def correctness_reward(completions, answer, **_):
    """1 for the right number first; partial credit for a number close to it; 0 for no number."""
    return [_score(LEADING_NUMBER.match(_text(c)), a) for c, a in zip(completions, answer)]


def strict_reward(completions, answer, **_):
    """As correctness, but the completion must be the bare number (the sequence ends right after it).

    Anything else scores 0, so a policy cannot keep the credit for a leading number while it learns
    to avoid ending the sequence after wrong ones ('correctness' lets a GRPO run do that: it then
    drifts into trailing junk and its reward collapses).
    """
    return [_score(BARE_NUMBER.fullmatch(_text(c)), a) for c, a in zip(completions, answer)]


def digits_reward(completions, **_):
    """Share of the completion's characters that are digits (for runs on untrained models)."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


REWARDS = {"correctness": correctness_reward, "strict": strict_reward, "digits": digits_reward}


# --- the tiny model and its warm-up ---------------------------------------------------------------------------------

def sloppy_teacher(rng: random.Random, n: int, max_operand: int, error_rate: float) -> list:
    """n SFT examples 'a+b=s<eos>': s is the sum, or one too high with probability error_rate."""
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        texts.append(f"{a}+{b}={a + b + (rng.random() < error_rate)}<eos>")
    return texts


def tiny_model(path: Path, family: str, warmup_steps: int, seed: int, error_rate: float = 0.3,
               max_operand: int = 9) -> str:
    """Build a tiny model (once per settings) and warm it up on the task with a short SFT.

    The warm-up data come from a sloppy teacher: a share `error_rate` of its answers are one too
    high. The model learns the sums and the mistake; sampled, it is often one too high, which the
    GRPO run's reward (1 for the sum, 0.4 for one off) then trains away.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onpolicy.tiny import make_tiny_model

    done = path / ".warm"  # holds the settings it was built with: other settings rebuild it
    key = json.dumps({"family": family, "sft_warmup_steps": warmup_steps, "seed": seed, "sft_error_rate": error_rate,
                      "max_operand": max_operand, "version": 2}, sort_keys=True)  # version: of this warm-up code

    def ready():
        return done.exists() and done.read_text() == key

    if ready():
        return str(path)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # several processes: local rank 0 builds, the others wait
        import time

        deadline = time.time() + 1800
        while not ready():
            if time.time() > deadline:
                raise TimeoutError(f"local rank 0 did not finish building the tiny model in {path} within 30 min")
            time.sleep(1)
        return str(path)
    done.unlink(missing_ok=True)
    make_tiny_model(path, family, dtype=torch.float32, head_scale=1.0, seed=seed)
    if warmup_steps:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / warmup_steps)  # linear decay: settles
        rng = random.Random(seed)
        from tqdm import tqdm

        for _ in tqdm(range(warmup_steps), desc="SFT warm-up", file=sys.stdout):
            batch = tok(sloppy_teacher(rng, 64, max_operand, error_rate), return_tensors="pt", padding=True)
            labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        model.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    done.write_text(key)
    return str(path)


# --- the run --------------------------------------------------------------------------------------------------------

def resume_arg(value):
    """--resume_from_checkpoint as Transformers' train() takes it: None, True (the last checkpoint) or a path."""
    if value is None or value is True or value is False:
        return value or None
    return True if str(value).strip().lower() in ("true", "yes", "1", "last") else str(value)


def train(recipe: RecipeArgs, cfg, model: str, dataset, mode: str, run_dir: Path):
    from onpolicy.trl_grpo import OnPolicyGRPOTrainer

    cfg.output_dir = str(run_dir)
    extra = {}
    if recipe.lora_r:
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=recipe.lora_r, lora_alpha=2 * recipe.lora_r, target_modules="all-linear")
    trainer = OnPolicyGRPOTrainer(model=model, reward_funcs=REWARDS[recipe.reward], args=cfg, train_dataset=dataset,
                                  onpolicy=mode, run_dir=str(run_dir), overwrite_run_dir=recipe.overwrite_run_dir,
                                  **extra)
    trainer.train(resume_from_checkpoint=resume_arg(cfg.resume_from_checkpoint))
    return run_dir / "metrics.jsonl"


def check_model_arg(model: str) -> None:
    """A local path that is not a directory gets 'no such directory', not the hub's repo-id error."""
    looks_local = model.startswith(("/", "./", "../", "~", ".")) or model.count("/") > 1 or Path(model).exists()
    if looks_local and not Path(model).expanduser().is_dir():
        raise SystemExit(f"--model {model}: no such directory (give a local model directory, a hub id such as "
                         "Qwen/Qwen3-0.6B, or 'tiny')")


def check_run_dir(run_dir: Path, recipe: RecipeArgs, cfg) -> None:
    """Refuse, before any model is built, a run directory that holds an earlier run (see the module docstring)."""
    from onpolicy.runlog import earlier_records

    found = earlier_records(run_dir)
    if found and not recipe.overwrite_run_dir and not resume_arg(cfg.resume_from_checkpoint):
        raise SystemExit(f"run directory {run_dir} already holds an earlier run ({', '.join(found)}): pass "
                         "--overwrite_run_dir true to replace it, --resume_from_checkpoint PATH|true to continue it, "
                         "or another --run_dir")


def run_in_process(argv: list, extra: list, what: str) -> None:
    """One run of this recipe in a process of its own (this process holds no engine or model meanwhile)."""
    import subprocess

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "ONPOLICY_VLLM")}
    proc = subprocess.Popen([sys.executable, __file__, *argv, *extra], env=env)
    print(f"[recipe] {what} run: process {proc.pid} started (parent {os.getpid()} holds no engine)", flush=True)
    rc = proc.wait()
    print(f"[recipe] {what} run: process {proc.pid} exited with {rc}", flush=True)
    if rc != 0:
        raise SystemExit(f"the {what} run failed (exit {rc}); see its output above")


def control_resume(value, root: Path):
    """The control's checkpoint for --resume_from_checkpoint: the same checkpoint name in its own run directory."""
    r = resume_arg(value)
    if r is None or r is True:
        return r
    p = Path(r).resolve()
    on = (root / "onpolicy").resolve()
    return str(root / "control" / p.relative_to(on)) if p.is_relative_to(on) else r


def reward_rise(rows, k: int = 3):
    """(mean reward of the first k steps, of the last k steps), or None when the run has fewer than 2k steps."""
    rewards = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    if len(rewards) < 2 * k:
        return None
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def summary(paths, max_rows: int = 24):
    from rich.console import Console
    from rich.table import Table

    from onpolicy.runlog import read_steps

    runs = [(name, read_steps(p)) for name, p in paths]
    longest = max((len(rows) for _, rows in runs), default=0)
    every = 1 if longest <= max_rows else 10  # long runs: the first 3 steps, every 10th, the last 3
    table = Table(title="onpolicy GRPO: sampler vs trainer, per step",
                  caption=None if every == 1 else "(first 3, every 10th and last 3 steps; all in metrics.jsonl)")
    for c in ("run", "step", "tokens", "bitwise equal", "max |Δlogp|", "KL k3", "IS ratio range", "reward"):
        table.add_column(c, justify="right")
    for name, rows in runs:
        for i, r in enumerate(rows):
            if every > 1 and not (i < 3 or i >= len(rows) - 3 or r["step"] % every == 0):
                continue
            table.add_row(name, str(r["step"]), str(r["tokens"]), f"{100 * r['bitwise_equal_frac']:.1f}%",
                          f"{r['logp_abs_diff_max']:.2e}", f"{r['kl_k3']:.2e}",
                          f"{r['is_ratio_min']:.6g}..{r['is_ratio_max']:.6g}",
                          "-" if r.get("reward_mean") is None else f"{r['reward_mean']:.3f}")
    console = Console()
    console.print(table)
    for name, rows in runs:
        if not rows:
            continue
        equal = sum(r["bitwise_equal_frac"] == 1.0 for r in rows)
        console.print(f"{name}: all tokens bitwise equal at {equal} of {len(rows)} steps (worst step "
                      f"{100 * min(r['bitwise_equal_frac'] for r in rows):.1f}%), max |Δlogp| "
                      f"{max(r['logp_abs_diff_max'] for r in rows):.2e}", soft_wrap=True)
        rise = reward_rise(rows)
        if rise is not None:
            console.print(f"{name}: reward: first-3-steps mean {rise[0]:.3f} -> last-3-steps mean {rise[1]:.3f} "
                          f"({rise[1] - rise[0]:+.3f})", soft_wrap=True)
        times = [r["time"] for r in rows]
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        if gaps:  # one gap = one optimizer step + the next generation (the first step's warm-up excluded)
            console.print(f"{name}: step time {gaps[len(gaps) // 2]:.3f} s (median of {len(gaps)} steps after the "
                          f"first; min {gaps[0]:.3f}, max {gaps[-1]:.3f})", soft_wrap=True)


def main(argv=None):
    from trl import GRPOConfig, TrlParser

    parser = TrlParser((RecipeArgs, GRPOConfig))
    recipe, cfg = parser.parse_args_and_config(argv)
    if recipe.onpolicy not in ("strict", "monitor", "off"):
        raise SystemExit(f"--onpolicy must be strict, monitor or off (got {recipe.onpolicy!r})")
    if recipe.reward not in REWARDS:
        raise SystemExit(f"--reward must be one of {', '.join(REWARDS)} (got {recipe.reward!r})")
    if recipe.lora_r < 0:
        raise SystemExit(f"--lora_r {recipe.lora_r}: give a rank >= 1, or 0 for full fine-tuning")
    root = Path(recipe.run_dir)
    model = recipe.model
    if model != "tiny":
        check_model_arg(model)
    name = "control" if recipe.onpolicy == "off" else "onpolicy"
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with_control = recipe.control and recipe.onpolicy != "off" and not several
    for n in ([name, "control"] if with_control else [name]):
        check_run_dir(root / n, recipe, cfg)
    if model == "tiny":
        model = tiny_model(root / "tiny-model", recipe.family, recipe.sft_warmup_steps, cfg.seed,
                           recipe.sft_error_rate, recipe.max_operand)
    cfg.model_init_kwargs = {**(cfg.model_init_kwargs or {}), "dtype": "bfloat16"}
    if with_control:
        # Each run in a process of its own, one after the other: the vLLM plugin, once on, stays on in its
        # process, and the control must not share the GPU with the first run's engine and model (on an
        # 80 GB GPU the 1.7B recipe's control ran out of memory while this process still held 46 GB).
        argv = list(sys.argv[1:] if argv is None else argv)
        run_in_process(argv, ["--control", "false"], "onpolicy")
        resume = control_resume(cfg.resume_from_checkpoint, root)
        run_in_process(argv, ["--onpolicy", "off", "--control", "false"]
                       + (["--resume_from_checkpoint", str(resume)] if resume is not None else []), "control")
        done = [("onpolicy", root / "onpolicy" / "metrics.jsonl"), ("control", root / "control" / "metrics.jsonl")]
    else:
        data = (arithmetic_dataset(recipe.num_prompts, cfg.seed, recipe.max_operand) if recipe.dataset == "arithmetic"
                else hub_dataset(recipe.dataset, recipe.dataset_config))
        done = [(name, train(recipe, cfg, model, data, recipe.onpolicy, root / name))]
        if recipe.control and recipe.onpolicy != "off" and several and int(os.environ.get("RANK", "0")) == 0:
            print("control run skipped: with several processes launch it yourself with the same command plus "
                  "`--onpolicy off --control false`", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        summary(done)
        print(f"dashboard: onpolicy dashboard {' '.join(str(p.parent) for _, p in done)}")


if __name__ == "__main__":
    main()
