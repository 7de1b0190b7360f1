"""A bounds checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

Under the interpreter a kernel's loads and stores are raw host-memory accesses:
an access outside every tensor argument (a missing or wrong mask at an edge
tile) reads garbage or silently corrupts the heap, and the process may crash
much later in unrelated code. `install()` makes every interpreted load and
store check, for each element its mask enables, that the bytes lie inside the
memory spanned by one of the launch's tensor arguments (the view, not just its
storage); a violation raises (the test fails, naming the kernel and the
addresses). tests/kernels/conftest.py installs it for every kernel test.
"""
from __future__ import annotations

import numpy as np


class OutOfBounds(AssertionError):
    pass


_state = {"kernel": None, "starts": None, "ends": None, "checked": 0}


def _span(t):
    """[lo, hi) bytes a tensor view spans (strides are never negative in torch)."""
    if t.numel() == 0:
        return None
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def _ranges(args):
    from triton.tools.tensor_descriptor import TensorDescriptor

    spans = []

    def visit(a):
        if isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif isinstance(a, TensorDescriptor):
            visit(a.base)
        elif hasattr(a, "data_ptr") and hasattr(a, "stride"):
            s = _span(a)
            if s:
                spans.append(s)

    visit(args)
    spans.sort()
    merged = []
    for lo, hi in spans:  # union of overlapping spans (aliased views of one buffer)
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return (np.array([m[0] for m in merged], dtype=np.uint64), np.array([m[1] for m in merged], dtype=np.uint64))


def _check(kind, ptrs, mask):
    if _state["starts"] is None:
        return
    p = np.asarray(ptrs.data, dtype=np.uint64)
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)
    addr = p[m]
    if addr.size == 0:
        return
    size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    starts, ends = _state["starts"], _state["ends"]
    i = np.searchsorted(starts, addr, side="right").astype(np.int64) - 1
    ok = (i >= 0) & (addr + size <= ends[np.maximum(i, 0)])
    _state["checked"] += int(addr.size)
    if not ok.all():
        bad = addr[~ok][:4]
        spans = ", ".join(f"[{hex(int(a))}, {hex(int(b))})" for a, b in zip(starts, ends))
        raise OutOfBounds(f"{_state['kernel']}: {kind} of {int((~ok).sum())} element(s) outside every tensor "
                          f"argument, e.g. at {[hex(int(a)) for a in bad]}; arguments span {spans}")


def unpatched_interpreter(flag: str):
    """Triton's interpreter module if it still lacks the patch named `flag` (which is then set
    once the caller patches it), else None: no triton, or patched already (idempotence)."""
    try:
        from triton.runtime import interpreter as I
    except Exception:  # noqa: BLE001 - no triton: nothing is interpreted
        return None
    return None if getattr(I, flag, False) else I


def install() -> None:
    """Patch the interpreter (idempotent; nothing to do without triton)."""
    I = unpatched_interpreter("_onpolicy_bounds")
    if I is None:
        return
    builder = I.interpreter_builder
    load, store = builder.create_masked_load, builder.create_masked_store
    init_args = I.GridExecutor._init_args_hst
    call = I.GridExecutor.__call__

    # (ptrs, mask, ...) and (ptrs, value, mask, ...): the trailing arguments differ between
    # Triton releases and are passed through as they come
    def checked_load(ptrs, mask, *rest, **kw):
        _check("load", ptrs, mask)
        return load(ptrs, mask, *rest, **kw)

    def checked_store(ptrs, value, mask, *rest, **kw):
        _check("store", ptrs, mask)
        return store(ptrs, value, mask, *rest, **kw)

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        _state["starts"], _state["ends"] = _ranges((args_hst, tuple(kwargs_hst.values())))
        return args_hst, kwargs_hst

    def run(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            _state["kernel"] = _state["starts"] = _state["ends"] = None

    builder.create_masked_load = checked_load
    builder.create_masked_store = checked_store
    I.GridExecutor._init_args_hst = init_args_hst
    I.GridExecutor.__call__ = run
    I._onpolicy_bounds = True


def elements_checked() -> int:
    """How many element accesses the checker has verified so far (proves it is active)."""
    return _state["checked"]
