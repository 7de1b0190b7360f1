"""`onpolicy check`: prove sampler == trainer bitwise for a model, or name where they part.

1. vLLM (in-process, plugin on -- or off with --off) samples completions with
   logprobs (processed: temperature applied).
2. The trainer (transformers; patched with onpolicy unless --off) recomputes
   every sampled token's logprob.
3. If any token differs, both sides are run once more on the first mismatching
   sequence up to that token, recording each sub-op's output (vLLM through
   module hooks, the trainer through the same names), and the first sub-op
   whose outputs differ is reported ("layer 3 post_attention_layernorm: max |Δ|
   2e-3; everything before identical").

Both sides run one dtype: `--dtype` (default: what vLLM runs the checkpoint in, e.g. bfloat16
for a float32 checkpoint on the CPU) for the engine, and the trainer loads the model in the
dtype the engine reports; the report states each side's dtype.

Exit status: 0 bitwise (or --off), 1 not bitwise, 2 bad input (one line, checked before any
engine starts), 3 the check itself failed (the engine or the trainer raised).

The engine runs eagerly (enforce_eager) so module hooks can see activations; with
--cuda-graphs it runs as a production engine does (vLLM's CUDA graphs for the model,
onpolicy's for the LM head and sampler), and a mismatch is reported without locating it
(rerun without the flag for that).
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Optional

import torch
import typer

from .metrics import mismatch_metrics

TAP_SUBMODULES = (  # (vLLM module path under model.model.layers[i], tap name), in execution order
    ("input_layernorm", "input_layernorm"),
    ("self_attn.qkv_proj", "self_attn.qkv_proj"),
    ("self_attn.attn", "self_attn.attn"),
    ("self_attn.o_proj", "self_attn.o_proj"),
    ("post_attention_layernorm", "post_attention_layernorm"),
    ("mlp.gate_up_proj", "mlp.gate_up_proj"),
    ("mlp.act_fn", "mlp.act_fn"),
    ("mlp.down_proj", "mlp.down_proj"),
)


class CheckError(Exception):
    """Bad input to `onpolicy check` (reported without a traceback)."""


@dataclass
class CheckResult:
    model: str
    plugin: bool
    temperature: float
    sequences: int
    metrics: dict
    first_mismatch_per_sequence: list  # completion index of the first differing token, or None
    divergence: Optional[dict] = None
    notes: list = field(default_factory=list)
    tensor_parallel_size: int = 1
    cuda_graphs: bool = False
    sampler_dtype: Optional[str] = None
    trainer_dtype: Optional[str] = None
    max_model_len: int = 512

    @property
    def ok(self) -> bool:
        return self.metrics["bitwise_equal_frac"] == 1.0


# --- inputs -----------------------------------------------------------------------------------------------------------

def load_prompts(prompt_file: Optional[Path], n: int, vocab: int, seed: int, tokenizer=None) -> list[list[int]]:
    """Token-id prompts: from a file (JSONL of {"prompt": str} or {"prompt_token_ids": [...]}, or plain text
    lines), else n random prompts of 4-24 tokens."""
    if prompt_file is None:
        rng = random.Random(seed)
        return [[rng.randrange(4, vocab) for _ in range(rng.randint(4, 24))] for _ in range(n)]
    if not prompt_file.exists():
        raise CheckError(f"prompt file {prompt_file} does not exist")
    out = []
    for i, line in enumerate(prompt_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if prompt_file.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CheckError(f"{prompt_file}:{i}: not valid JSON ({e.msg}); each line must be "
                                 '{"prompt": "..."} or {"prompt_token_ids": [...]}') from None
            if isinstance(rec, dict) and isinstance(rec.get("prompt_token_ids"), list):
                out.append([int(t) for t in rec["prompt_token_ids"]])
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str)):
                raise CheckError(f"{prompt_file}:{i}: expected an object with 'prompt' or 'prompt_token_ids'")
            line = rec["prompt"]
        if tokenizer is None:
            raise CheckError("text prompts need the model's tokenizer, which could not be loaded")
        ids = tokenizer(line, add_special_tokens=False).input_ids
        if not ids:
            raise CheckError(f"{prompt_file}:{i}: the prompt tokenizes to nothing")
        out.append(ids)
    if not out:
        raise CheckError(f"prompt file {prompt_file} holds no prompts")
    return out[:n] if n else out


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def validate_model(model: str):
    from transformers import AutoConfig

    from .families import UnsupportedModelError, check_supported

    if not Path(model).exists():
        raise CheckError(f"model path {model} does not exist (give a local directory with config.json and weights)")
    if not Path(model).is_dir():
        raise CheckError(f"model path {model} is not a directory (give a local directory with config.json and weights)")
    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001
        raise CheckError(f"cannot read a transformers config from {model}: {e}") from None
    try:
        check_supported(cfg)
    except UnsupportedModelError as e:
        raise CheckError(str(e)) from None
    if not any(next(Path(model).glob(p), None) for p in WEIGHT_PATTERNS):
        raise CheckError(f"model directory {model} holds no weights ({', '.join(WEIGHT_PATTERNS)})")
    return cfg


# --- the two sides ----------------------------------------------------------------------------------------------------

def validate_inputs(prompts: int, max_tokens: int, temperature: float, tp: int, dtype: str, max_model_len: int):
    """CheckError (exit 2, one line) for a bad command line, before any model or engine is loaded."""
    import math

    from .trainer.forward import SUPPORTED_TP

    if prompts < 1:
        raise CheckError(f"--prompts must be >= 1, got {prompts}")
    if max_tokens < 1:
        raise CheckError(f"--max-tokens must be >= 1, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckError(f"--temperature must be a finite number > 0, got {temperature} (logprobs of greedy sampling "
                         "are taken at temperature 1: use 1.0)")
    if tp not in SUPPORTED_TP:
        raise CheckError(f"--tp {tp}: onpolicy mirrors vLLM tensor parallelism of size 1 or 2")
    if dtype not in DTYPES:
        raise CheckError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if max_model_len < 2:
        raise CheckError(f"--max-model-len must be >= 2, got {max_model_len}")


def engine_dtype(llm) -> torch.dtype:
    """The dtype the engine runs the model in (what the trainer must load it in)."""
    return llm.llm_engine.model_config.dtype


def make_engine(model: str, plugin: bool, max_model_len: int = 512, seed: int = 0, tp: int = 1,
                cuda_graphs: bool = False, dtype: str = "auto"):
    """An in-process vLLM engine, eager unless `cuda_graphs`, with the onpolicy plugin on or off
    (tp > 1: one worker process a rank)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from . import vllm_plugin

    if plugin:
        vllm_plugin.enable()
    elif vllm_plugin.is_registered():
        raise CheckError("the onpolicy vLLM plugin is already on in this process; run --off in a fresh process")
    from vllm import LLM

    kw = dict(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, enforce_eager=not cuda_graphs,
              logprobs_mode="processed_logprobs")
    if not torch.cuda.is_available():
        kw["gpu_memory_utilization"] = 0.3
    if tp > 1:
        from .vllm_plugin.config import tensor_parallel_engine_args

        kw.update(tensor_parallel_engine_args(tp))
        if not torch.cuda.is_available():
            kw["gpu_memory_utilization"] = 0.3 / tp  # a share of host memory per rank
    return LLM(**kw)


