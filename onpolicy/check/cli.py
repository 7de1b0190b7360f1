"""`onpolicy check` on the command line (typer)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from .inputs import CheckError
from .report import render
from .run import run_check


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
    tp: Annotated[int, typer.Option("--tp", help="vLLM tensor_parallel_size (1, 2, 4 or 8); the trainer mirrors it.")] = 1,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="Sample with CUDA graphs on, as a production "
                                              "engine does (a mismatch is then not located: rerun without).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="Dtype of both sides: auto (what vLLM runs the checkpoint "
                                       "in, e.g. bfloat16 for float32 weights), bfloat16, float16, float32.")] = "auto",
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="vLLM's context (prompt + completion).")]
    = 512,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest tokens (0: off); the trainer "
                                       "scores the same truncated distribution.")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (1: off), likewise.")] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", help="Min-p sampling (0: off), likewise.")] = 0.0,
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
                            top_k=top_k, top_p=top_p, min_p=min_p,
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
