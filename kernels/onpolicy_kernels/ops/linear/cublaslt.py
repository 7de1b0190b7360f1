"""cuBLASLt matmuls restricted to algorithms that never split K (ctypes; no new dependency).

`run(x, w, out, algo)` computes out = x @ w.T with a cuBLASLt algorithm that
accumulates all of K in one pass: `candidates(...)` asks cuBLASLt's
heuristic for algorithms with no workspace (so no split-K reduction buffer and no
stream-K fix-up buffer) and keeps only those whose configuration reports
SPLITK_NUM == 1 and REDUCTION_SCHEME == NONE. Such a kernel's output element is
one fp32 dot product over K in order; on Hopper that gave the same bits as the
Triton kernel (benchmarks/RESULTS.md, "Linear vs cuBLAS"; benchmarks/linear_every_m.py). That is
a measured fact about the kernels, not a cuBLAS promise, so the caller
(chooser.py) uses an algorithm only after checking its bits against the Triton kernel.

The library is the libcublasLt that torch itself loaded (found in /proc/self/maps),
so its version is torch's.
"""
from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import torch

_DTYPES = {torch.float16: 2, torch.bfloat16: 14, torch.float32: 0}  # cudaDataType_t
_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_OP_T = 1
_DESC_TRANSA = 3
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_REDUCTION_SCHEME_MASK = 3
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D bytes
_CFG = {  # cublasLtMatmulAlgoConfigAttributes_t: (id, ctype)
    "algo": (0, ctypes.c_int32), "tile": (1, ctypes.c_uint32), "splitk": (2, ctypes.c_int32),
    "reduction": (3, ctypes.c_uint32), "swizzle": (4, ctypes.c_uint32), "custom": (5, ctypes.c_uint32),
    "stages": (6, ctypes.c_uint32), "inner": (7, ctypes.c_uint16), "cluster": (8, ctypes.c_uint16),
}


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _library_path() -> Optional[str]:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip().split(" ")[-1]
                if "libcublasLt.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    torch.cuda.init()
    path = _library_path()
    names = [path] if path else ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise RuntimeError("libcublasLt not found (torch was not built with CUDA, or cuBLAS is not installed)")
    vp = ctypes.c_void_p
    lib.cublasLtCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cublasLtMatmulDescCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_int]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
    lib.cublasLtMatrixLayoutCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_int, ctypes.c_uint64,
                                               ctypes.c_uint64, ctypes.c_int64]
    lib.cublasLtMatmulPreferenceCreate.argtypes = [ctypes.POINTER(vp)]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = [vp, ctypes.c_int, vp, ctypes.c_size_t]
    lib.cublasLtMatmulPreferenceDestroy.argtypes = [vp]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                                                   ctypes.POINTER(_Heuristic), ctypes.POINTER(ctypes.c_int)]
    lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [ctypes.POINTER(Algo), ctypes.c_int, vp,
                                                         ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.cublasLtMatmul.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp,
                                   ctypes.POINTER(Algo), vp, ctypes.c_size_t, vp]
    lib.cublasLtMatmulAlgoCheck.argtypes = [vp, vp, vp, vp, vp, vp, ctypes.POINTER(Algo),
                                            ctypes.POINTER(_Heuristic)]
    for fn in ("cublasLtCreate", "cublasLtMatmulDescCreate", "cublasLtMatmulDescSetAttribute",
               "cublasLtMatrixLayoutCreate", "cublasLtMatmulPreferenceCreate",
               "cublasLtMatmulPreferenceSetAttribute", "cublasLtMatmulPreferenceDestroy",
               "cublasLtMatmulAlgoGetHeuristic",
               "cublasLtMatmulAlgoConfigGetAttribute", "cublasLtMatmul", "cublasLtMatmulAlgoCheck"):
        getattr(lib, fn).restype = ctypes.c_int
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"cuBLASLt {what} failed with status {status}")


@functools.lru_cache(maxsize=None)
def _handle(device_index: int) -> ctypes.c_void_p:
    h = ctypes.c_void_p()
    with torch.cuda.device(device_index):
        _check(_lib().cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
    return h


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"set attribute {attr}")


def _alignment(t: torch.Tensor) -> int:
    p = t.data_ptr()
    a = 256
    while a > 1 and p % a:
        a //= 2
    return a


def identity(algo: Algo) -> tuple:
    """What makes two algorithm descriptors the same kernel configuration."""
    return tuple(algo.data)


def to_json(algo: Algo) -> list[str]:
    """An algorithm descriptor as text (valid for this cuBLASLt version only: see `versions`)."""
    return [f"{v:016x}" for v in algo.data]


def from_json(words: list) -> Algo:
    if not isinstance(words, list) or len(words) != len(Algo().data):
        raise ValueError(f"not a cuBLASLt algorithm descriptor: {words!r}")
    algo = Algo()
    for i, v in enumerate(words):
        algo.data[i] = int(v, 16)
    return algo


def versions() -> str:
    """What a stored descriptor is valid for: torch, CUDA, cuBLASLt and Triton versions, as a file-name part."""
    import re

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    lib = _lib()
    lib.cublasLtGetVersion.restype = ctypes.c_size_t
    raw = f"torch{torch.__version__}-cuda{torch.version.cuda}-cublaslt{lib.cublasLtGetVersion()}-triton{tv}"
    return re.sub(r"[^A-Za-z0-9.]+", "_", raw)