def vllm_model(llm):
    """The torch module vLLM runs (in-process engine)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.model_runner.model
    except AttributeError:
        from .vllm_plugin import compat

        return compat.engine_model(llm)


def sample(llm, prompts, max_tokens: int, temperature: float, seed: int):
    from vllm import SamplingParams

    reqs = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed + i,
                             ignore_eos=True) for i in range(len(prompts))]
    outs = llm.generate(reqs, params, use_tqdm=False)
    comps, lps = [], []
    for o in outs:
        c = o.outputs[0]
        comps.append(list(c.token_ids))
        lps.append([c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)])
    return comps, lps


def load_trainer(model: str, patch: bool, tp: int = 1, dtype="auto"):
    """The trainer side: transformers, in `dtype` (pass the engine's, `engine_dtype(llm)`), patched or not."""
    from transformers import AutoModelForCausalLM

    from .trainer import patch_model

    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    if torch.cuda.is_available():
        m = m.cuda()
    return patch_model(m, tensor_parallel_size=tp) if patch else m


def trainer_logprobs(model, prompt: list[int], completion: list[int], temperature: float, patched: bool):
    from .trainer import token_logprobs

    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad():
        if patched:
            return token_logprobs(model, ids, temperature=temperature, logits_to_keep=len(completion))[0].cpu()
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0].cpu()


# --- activations --------------------------------------------------------------------------------------------------------

def _first(t):
    return t[0] if isinstance(t, (tuple, list)) else t


