"""The check's inputs: the command line, the model directory, the prompts (all checked before any engine starts)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional


class CheckError(Exception):
    """Bad input to `onpolicy check` (reported without a traceback)."""


DTYPES = ("auto", "bfloat16", "float16", "float32")


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


def validate_model(model: str):
    """The model directory's transformers config, or CheckError (exit 2, one line) naming what is wrong."""
    from ..families import UnsupportedModelError, load_model_config

    try:
        return load_model_config(model)
    except UnsupportedModelError as e:
        raise CheckError(str(e)) from None


def validate_inputs(prompts: int, max_tokens: int, temperature: float, tp: int, dtype: str, max_model_len: int,
                    top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """CheckError (exit 2, one line) for a bad command line, before any model or engine is loaded."""
    import math

    from ..trainer.forward import SUPPORTED_TP

    if prompts < 1:
        raise CheckError(f"--prompts must be >= 1, got {prompts}")
    if max_tokens < 1:
        raise CheckError(f"--max-tokens must be >= 1, got {max_tokens}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckError(f"--temperature must be a finite number > 0, got {temperature} (logprobs of greedy sampling "
                         "are taken at temperature 1: use 1.0)")
    if tp not in SUPPORTED_TP:
        raise CheckError(f"--tp {tp}: onpolicy mirrors vLLM tensor parallelism of size 1, 2, 4 or 8; use one of those")
    if dtype not in DTYPES:
        raise CheckError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if max_model_len < 2:
        raise CheckError(f"--max-model-len must be >= 2, got {max_model_len}")
    if top_k < 0:
        raise CheckError(f"--top-k must be >= 0 (0: off), got {top_k}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise CheckError(f"--top-p must be in (0, 1] (1: off), got {top_p}")
    if not (math.isfinite(min_p) and 0 <= min_p < 1):
        raise CheckError(f"--min-p must be in [0, 1) (0: off), got {min_p}")