def describe(algo: Algo) -> str:
    c = config(algo)
    return "cuBLASLt tile {tile} stages {stages} cluster {cluster} option {custom}".format(
        **{k: c.get(k, "?") for k in ("tile", "stages", "cluster", "custom")})


def config(algo: Algo) -> dict:
    """An algorithm's configuration attributes (tile, stages, cluster, split-K, ...)."""
    out = {}
    for name, (attr, ct) in _CFG.items():
        v, written = ct(), ctypes.c_size_t()
        if _lib().cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                       ctypes.sizeof(v), ctypes.byref(written)) == 0:
            out[name] = int(v.value)
    return out


class _Problem:
    """Descriptors of one (M, N, K, dtype, strides, alignments) problem: out[M, N] = x[M, K] @ w[N, K].T."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor):
        lib = _lib()
        dt = _DTYPES[x.dtype]
        M, K = x.shape
        N = w.shape[0]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, 0), "MatmulDescCreate")
        _set(lib.cublasLtMatmulDescSetAttribute, self.desc, _DESC_TRANSA, ctypes.c_int32(_OP_T))
        # Column-major view: out.T [N, M] = op(A) [N, K] @ B [K, M] with A = w ([K, N], ld = w.stride(0)), B = x.
        self.a, self.b, self.d = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.a), dt, K, N, w.stride(0)), "LayoutCreate A")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.b), dt, K, M, x.stride(0)), "LayoutCreate B")
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(self.d), dt, N, M, out.stride(0)), "LayoutCreate D")
        self.alpha = ctypes.c_float(1.0)
        self.beta = ctypes.c_float(0.0)

    def candidates(self, handle, aligns: tuple, count: int = 16, no_split: bool = True) -> list[tuple[Algo, float]]:
        lib = _lib()
        pref = ctypes.c_void_p()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        try:
            return self._candidates(lib, handle, pref, aligns, count, no_split)
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)

    def _candidates(self, lib, handle, pref, aligns: tuple, count: int, no_split: bool) -> list[tuple[Algo, float]]:
        if no_split:
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(0))
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_REDUCTION_SCHEME_MASK, ctypes.c_uint32(0))
        else:
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(32 << 20))
        for attr, a in zip(_PREF_MIN_ALIGNMENT, aligns):
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr, ctypes.c_uint32(a))
        results = (_Heuristic * count)()
        n = ctypes.c_int()
        status = lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                    count, results, ctypes.byref(n))
        if no_split and (status != 0 or n.value == 0):
            # Some versions may read a mask of 0 as "nothing allowed": ask again without
            # the mask; the configuration filter below still drops split-K algorithms.
            _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_REDUCTION_SCHEME_MASK, ctypes.c_uint32(7))
            status = lib.cublasLtMatmulAlgoGetHeuristic(handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                        count, results, ctypes.byref(n))
        if status != 0:
            return []
        out = []
        for r in results[: n.value]:
            if r.state != 0:
                continue
            if no_split:
                cfg = config(r.algo)
                # SPLITK_NUM must read 1; a reduction scheme, where reported, NONE (with one
                # K split and no workspace there is nothing to reduce).
                if cfg.get("splitk") != 1 or cfg.get("reduction", 0) != 0 or r.workspace:
                    continue
            algo = Algo()
            ctypes.memmove(ctypes.byref(algo), ctypes.byref(r.algo), ctypes.sizeof(Algo))
            out.append((algo, float(r.waves)))
        return out


_PROBLEMS: dict = {}


def problem(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> tuple[_Problem, tuple]:
    aligns = (_alignment(w), _alignment(x), _alignment(out), _alignment(out))
    key = (x.device.index, x.dtype, x.shape[0], w.shape[0], x.shape[1], x.stride(0), w.stride(0), out.stride(0), aligns)
    p = _PROBLEMS.get(key)
    if p is None:
        p = _PROBLEMS[key] = _Problem(x, w, out)
    return p, aligns


def candidates(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, count: int = 16,
               no_split: bool = True) -> list[tuple[Algo, float]]:
    """cuBLASLt's heuristic algorithms for out = x @ w.T, best first; with no_split
    (the default) only those that use no workspace and report no split-K."""
    p, aligns = problem(x, w, out)
    return p.candidates(_handle(x.device.index), aligns, count, no_split)


def check(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: Algo) -> bool:
    """Whether `algo` runs out = x @ w.T for these shapes and strides with no workspace."""
    p, _ = problem(x, w, out)
    r = _Heuristic()
    status = _lib().cublasLtMatmulAlgoCheck(_handle(x.device.index), p.desc, p.a, p.b, p.d, p.d,
                                           ctypes.byref(algo), ctypes.byref(r))
    return status == 0 and r.workspace == 0


def run(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: Algo) -> torch.Tensor:
    """out = x @ w.T with `algo` (no workspace), on torch's current stream."""
    p, _ = problem(x, w, out)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    _check(_lib().cublasLtMatmul(
        _handle(x.device.index), p.desc, ctypes.byref(p.alpha), w.data_ptr(), p.a, x.data_ptr(), p.b,
        ctypes.byref(p.beta), out.data_ptr(), p.d, out.data_ptr(), p.d, ctypes.byref(algo), None, 0,
        stream), "Matmul")
    return out