def capture_vllm(llm, ids: list[int]) -> dict:
    """Sub-op outputs of vLLM's model for the last token of `ids` (a prefill of the whole sequence)."""
    from vllm import SamplingParams

    model = vllm_model(llm)
    acts: dict = {}
    hooks = []

    def hook(name):
        def fn(_mod, _inp, out):
            t = _first(out)
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] >= len(ids):
                acts[name] = t[len(ids) - 1].detach().reshape(-1).cpu().clone()
        return fn

    inner = model.model
    for i, layer in enumerate(inner.layers):
        for path, name in TAP_SUBMODULES:
            mod = layer.get_submodule(path)
            hooks.append(mod.register_forward_hook(hook(f"layers.{i}.{name}")))
    hooks.append(inner.norm.register_forward_hook(hook("norm")))
    try:
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    finally:
        for h in hooks:
            h.remove()
    return acts


def capture_trainer(model, ids: list[int], patched: bool) -> dict:
    """The trainer's outputs under the same names, for the last token of `ids`."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    acts: dict = {}

    def keep(name, t):
        acts[name] = t[-1].detach().reshape(-1).cpu().clone()

    with torch.no_grad():
        if patched:
            from .trainer import forward as F

            F.packed_hidden(model.model, x, tap=lambda n, t: keep(n, t.reshape(t.shape[0], -1)))
            return acts
        hooks = []
        last = {}

        def out_hook(name):
            return lambda _m, _i, out: keep(name, _first(out)[0])

        def pre_hook(name):
            return lambda _m, inp: keep(name, inp[0][0])

        def part_hook(name, part, n):
            def fn(_m, _i, out):
                last[part] = out[0]
                if len(last) == n:
                    keep(name, torch.cat([last.pop(p) for p in sorted(last, key=("q", "k", "v", "g", "u").index)], -1))
            return fn

        for i, layer in enumerate(model.model.layers):
            a, m = layer.self_attn, layer.mlp
            p = f"layers.{i}."
            hooks += [layer.input_layernorm.register_forward_hook(out_hook(p + "input_layernorm")),
                      a.q_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "q", 3)),
                      a.k_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "k", 3)),
                      a.v_proj.register_forward_hook(part_hook(p + "self_attn.qkv_proj", "v", 3)),
                      a.o_proj.register_forward_pre_hook(pre_hook(p + "self_attn.attn")),
                      a.o_proj.register_forward_hook(out_hook(p + "self_attn.o_proj")),
                      layer.post_attention_layernorm.register_forward_hook(out_hook(p + "post_attention_layernorm")),
                      m.gate_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "g", 2)),
                      m.up_proj.register_forward_hook(part_hook(p + "mlp.gate_up_proj", "u", 2)),
                      m.down_proj.register_forward_pre_hook(pre_hook(p + "mlp.act_fn")),
                      m.down_proj.register_forward_hook(out_hook(p + "mlp.down_proj"))]
        hooks.append(model.model.norm.register_forward_hook(out_hook("norm")))
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
    return acts


def first_divergence(vllm_acts: dict, trainer_acts: dict) -> Optional[dict]:
    """The first sub-op (in execution order) whose outputs differ bitwise, with max |Δ|."""
    names = [n for n in vllm_acts if n in trainer_acts]
    order = {n: i for i, n in enumerate(trainer_acts)}
    names.sort(key=lambda n: order[n])
    for n in names:
        a, b = vllm_acts[n].float(), trainer_acts[n].float()
        if a.shape != b.shape:
            return {"op": n, "max_abs_diff": None, "note": f"shapes differ: vLLM {tuple(a.shape)} vs trainer {tuple(b.shape)}",
                    "identical_before": names.index(n)}
        if not torch.equal(a, b):
            return {"op": n, "max_abs_diff": float((a - b).abs().max()), "identical_before": names.index(n),
                    "compared": len(names)}
    return None


def describe_op(op: str) -> str:
    parts = op.split(".")
    if parts[0] == "layers":
        return f"layer {parts[1]} {' '.join(parts[2:])}"
    return op


# --- the check ----------------------------------------------------------------------------------------------------------

def _short(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_check(model: str, prompts: int = 16, max_tokens: int = 32, temperature: float = 1.0, off: bool = False,
              prompt_file: Optional[Path] = None, seed: int = 0, llm=None, trainer=None,
              trainer_hook: Optional[Callable] = None, progress: Optional[Callable[[str], None]] = None,
              tp: int = 1, cuda_graphs: bool = False, dtype: str = "auto", max_model_len: int = 512,
              warn: Optional[Callable[[str], None]] = None) -> CheckResult:
    """Sample, recompute, compare; localise the first divergence. `llm`/`trainer` may be passed in to reuse them.

    Every input is checked (CheckError) before an engine starts; `warn` hears what the check will do
    differently from what was asked (e.g. fewer tokens than --max-tokens where the context is full)."""
    say = progress or (lambda _msg: None)
    validate_inputs(prompts, max_tokens, temperature, tp, dtype, max_model_len)
    cfg = validate_model(model)
    tok = None
    if prompt_file is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
    prompt_ids = load_prompts(prompt_file, prompts, cfg.vocab_size, seed, tok)
    longest = max(len(p) for p in prompt_ids)
    if longest >= max_model_len:
        raise CheckError(f"a prompt of {longest} tokens does not fit the {max_model_len}-token context "
                         "(--max-model-len)")
    notes = []
    if longest + max_tokens > max_model_len:
        notes.append(f"--max-tokens {max_tokens} does not fit the {max_model_len}-token context after the prompts "
                     f"(up to {longest} tokens): sequences are cut at the context, so as few as "
                     f"{max_model_len - longest} tokens are compared for some (raise --max-model-len)")
        (warn or say)(notes[-1])
    if llm is None:
        say("starting vLLM" + (" (onpolicy plugin off)" if off else " with the onpolicy plugin"))
        llm = make_engine(model, plugin=not off, seed=seed, tp=tp, cuda_graphs=cuda_graphs, dtype=dtype,
                          max_model_len=max_model_len)
    sampler_dtype = engine_dtype(llm)
    say(f"sampling {len(prompt_ids)} prompts x {max_tokens} tokens at temperature {temperature} "
        f"(vLLM runs {_short(sampler_dtype)})")
    comps, slps = sample(llm, prompt_ids, max_tokens, temperature, seed)
    if trainer is None:
        say(f"loading the trainer model in {_short(sampler_dtype)}" + ("" if off else " (patched)"))
        trainer = load_trainer(model, patch=not off, tp=tp, dtype=sampler_dtype)
    trainer_dtype = next(trainer.parameters()).dtype
    if trainer_dtype != sampler_dtype:
        notes.append(f"the trainer model is {_short(trainer_dtype)} but vLLM runs {_short(sampler_dtype)}: no token "
                     "can match; load it in vLLM's dtype")
    if trainer_hook is not None:
        trainer_hook(trainer)
    say("recomputing logprobs in the trainer")
    patched = not off
    tl = [trainer_logprobs(trainer, p, c, temperature, patched) for p, c in zip(prompt_ids, comps)]
    T = max(len(c) for c in comps)
    S = torch.full((len(comps), T), float("nan"))
    R = torch.full((len(comps), T), float("nan"))
    M = torch.zeros(len(comps), T, dtype=torch.bool)
    for i, (s, t) in enumerate(zip(slps, tl)):
        S[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        R[i, : len(s)] = t
        M[i, : len(s)] = True
    metrics = mismatch_metrics(S, R, M)
    firsts = []
    for i in range(len(comps)):
        bad = ((S[i] != R[i]) & M[i]).nonzero()
        firsts.append(int(bad[0]) if bad.numel() else None)
    res = CheckResult(model, not off, temperature, len(comps), metrics, firsts, tensor_parallel_size=tp,
                      cuda_graphs=cuda_graphs, sampler_dtype=_short(sampler_dtype),
                      trainer_dtype=_short(trainer_dtype), max_model_len=max_model_len, notes=notes)
    if metrics["first_mismatch"] is not None:
        i, j = metrics["first_mismatch"]["seq"], metrics["first_mismatch"]["pos"]
        ids = prompt_ids[i] + comps[i][:j]
        if cuda_graphs:
            res.notes.append("the per-layer divergence search needs an eager engine (module hooks): rerun "
                             "without --cuda-graphs to locate it")
            return res
        if tp > 1:
            res.notes.append("the per-layer divergence search runs the vLLM model in this process: rerun with "
                             "--tp 1 to locate it")
            return res
        say(f"locating the divergence: sequence {i}, completion token {j}")
        res.divergence = first_divergence(capture_vllm(llm, ids), capture_trainer(trainer, ids, patched))
        if res.divergence is None:
            res.notes.append("every recorded sub-op output is identical; the difference is in the LM head or the "
                             "logprob computation (or vLLM's decode differs from its prefill)")
    return res


def render(res: CheckResult, console) -> None:
    from rich.table import Table

    m = res.metrics
    tp = f", TP={res.tensor_parallel_size}" if res.tensor_parallel_size > 1 else ""
    tp += ", CUDA graphs" if res.cuda_graphs else ""
    dt = (f"dtype {res.sampler_dtype}" if res.sampler_dtype == res.trainer_dtype
          else f"dtype: vLLM {res.sampler_dtype}, trainer {res.trainer_dtype}")
    t = Table(title=f"onpolicy check: {res.model} (plugin {'on' if res.plugin else 'off'}, T={res.temperature}{tp})\n"
                    f"vLLM runs {res.sampler_dtype}, the trainer {res.trainer_dtype} ({dt})")
    for c in ("tokens compared", "bitwise equal", "mean |Δlogp|", "max |Δlogp|", "KL k3", "sequences with a mismatch"):
        t.add_column(c, justify="right")
    nbad = sum(f is not None for f in res.first_mismatch_per_sequence)
    colour = "green" if res.ok else "red"
    t.add_row(str(m["tokens"]), f"[{colour}]{100 * m['bitwise_equal_frac']:.2f}%[/{colour}]",
              f"{m['logp_abs_diff_mean']:.3e}", f"{m['logp_abs_diff_max']:.3e}", f"{m['kl_k3']:.3e}",
              f"{nbad} / {res.sequences}")
    console.print(t)
    if nbad:
        firsts = [f"#{i}@{f}" for i, f in enumerate(res.first_mismatch_per_sequence) if f is not None]
        console.print("first mismatching completion token per sequence: " + ", ".join(firsts[:24])
                      + (" ..." if len(firsts) > 24 else ""))
    d = res.divergence
    if d:
        diff = "n/a" if d["max_abs_diff"] is None else f"{d['max_abs_diff']:.3g}"
        console.print(f"[bold red]first divergence:[/] {describe_op(d['op'])} output: max |Δ| {diff}; "
                      f"everything before identical ({d['identical_before']} sub-op outputs)")
    for n in res.notes:
        console.print(f"note: {n}")
    if res.ok:
        console.print("[bold green]sampler and trainer agree bitwise on every sampled token.[/]")


def check(
    model: Annotated[str, typer.Option("--model", help="Local model directory (Qwen3, Qwen2/2.5, Llama 3.x).")],
    prompts: Annotated[int, typer.Option(help="Number of prompts.")] = 16,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to sample per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    off: Annotated[bool, typer.Option("--off", help="Plugin off: plain vLLM vs the unpatched trainer.")] = False,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="JSONL ({'prompt': ...} or "
                                                       "{'prompt_token_ids': [...]}) or text, one prompt a line.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for prompts and sampling.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    tp: Annotated[int, typer.Option("--tp", help="vLLM tensor_parallel_size (1 or 2); the trainer mirrors it.")] = 1,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Sample with CUDA graphs on, as a production "
                                              "engine does (a mismatch is then not located: rerun without).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Dtype of both sides: auto (what vLLM runs the checkpoint "
                                       "in, e.g. bfloat16 for float32 weights), bfloat16, float16, float32.")] = "auto",
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="vLLM's context (prompt + completion).")]
    = 512,
) -> None:
    """Sample with vLLM, recompute with the trainer, and prove bitwise equality (or name the first diverging layer)."""
    from rich.console import Console

    from rich.markup import escape

    console = Console(stderr=as_json)
    try:
        with console.status("onpolicy check") as status:
            res = run_check(model, prompts, max_tokens, temperature, off, prompt_file, seed,
                            progress=lambda msg: (status.update(msg), console.log(msg)), tp=tp,
                            cuda_graphs=cuda_graphs, dtype=dtype, max_model_len=max_model_len,
                            warn=lambda msg: console.print(f"[bold yellow]warning:[/] {escape(msg)}",
                                                           soft_wrap=True))
    except CheckError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except Exception as e:  # noqa: BLE001 - exit 1 means "not bitwise" only: a failed check is 3
        import traceback

        traceback.print_exc()
        console.print(f"[bold red]error: the check failed:[/] {escape(type(e).__name__ + ': ' + str(e))}",
                      soft_wrap=True, highlight=False)
        raise typer.Exit(3) from None
    if as_json:
        sys.stdout.write(json.dumps({**asdict(res), "ok": res.ok}) + "\n")
    else:
        render(res, console)
    if not res.ok and not off:
        raise typer.Exit(1)
