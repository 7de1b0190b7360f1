"""Every ONPOLICY_* environment variable, read here and nowhere else.

Each is read when asked for (`envs.ONPOLICY_ATTENTION`), so a variable set after import
still counts, and a bad value raises a ValueError naming the variable and what it takes.
The kernels, the trainer adapter and the vLLM plugin all read them through this module
(the plugin's too: onpolicy imports onpolicy_kernels, never the reverse) -- except the plugin's
entry point, which reads ONPOLICY_VLLM itself, the same way, so that a vLLM process where the plugin
is off never imports the kernels.

| variable | values (default first) | what it does |
|---|---|---|
| ONPOLICY_VLLM | 0, 1 | the vLLM plugin on in every vLLM process (the TRL trainer and `onpolicy check` set it) |
| ONPOLICY_KERNELS_BACKEND | auto, triton, cpu | auto: Triton on CUDA tensors, the CPU path elsewhere; triton also on CPU tensors (with TRITON_INTERPRET=1, for tests) |
| ONPOLICY_ATTENTION | auto, triton, fa3 | the attention route on Hopper (auto: FA3 with one KV split where it applies); same value on both sides |
| ONPOLICY_LINEAR_CUBLASLT | (unset), 0, 1 | unset: verified cuBLASLt algorithms may serve `linear` on Hopper; 0: never; 1: on other CUDA GPUs too |
| ONPOLICY_LINEAR_CACHE | ~/.cache/onpolicy, DIR, 0 | where the linear chooser keeps its picks (0: nowhere; every process times its own) |
| ONPOLICY_DECODE_GRAPHS | 1, 0 | the LM head and the sampler's log-softmax replayed from CUDA graphs at decode |
| ONPOLICY_DECODE_GRAPH_ROWS | 256, 1..256 | the largest decode batch run from those graphs |
"""
from __future__ import annotations

import os
from typing import Callable, Optional

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")

DECODE_GRAPH_MAX_ROWS = 256


def _raw(name: str) -> Optional[str]:
    v = os.environ.get(name)
    return None if v is None else v.strip()


def _choice(name: str, default: str, choices: tuple) -> Callable[[], str]:
    def read() -> str:
        v = (_raw(name) or default).lower()
        if v not in choices:
            raise ValueError(f"{name}={v!r} is not one of {choices}")
        return v
    return read


def _flag(name: str, default: bool, meaning: str) -> Callable[[], bool]:
    def read() -> bool:
        v = (_raw(name) or "").lower()
        if v == "":
            return default
        if v in _ON:
            return True
        if v in _OFF:
            return False
        raise ValueError(f"{name}={v!r}: {meaning}")
    return read


def _vllm() -> bool:
    return (_raw("ONPOLICY_VLLM") or "0").lower() in _ON  # anything else: off, as vLLM reads its own flags


def _cublaslt() -> Optional[bool]:
    """None (unset: on Hopper only), False (0: never), True (1: on any CUDA GPU)."""
    v = (_raw("ONPOLICY_LINEAR_CUBLASLT") or "").lower()
    return True if v in _ON else False if v in _OFF else None


def _linear_cache() -> Optional[str]:
    v = _raw("ONPOLICY_LINEAR_CACHE") or ""
    if v.lower() in _OFF:
        return None
    return v or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "onpolicy")


def _graph_rows() -> int:
    v = _raw("ONPOLICY_DECODE_GRAPH_ROWS") or ""
    if not v:
        return DECODE_GRAPH_MAX_ROWS
    try:
        n = int(v)
    except ValueError:
        n = 0
    if not 1 <= n <= DECODE_GRAPH_MAX_ROWS:
        raise ValueError(f"ONPOLICY_DECODE_GRAPH_ROWS={v!r}: give the largest decode batch to run from graphs, 1 to "
                         f"{DECODE_GRAPH_MAX_ROWS} (or ONPOLICY_DECODE_GRAPHS=0 for none)")
    return n


_READERS: dict[str, Callable] = {
    "ONPOLICY_VLLM": _vllm,
    "ONPOLICY_KERNELS_BACKEND": _choice("ONPOLICY_KERNELS_BACKEND", "auto", ("auto", "cpu", "triton")),
    "ONPOLICY_ATTENTION": _choice("ONPOLICY_ATTENTION", "auto", ("auto", "triton", "fa3")),
    "ONPOLICY_LINEAR_CUBLASLT": _cublaslt,
    "ONPOLICY_LINEAR_CACHE": _linear_cache,
    "ONPOLICY_DECODE_GRAPHS": _flag("ONPOLICY_DECODE_GRAPHS", True,
                                    "use 1 (the default: graphs for the LM head and sampler) or 0 (eager)"),
    "ONPOLICY_DECODE_GRAPH_ROWS": _graph_rows,
}
NAMES = tuple(_READERS)


def __getattr__(name: str):
    if name in _READERS:
        return _READERS[name]()
    raise AttributeError(name)


def __dir__():
    return sorted(list(globals()) + list(_READERS))
