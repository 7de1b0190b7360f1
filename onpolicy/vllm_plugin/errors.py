"""The one error type the plugin raises for setups it cannot make on-policy."""
from __future__ import annotations

try:  # the trainer side's error, when the package is importable: one type for users to catch
    from onpolicy.families import UnsupportedModelError as _Base
except Exception:  # pragma: no cover - families needs onpolicy_kernels
    _Base = ValueError


class OnpolicyVllmError(_Base):
    """vLLM was asked to do something onpolicy cannot make bitwise equal to the trainer."""

    def __init__(self, msg: str):
        super().__init__(f"onpolicy vLLM plugin: {msg}")
