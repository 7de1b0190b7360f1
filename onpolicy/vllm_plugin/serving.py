"""An RL server: a vLLM server a trainer pushes weights into (TRL's `vllm_mode="server"`).

TRL 1.16's `trl vllm-serve` runs vLLM's own OpenAI server (`vllm serve`) with a weight-transfer
engine (`--weight-transfer-config '{"backend": "nccl"}'`), `--logprobs-mode processed_logprobs`
and `VLLM_SERVER_DEV_MODE=1` (the weight-sync and cache endpoints). Its trainer generates through
`/v1/completions` and compares the returned logprobs with its own (importance sampling). An
engine built with a weight-transfer config is taken here for such a server, and onpolicy holds it
to what keeps the returned logprobs the trainer's, bitwise:

* at build (`check_engine`, from config.configure): processed logprobs (the distribution the
  token was drawn from, at the request's temperature -- what the trainer scores); the NCCL
  weight transfer (the one TRL uses; its received weights go through the model's `load_weights`
  with vLLM's layerwise reload, which keeps every weight tensor where it was: tests/vllm/
  test_trl_server.py); no engine-wide logits processors or watermark (they change the sampled
  distribution; the trainer cannot follow).
* per request (`request_problems`, from the platform's `validate_request` in the API server
  process): a request whose options change the distribution before sampling in a way the
  trainer does not reproduce (penalties, logit bias, bad / allowed words, min_tokens, structured
  outputs, a thinking budget) is answered 400 with the option and the fix, before it reaches the
  engine, which goes on serving. top-k / top-p / min-p are served (onpolicy's truncation, which
  the trainer applies too).

A plain `vllm serve` without a weight-transfer config is not an RL server: its requests keep
vLLM's options as documented in sampler.py.
"""
from __future__ import annotations

import logging

from .errors import OnpolicyVllmError

logger = logging.getLogger("vllm.onpolicy")

SUPPORTED_BACKENDS = ("nccl",)
LAUNCH_HINT = "start the server with `onpolicy serve MODEL ...` (or `ONPOLICY_VLLM=1 trl vllm-serve --model MODEL ...`)"

# Set in the process that built an RL server's config (the API server process checks requests).
_rl_server = False


def is_rl_server(vllm_config) -> bool:
    return getattr(vllm_config, "weight_transfer_config", None) is not None


def check_engine(vllm_config) -> bool:
    """Refuse an RL server engine onpolicy cannot keep on-policy; True if this is an RL server."""
    global _rl_server
    if not is_rl_server(vllm_config):
        return False
    wt = vllm_config.weight_transfer_config
    mc = vllm_config.model_config
    problems = []
    mode = getattr(mc, "logprobs_mode", "raw_logprobs")
    if mode != "processed_logprobs":
        problems.append(f"logprobs_mode={mode!r}: the trainer scores the distribution the token was drawn from (at "
                        "the request's temperature, truncated by its top-k / top-p / min-p); pass "
                        "--logprobs-mode processed_logprobs")
    backend = getattr(wt, "backend", None)
    if backend not in SUPPORTED_BACKENDS:
        problems.append(f"weight transfer backend {backend!r}: onpolicy supports {', '.join(SUPPORTED_BACKENDS)} "
                        "(TRL's); pass --weight-transfer-config '{\"backend\": \"nccl\"}'")
    procs = getattr(mc, "logits_processors", None)
    if procs:
        problems.append(f"logits_processors={procs!r}: they change the sampled distribution and the trainer does not "
                        "apply them; remove --logits-processors")
    if getattr(vllm_config, "watermark_config", None) is not None:
        problems.append("a watermark changes the sampled distribution and the trainer does not apply it; remove the "
                        "watermark config")
    if problems:
        raise OnpolicyVllmError("this RL server (weight_transfer_config is set) cannot serve a trainer on-policy:\n  - "
                                + "\n  - ".join(problems) + f"\n({LAUNCH_HINT} sets what it needs)")
    _rl_server = True
    logger.info("onpolicy: RL server (weight transfer %s, processed logprobs); requests that change the sampled "
                "distribution are refused with a 400", backend)
    return True


def rl_server() -> bool:
    """Whether this process built an RL server's config (its requests are checked)."""
    return _rl_server


def _set(value, default=None) -> bool:
    return value is not None and value != default and value not in ({}, [], ())


def request_problems(params) -> list[str]:
    """What in one request's SamplingParams the trainer cannot reproduce (empty: servable on-policy)."""
    out = []
    for name, neutral in (("repetition_penalty", 1.0), ("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        value = getattr(params, name, neutral)
        if value is not None and float(value) != neutral:
            out.append(f"{name}={value!r} (penalised logits are not what the trainer scores; send {neutral})")
    if getattr(params, "min_tokens", 0):
        out.append(f"min_tokens={params.min_tokens!r} (masks the stop tokens, which the trainer does not; send 0)")
    for name in ("logit_bias", "bad_words", "allowed_token_ids", "structured_outputs"):
        if _set(getattr(params, name, None)):
            out.append(f"{name} (changes the logits before sampling, which the trainer does not; leave it out)")
    if getattr(params, "thinking_token_budget", None) is not None:
        out.append("thinking_token_budget (forces tokens the model did not sample; leave it out)")
    if getattr(params, "watermarking", None):
        out.append("watermarking (changes the sampled distribution; leave it out)")
    return out


def check_request(params) -> None:
    """Raise vLLM's validation error (a ValueError; vLLM answers 400) for a request an RL server cannot
    serve on-policy."""
    if not _rl_server or type(params).__name__ != "SamplingParams":
        return
    problems = request_problems(params)
    if problems:
        msg = ("onpolicy: this server samples for an on-policy trainer, which cannot reproduce "
               + "; ".join(problems) + ". top_k / top_p / min_p and temperature are supported.")
        try:  # vLLM's request-validation error: answered 400 (a plain ValueError here became a 500)
            from vllm.exceptions import VLLMValidationError
        except ImportError:
            raise ValueError(msg) from None
        raise VLLMValidationError(msg, parameter=problems[0].split("=")[0].split(" ")[0])
