"""Sampler/trainer mismatch metrics over completion tokens (names: docs/metrics-format.md)."""
from __future__ import annotations

from typing import Optional

import torch


def mismatch_metrics(sampler_logp: torch.Tensor, trainer_logp: torch.Tensor,
                     mask: Optional[torch.Tensor] = None) -> dict:
    """Compare per-token logprobs [B, T] of the sampler and the trainer on the tokens where mask is true.

    bitwise_equal_frac counts exact float equality (the promise of onpolicy);
    with r = exp(trainer - sampler) over tokens sampled by the sampler,
    kl_k1 = mean(-log r) and kl_k3 = mean(r - 1 - log r) estimate KL(sampler || trainer).
    NaN sampler logprobs (tokens vLLM did not score) count as mismatches.
    """
    if sampler_logp.shape != trainer_logp.shape:
        raise ValueError(f"sampler logprobs {tuple(sampler_logp.shape)} and trainer logprobs "
                         f"{tuple(trainer_logp.shape)} must have one shape")
    s = sampler_logp.detach().float().cpu()
    t = trainer_logp.detach().float().cpu()
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    eq = (s == t) & m
    n = int(m.sum())
    out = {"tokens": n, "bitwise_equal_frac": (int(eq.sum()) / n) if n else 1.0}
    d = (t.double() - s.double())[m]
    finite = torch.isfinite(d)
    d = d[finite] if finite.any() else d.new_zeros(1)
    r = d.exp()
    out.update(
        logp_abs_diff_mean=float(d.abs().mean()), logp_abs_diff_max=float(d.abs().max()),
        kl_k1=float((-d).mean()), kl_k3=float((r - 1 - d).mean()),
        is_ratio_min=float(r.min()), is_ratio_mean=float(r.mean()), is_ratio_max=float(r.max()),
    )
    bad = (m & ~eq).nonzero()
    out["first_mismatch"] = None
    if bad.numel():
        i, j = (int(v) for v in bad[0])
        out["first_mismatch"] = {"seq": i, "pos": j, "sampler": float(s[i, j]), "trainer": float(t[i, j])}
    return out


class MismatchError(AssertionError):
    """Strict mode: a token's sampler and trainer logprobs differ."""


def describe_mismatch(metrics: dict, step: Optional[int] = None, cause: Optional[str] = None) -> str:
    """One message for a strict-mode mismatch; `cause` is the caller's best guess of why (config vs kernels)."""
    fm = metrics["first_mismatch"]
    where = f"step {step}: " if step is not None else ""
    return (f"{where}sampler and trainer logprobs differ on {(1 - metrics['bitwise_equal_frac']) * metrics['tokens']:.0f}"
            f" of {metrics['tokens']} tokens (max |dlogp| {metrics['logp_abs_diff_max']:.3g}); first at sequence "
            f"{fm['seq']}, completion token {fm['pos']}: sampler {fm['sampler']!r} vs trainer {fm['trainer']!r}. "
            + (cause or "Run `onpolicy check --model <path>` to find the first layer where the two stacks part."))
