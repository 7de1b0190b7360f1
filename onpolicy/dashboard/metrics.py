"""The metrics the dashboard knows, the names other frameworks give them, and
what counts as a sampler/trainer mismatch.

Every reader maps what it finds onto these canonical keys (those of the
recipe's ``metrics.jsonl``, docs/metrics-format.md). Names logged by TRL, verl
and slime are accepted as aliases, so a run that never used onpolicy still
shows up on the same charts. transformers' loggers prefix training scalars with
``train/`` (``rewrite_logs``); :func:`canonical_key` strips it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Metric:
    key: str                      # canonical key (metrics.jsonl)
    label: str                    # chart / table label
    aliases: tuple[str, ...] = ()  # names other frameworks log (without transformers' "train/")
    known_as: str = ""            # shown under the chart title so users of other frameworks recognise it
    doc: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("bitwise_equal_frac", "Tokens bitwise equal",
           doc="fraction of completion tokens whose sampler and trainer logprobs are bitwise equal"),
    Metric("logp_abs_diff_mean", "Mean |Δlogp|",
           aliases=("sampling/sampling_logp_difference/mean", "train_rollout_logprob_abs_diff"),
           known_as="TRL sampling/sampling_logp_difference/mean · slime train_rollout_logprob_abs_diff",
           doc="mean over tokens of |logp_sampler - logp_trainer|"),
    Metric("logp_abs_diff_max", "Max |Δlogp|",
           aliases=("sampling/sampling_logp_difference/max",),
           known_as="TRL sampling/sampling_logp_difference/max",
           doc="max over tokens of |logp_sampler - logp_trainer|"),
    Metric("kl_k1", "KL k1", aliases=("rollout_corr/kl",), known_as="verl rollout_corr/kl",
           doc="mean(log p_sampler - log p_trainer)"),
    Metric("kl_k3", "KL k3", aliases=("rollout_corr/k3_kl",), known_as="verl rollout_corr/k3_kl",
           doc="mean(r - 1 - log r), r = p_trainer / p_sampler"),
    Metric("is_ratio_min", "IS ratio min", aliases=("sampling/importance_sampling_ratio/min",),
           known_as="TRL sampling/importance_sampling_ratio/min"),
    Metric("is_ratio_mean", "IS ratio mean", aliases=("sampling/importance_sampling_ratio/mean",),
           known_as="TRL sampling/importance_sampling_ratio/mean"),
    Metric("is_ratio_max", "IS ratio max", aliases=("sampling/importance_sampling_ratio/max",),
           known_as="TRL sampling/importance_sampling_ratio/max"),
    Metric("reward_mean", "Reward", aliases=("reward",), known_as="TRL reward"),
    Metric("reward_std", "Reward std", aliases=("reward_std",), known_as="TRL reward_std"),
    Metric("tokens", "Tokens compared"),
    Metric("step_time", "Step time (s)"),
)

BY_KEY: dict[str, Metric] = {m.key: m for m in METRICS}
ALIASES: dict[str, str] = {a: m.key for m in METRICS for a in m.aliases}
# Keys that carry run metadata rather than a plotted scalar.
META_KEYS = frozenset({"step", "time", "onpolicy", "first_mismatch"})
STEP_KEYS = ("step", "global_step", "train/global_step")


@functools.lru_cache(maxsize=4096)
def canonical_key(name: str) -> str:
    """Canonical key for a logged name: our own key, a known alias, or the name
    itself (kept as an extra metric). transformers' ``train/`` prefix is dropped
    before matching; ``eval/`` names are never mapped onto training metrics.
    onpolicy's TRL integration logs its own metrics as ``onpolicy/<key>`` (so
    ``train/onpolicy/<key>`` in TensorBoard and trackio): those are our keys."""
    if name in BY_KEY:
        return name
    bare = name[len("train/"):] if name.startswith("train/") else name
    if bare.startswith("onpolicy/") and bare[len("onpolicy/"):] in BY_KEY:
        return bare[len("onpolicy/"):]
    if bare in BY_KEY:
        return bare
    return ALIASES.get(bare, name)


def to_float(value) -> float | None:
    """A logged value as a float, or None when it is not a scalar number.
    Accepts the strings trackio and JSON writers use for non-finite floats."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        v = {"NaN": math.nan, "nan": math.nan, "Infinity": math.inf, "inf": math.inf,
             "-Infinity": -math.inf, "-inf": -math.inf}.get(value)
        return v
    return None


# Mismatch: a step mismatches when any indicator it carries says sampler and
# trainer disagree; it is equal when it carries at least one indicator and none
# disagrees; unknown (None) when it carries none (e.g. a TRL run without
# importance-sampling correction logs no mismatch metric at all).
_ZERO_WHEN_EQUAL = ("logp_abs_diff_mean", "logp_abs_diff_max", "kl_k1", "kl_k3")
_ONE_WHEN_EQUAL = ("bitwise_equal_frac", "is_ratio_min", "is_ratio_mean", "is_ratio_max")


def step_mismatch(row: dict) -> bool | None:
    """True if the step shows any sampler/trainer difference, False if it shows
    none, None if it carries no mismatch metric. NaN counts as a mismatch
    (a diverged step must not look clean)."""
    seen = False
    for k in _ZERO_WHEN_EQUAL:
        v = row.get(k)
        if v is not None:
            seen = True
            if not v == 0.0:          # also True for NaN
                return True
    for k in _ONE_WHEN_EQUAL:
        v = row.get(k)
        if v is not None:
            seen = True
            if not v == 1.0:
                return True
    fm = row.get("first_mismatch", ...)
    if fm is not ...:
        seen = True
        if fm is not None:
            return True
    return False if seen else None


@dataclass
class RunSummary:
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    last_time: float | None = None
    mismatch_steps: int = 0
    equal_steps: int = 0
    unknown_steps: int = 0
    first_mismatch_step: int | None = None
    worst: dict = field(default_factory=dict)   # key -> {"step", "value"} of the largest value (the
                                                # first NaN/inf when there is one: it is worse than any)
    last: dict = field(default_factory=dict)    # key -> last finite value
    nonfinite: dict = field(default_factory=dict)  # key -> number of NaN/inf values

    @property
    def status(self) -> str:
        if self.steps == 0:
            return "empty"
        if self.mismatch_steps:
            return "mismatch"
        if self.equal_steps:
            return "equal"
        return "unknown"

    def as_dict(self) -> dict:
        return {"steps": self.steps, "first_step": self.first_step, "last_step": self.last_step,
                "last_time": self.last_time, "mismatch_steps": self.mismatch_steps,
                "equal_steps": self.equal_steps, "unknown_steps": self.unknown_steps,
                "first_mismatch_step": self.first_mismatch_step, "status": self.status,
                "worst": {k: {"value": json_float(w["value"]), "step": w["step"]} for k, w in self.worst.items()},
                "last": self.last, "nonfinite": self.nonfinite}


def json_float(v: float):
    """A float for JSON: non-finite values as the strings "NaN", "inf", "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def fmt_value(v) -> str:
    """A value for the terminal and the PNG (NaN / inf spelled out)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return f"{v:.3g}"
