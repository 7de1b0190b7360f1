"""onpolicy's platform: vLLM's own platform class plus two overrides.

* `get_attn_backend_cls` returns onpolicy's attention backend (vLLM's CPU
  platform would force CPU_ATTN whatever was selected; on CUDA nothing selects
  a backend for TRL), and refuses any other backend a user forced.
* `check_and_update_config` runs vLLM's, then onpolicy's checks and settings
  (config.py): supported model, single GPU, the "onpolicy" linear config, the
  worker subclass that installs the sampler.
* `validate_request` (in the API server process) refuses, on an RL server (a weight-transfer
  config, TRL's server mode), the requests the trainer cannot reproduce (serving.py): vLLM
  answers them 400.
* `get_device_communicator_cls` returns onpolicy's subclass of vLLM's device
  communicator, whose all-reduce sums in rank order beyond two ranks
  (collectives.py).

Reached two ways:
1. the `vllm.platform_plugins` entry point `detect()` (returns the subclass's
   name when ONPOLICY_VLLM=1): works in every process vLLM starts;
2. `ensure_active()` from the general plugin: if vLLM already resolved a
   builtin platform in this process, the live platform object is switched to
   the matching subclass (`obj.__class__ = Sub`; the subclasses add no state),
   so every `from vllm.platforms import current_platform` sees it.
"""
from __future__ import annotations

import logging

from .errors import OnpolicyVllmError

logger = logging.getLogger("vllm.onpolicy")  # child of vLLM's logger: printed with its messages

# Builtin platform detector name -> (vLLM base class qualname, our class name here).
_BASES = {
    "cpu": ("vllm.platforms.cpu.CpuPlatform", "OnpolicyCpuPlatform"),
    "cuda": ("vllm.platforms.cuda.CudaPlatform", "OnpolicyCudaPlatform"),
}


# Classes (by name, anywhere in the MRO) whose subclasses we can extend.
_SUPPORTED_BASE_NAMES = ("CpuPlatform", "CudaPlatformBase")


class OnpolicyPlatformMixin:
    """The overrides; placed before vLLM's platform class in the MRO."""

    onpolicy = True

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs) -> str:
        from .attention import BACKEND_QUALNAME
        from .config import check_attention_selection

        check_attention_selection(selected_backend, attn_selector_config)
        logger.info("onpolicy: attention backend %s (registered as CUSTOM)", BACKEND_QUALNAME)
        return BACKEND_QUALNAME

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)  # type: ignore[misc]
        from . import register
        from .config import configure

        register()  # in case the general-plugin entry point is not installed
        configure(vllm_config)

    @classmethod
    def validate_request(cls, *args, **kwargs) -> None:
        """vLLM's check, then (on an RL server, serving.py) a 400 for a request the trainer cannot reproduce."""
        super().validate_request(*args, **kwargs)  # type: ignore[misc]
        from .serving import check_request

        params = args[1] if len(args) > 1 else kwargs.get("params")
        check_request(params)

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        from .collectives import communicator_qualname

        return communicator_qualname(cls.vllm_device_communicator_cls())

    @classmethod
    def vllm_device_communicator_cls(cls) -> str:
        """The communicator class vLLM's own platform would use (onpolicy's subclasses it)."""
        return super().get_device_communicator_cls()  # type: ignore[misc]


_SUBCLASSES: dict[type, type] = {}


def subclass_for(base: type, name: str | None = None) -> type:
    """onpolicy's subclass of a vLLM platform class (one per base, cached)."""
    if issubclass(base, OnpolicyPlatformMixin):
        return base
    if base not in _SUBCLASSES:
        name = name or f"Onpolicy{base.__name__}"
        cls = type(name, (OnpolicyPlatformMixin, base), {"__module__": __name__})
        cls.__qualname__ = name
        _SUBCLASSES[base] = cls
    return _SUBCLASSES[base]


def __getattr__(name: str):
    # "onpolicy.vllm_plugin.platform.OnpolicyCpuPlatform" / "...OnpolicyCudaPlatform",
    # built on first use so nothing CUDA is imported on a CPU machine.
    for base_qualname, our_name in _BASES.values():
        if name == our_name:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            cls = subclass_for(resolve_obj_by_qualname(base_qualname), name)
            globals()[name] = cls
            return cls
    for cls in _SUBCLASSES.values():  # e.g. OnpolicyNvmlCudaPlatform (ensure_active on vLLM 0.26 CUDA)
        if cls.__name__ == name:
            return cls
    raise AttributeError(name)


def detect():
    """`vllm.platform_plugins` entry point: our platform's name when enabled, else None."""
    from . import is_enabled

    if not is_enabled():
        return None
    import vllm.platforms as vp

    for key, (_, our_name) in _BASES.items():
        fn = vp.builtin_platform_plugins.get(key)
        try:
            found = fn() if fn is not None else None
        except Exception:
            found = None
        if found:
            return f"{__name__}.{our_name}"
    logger.warning("onpolicy: ONPOLICY_VLLM=1 but no CPU or CUDA platform was detected; plugin inactive")
    return None


def ensure_active() -> None:
    """Make this process's vLLM platform object onpolicy's (see module docstring)."""
    import vllm.platforms as vp

    current = vp.current_platform  # resolves it if nobody did yet (entry point -> ours)
    if isinstance(current, OnpolicyPlatformMixin):
        return
    base = type(current)
    if not any(c.__name__ in _SUPPORTED_BASE_NAMES for c in base.__mro__):
        known = ", ".join(q for q, _ in _BASES.values())
        raise OnpolicyVllmError(f"unsupported vLLM platform {base.__module__}.{base.__qualname__}; "
                                f"onpolicy runs on {known}")
    our_name = next((n for q, n in _BASES.values() if q.rsplit(".", 1)[1] == base.__name__), None)
    current.__class__ = subclass_for(base, our_name)
    logger.info("onpolicy: switched the vLLM platform to %s", type(current).__name__)
