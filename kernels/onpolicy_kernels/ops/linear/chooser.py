"""Which kernel runs a Hopper linear: the Triton table's tile, or a cuBLASLt algorithm that never splits K.

What it guarantees, and how. The Triton kernel (triton_kernels.py) is the reference:
one fp32 dot product per output, K in order, no split-K, so a row's bits do not
depend on M. A cuBLASLt algorithm is only a candidate when it uses no workspace
and reports SPLITK_NUM 1 and no reduction scheme (cublaslt.py), i.e. no split
of K across thread blocks. That filter does not rule out every other order (a
kernel could still split K inside a block), so before an algorithm serves an M
bucket of an [N, K] weight its output is compared with the Triton kernel's by
`torch.equal`, per (algorithm, bucket), at every M of the bucket (an algorithm
serves all of them; one offered for the bucket's upper M may take another
code path at a partial tile), on seeded random operands built to expose
a change of summation order: at least VERIFY_OUTPUTS outputs, half the rows
carrying a large +C/-C pair at k = 0 and k = K-1 that cancels exactly, so every
partial sum between them is rounded on a coarse grid and any other order shows
in the bf16/fp16 output. One that differs is never used (and is logged). On the
H200 every no-split candidate tried gave the Triton bits (2586 runs; on an H100 66088 (algorithm,
M) runs over 13 shapes, benchmarks/RESULTS.md); the check is what carries that to other shapes, GPUs and
cuBLAS versions.

What is chosen is speed only. Per (device, dtype, N, K) and M bucket (about two
per octave, up to TUNE_MAX_ROWS; larger M always run Triton), the first call
times the Triton kernel and the verified candidates on random rows at the
bucket's upper M, and keeps the fastest: GPU time from CUDA-graph replay (host
launch cost left out, as under vLLM's graphs), the weight rotated over copies so
that it streams from HBM as a model's weights do; the fastest few of that round
are timed again, and the least sum of both rounds wins. cuBLAS splits K where M x N has
too few tiles to fill the GPU; its no-split kernels still have more tile shapes
(e.g. non-power-of-two widths) and cluster launches than a Triton kernel can
express, which closes most of the gap at mid M
(benchmarks/linear_cublaslt_experiment.py).

The same kernels in every process: a pick is kept on disk (PickStore, one file per
torch/CUDA/cuBLASLt/Triton versions, keyed by device name, dtype, weight shape and
bucket; ONPOLICY_LINEAR_CACHE names the folder, 0 keeps none), so the timing that
chooses runs once per device and versions, and every later engine start runs what
the first chose -- after verifying it again at every M of its bucket.

Tuning needs a synchronizing comparison, so it never runs inside CUDA-graph
capture: a bucket first seen while capturing runs the Triton kernel (same bits).
`warm_up_rows` gives one M per bucket so the vLLM worker tunes before capture.
On by default on Hopper (sm_90) for bf16/fp16 without bias; ONPOLICY_LINEAR_CUBLASLT=0
turns it off, =1 allows it on other CUDA GPUs (still verified per algorithm).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ... import envs

logger = logging.getLogger("onpolicy_kernels")

ENV = "ONPOLICY_LINEAR_CUBLASLT"
# Largest M the chooser serves; above it the Triton kernel always runs. Measured
# (benchmarks/RESULTS.md): at M = 64-512 the verified no-split algorithms close most
# of the Triton kernel's gap to cuBLAS; at M = 4096-8192 the chooser showed no gain
# (minima 0.88-0.90x of cuBLAS in three runs; the Triton kernel alone 0.88-0.97x).
TUNE_MAX_ROWS = 1024
CANDIDATES = 8  # cuBLASLt heuristic's best no-split algorithms considered per bucket
FINALISTS = 3  # the fastest of the first timing round, timed again before the pick
VERIFY_OUTPUTS = 1 << 18  # outputs compared per (algorithm, bucket), at least (up to 16 probes)
PLANT = 2.0**14  # the +C/-C pair planted in the probe rows (weight columns 0 and K-1 set to 64): |C * 64| = 2**20
DTYPES = (torch.bfloat16, torch.float16)
# Bucket upper bounds: powers of two and their 1.5x, up to TUNE_MAX_ROWS.
BUCKETS = tuple(sorted({1, 2, 3} | {b for p in range(1, 14) for b in (1 << p, 3 << (p - 1)) if b <= TUNE_MAX_ROWS}))


def bucket(m: int) -> int:
    """The upper M of the bucket that M (1..TUNE_MAX_ROWS) falls in."""
    i = bisect.bisect_left(BUCKETS, m)
    if i == len(BUCKETS):
        raise ValueError(f"M={m} is above TUNE_MAX_ROWS={TUNE_MAX_ROWS}: the Triton kernel serves it")
    return BUCKETS[i]


def bucket_rows(m: int) -> range:
    """Every M that the bucket whose upper M is m serves (from the bucket below's upper M + 1)."""
    i = BUCKETS.index(m)
    return range(BUCKETS[i - 1] + 1 if i else 1, m + 1)


def warm_up_rows(max_rows: int) -> list[int]:
    """One M per bucket that 1..max_rows rows can fall in (the bucket's upper M, capped at max_rows)."""
    top = min(max_rows, TUNE_MAX_ROWS)
    if top < 1:
        return []
    return sorted({min(bucket(m), top) for m in [b for b in BUCKETS if b < top] + [top]})


@dataclass
class Choice:
    algo: Any  # a cuBLASLt algorithm, or None for the Triton kernel
    label: str


def _cuda_times(fns: list[Callable[[torch.Tensor], Any]], weights: list[torch.Tensor]) -> list[float]:
    """Milliseconds per call of each fn(w), as the GPU runs it: calls replayed from a CUDA
    graph (so host launch cost, which differs between Triton and cuBLASLt, stays out), the
    weight rotated over `weights` (so it streams from HBM as in a model), the candidates
    replayed in turn for 5 rounds (so a drift of the GPU's clocks hits them alike), median."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphs = []
    for fn in fns:
        for w in weights:
            fn(w)
        start.record()
        fn(weights[0])
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        calls = len(weights) * max(1, min(64, round(2.0 / one)) // len(weights))  # ~2 ms a replay
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            for i in range(calls):
                fn(weights[i % len(weights)])
        graph.replay()
        graphs.append((graph, calls))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(5):
        for i, (graph, calls) in enumerate(graphs):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / calls)
    del graphs
    return [sorted(t)[len(t) // 2] for t in times]


def _timing_weights(w: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
    """w and random copies, together about 3x the L2 cache (at most 16), for timing.
    Drawn from `gen`, never from torch's global RNG (which sampling and dropout use)."""
    if w.device.type != "cuda":
        return [w]
    l2 = getattr(torch.cuda.get_device_properties(w.device), "L2_cache_size", 50 << 20)
    n = max(1, min(16, -(-3 * l2 // max(w.numel() * w.element_size(), 1))))
    return [w] + [torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32).to(w.dtype)
                  for _ in range(n - 1)]


def verification_operands(n: int, k: int, m: int, dtype: torch.dtype, device, gen: torch.Generator,
                          plant: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded random [n, k] weight and probes of m rows (enough for VERIFY_OUTPUTS outputs,
    at most 16). With `plant`, weight columns 0 and k-1 are 64 and every other probe row
    carries +PLANT at k = 0 and -PLANT at k = k-1: exact sum unchanged, but every partial sum
    in between is ~2**20, so a different summation order rounds differently."""
    w = torch.randn(n, k, generator=gen, device=device, dtype=dtype) / k**0.5
    probes = []
    for i in range(min(16, -(-VERIFY_OUTPUTS // (m * n)))):
        x = torch.randn(m, k, generator=gen, device=device, dtype=dtype)
        if plant and k >= 2:
            rows = slice(i % 2, None, 2)
            x[rows, 0] = PLANT
            x[rows, k - 1] = -PLANT
        probes.append(x)
    if plant and k >= 2:
        w[:, 0] = 64.0
        w[:, k - 1] = 64.0
    return w, probes


CACHE_ENV = "ONPOLICY_LINEAR_CACHE"  # a folder for the picks (default ~/.cache/onpolicy), or 0: none kept


class PickStore:
    """The picks kept on disk: one JSON file per (torch, CUDA, cuBLASLt, Triton) versions, one entry per
    (device name, dtype, N, K, bucket). A later process on that device and those versions takes the
    stored pick instead of timing again -- the same kernels in every engine start -- and still
    verifies a stored cuBLASLt algorithm at every M of its bucket before using it (a descriptor
    serialised by one cuBLASLt version is valid for that version only, hence the file per version).
    A store that cannot be read or written is logged once and the chooser times as before."""

    def __init__(self, path: str):
        self.path = path
        self._data: Optional[dict] = None
        self._warned = False

    @classmethod
    def default(cls, versions: str) -> Optional["PickStore"]:
        folder = envs.ONPOLICY_LINEAR_CACHE
        return None if folder is None else cls(os.path.join(folder, f"linear_picks_{versions}.json"))

    def _warn(self, what: str, e: Exception) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("onpolicy: the linear picks file %s could not be %s (%s); picks are timed in this process "
                           "(%s=0 turns the file off)", self.path, what, e, CACHE_ENV)

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            self._warn("read", e)
            return {}

    def get(self, key: str) -> Optional[dict]:
        if self._data is None:
            self._data = self._read()
        v = self._data.get(key)
        return v if isinstance(v, dict) else None

    def put(self, key: str, value: dict) -> None:
        data = self._read()  # another process (a TP rank) may have added picks meanwhile
        data[key] = value
        self._data = data
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a reader sees the old file or the new one
        except OSError as e:
            self._warn("written", e)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Chooser:
    """The per-bucket choice and its caches. `lt` is the cuBLASLt binding (a fake in CPU
    tests); `triton` computes the reference, `timer` times candidate calls, `capturing` says
    whether a CUDA graph is being captured."""

    def __init__(self, lt=None, triton: Optional[Callable] = None, timer: Callable = _cuda_times,
                 capturing: Callable[[], bool] = _capturing, timing_weights: Callable = _timing_weights,
                 store: Optional[PickStore] = None):
        self.lt = lt
        self.store = store
        self.triton = triton
        self.timer = timer
        self.capturing = capturing
        self.timing_weights = timing_weights
        self.buckets: dict[tuple, Choice] = {}
        self.exact: dict[tuple, Any] = {}
        self.verified: dict[tuple, bool] = {}

    def eligible(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
        if bias is not None or x.dtype not in DTYPES or not 1 <= x.shape[0] <= TUNE_MAX_ROWS:
            return False
        for t in (x, w):
            if (t.stride(1) != 1 or t.stride(0) < t.shape[1] or (t.stride(0) * t.element_size()) % 16
                    or t.data_ptr() % 256):
                return False
        return True

    def pick(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> Any:
        """The cuBLASLt algorithm to run out = x @ w.T with, or None: run the Triton kernel."""
        M, K = x.shape
        N = w.shape[0]
        ekey = (x.device, x.dtype, M, N, K, x.stride(0), w.stride(0), out.stride(0))
        if ekey in self.exact:
            return self.exact[ekey]
        bkey = (x.device, x.dtype, N, K, bucket(M))
        choice = self.buckets.get(bkey)
        if choice is None:
            if self.capturing():
                return None  # tune outside capture; meanwhile the Triton kernel (same bits)
            choice = self.buckets[bkey] = self._tune_guarded(w, bucket(M))
        algo = choice.algo
        if algo is not None and not self.lt.check(x, w, out, algo):
            algo = None  # the bucket's algorithm cannot run at this exact shape
        self.exact[ekey] = algo
        return algo

    def label(self, x: torch.Tensor, w: torch.Tensor) -> Optional[str]:
        """What the bucket of x's M runs, once tuned (for benchmark tables)."""
        if not 1 <= x.shape[0] <= TUNE_MAX_ROWS:
            return None
        c = self.buckets.get((x.device, x.dtype, w.shape[0], w.shape[1], bucket(x.shape[0])))
        return c.label if c else None

    def _tune_guarded(self, w: torch.Tensor, m: int) -> Choice:
        """_tune on w's device; a failure is logged and remembered (the Triton kernel serves)."""
        try:
            if w.is_cuda:
                with torch.cuda.device(w.device):
                    return self._stored_or_tuned(w, m)
            return self._stored_or_tuned(w, m)
        except Exception as e:  # noqa: BLE001 - the Triton kernel (the reference bits) serves instead
            logger.warning("onpolicy: tuning the linear for a [%d, %d] weight at M=%d failed (%s); "
                           "the Triton kernel serves that bucket", w.shape[0], w.shape[1], m, e)
            return Choice(None, f"triton (tuning failed: {e})")

    def _stored_or_tuned(self, w: torch.Tensor, m: int) -> Choice:
        """The stored pick of this bucket where there is one and it still verifies, else a new one (stored)."""
        if self.store is None:
            return self._tune(w, m)
        name = torch.cuda.get_device_name(w.device) if w.is_cuda else str(w.device)
        key = f"{name}|{str(w.dtype).removeprefix('torch.')}|{w.shape[0]}x{w.shape[1]}|M<={m}"
        kept = self.store.get(key)
        if kept is not None:
            if kept.get("algo") is None:
                return Choice(None, "triton")
            try:
                algo = self.lt.from_json(kept["algo"])
            except (TypeError, ValueError, KeyError):
                algo = None
            gen = torch.Generator(device=w.device).manual_seed(0)
            # As a tuned pick: verified at every M where it can run (pick checks each exact shape
            # and runs the Triton kernel where it cannot: cuBLASLt's check refuses some algorithms
            # its heuristic offers, e.g. for an LM head on an H100).
            if algo is not None and self._verified(algo, w, m, gen, []):
                return Choice(algo, self.lt.describe(algo))
            logger.warning("onpolicy: the stored linear pick for %s no longer verifies; timing again", key)
        choice = self._tune(w, m)
        self.store.put(key, {"algo": None if choice.algo is None else self.lt.to_json(choice.algo),
                             "label": choice.label})
        return choice

    def _verified(self, algo, w: torch.Tensor, m: int, gen: torch.Generator, operands: list) -> bool:
        """Whether `algo` gives the Triton bits at every M of the bucket whose upper M is m (each M
        it would serve: those where it can run at all). `operands`: the bucket's (probe, weight,
        Triton reference) triples at M = m, built by the first algorithm that needs them and
        shared by the rest; the Triton kernel is row-invariant, so the reference of x[:M] is
        ref[:M]. The comparisons stay on the device (one synchronisation per probe)."""
        N, K = w.shape
        vkey = (w.device, w.dtype, N, K, m, self.lt.identity(algo))
        ok = self.verified.get(vkey)
        if ok is None:
            if not operands:
                wv, probes = verification_operands(N, K, m, w.dtype, w.device, gen)
                operands.extend((x, wv, self.triton(x, wv)) for x in probes)
            differs = torch.zeros((), dtype=torch.bool, device=w.device)
            try:
                for x, wv, ref in operands:
                    out = torch.empty_like(ref)
                    for rows in reversed(bucket_rows(m)):
                        xs, o = x[:rows], out[:rows]
                        if not self.lt.check(xs, wv, o, algo):
                            continue  # that M runs the Triton kernel (pick checks the exact shape)
                        o.fill_(float("nan"))  # an output the algorithm leaves unwritten fails
                        self.lt.run(xs, wv, o, algo)
                        differs |= (o != ref[:rows]).any()
                    if differs:  # one synchronisation per probe: a bad algorithm stops at its first
                        break
                ok = not bool(differs)
            except RuntimeError:
                ok = False
            if not ok:
                logger.warning("onpolicy: cuBLASLt algorithm (%s) gave other bits than the invariant kernel "
                               "for a [%d, %d] weight at some M of the bucket up to M=%d; it is not used",
                               self.lt.describe(algo), N, K, m)
            self.verified[vkey] = ok
        return ok

    def _tune(self, w: torch.Tensor, m: int) -> Choice:
        gen = torch.Generator(device=w.device).manual_seed(0)
        probe = torch.randn(m, w.shape[1], generator=gen, device=w.device, dtype=torch.float32).to(w.dtype)
        out = torch.empty(m, w.shape[0], dtype=w.dtype, device=w.device)
        operands: list = []
        # An algorithm cuBLASLt's check refuses at the bucket's upper M is not timed (the heuristic
        # offers some that the check then refuses, e.g. every LM-head algorithm on an H100).
        algos = [a for a, _waves in self.lt.candidates(probe, w, out)[:CANDIDATES]
                 if self.lt.check(probe, w, out, a) and self._verified(a, w, m, gen, operands)]
        if not algos:
            return Choice(None, "triton")
        fns = [lambda wc: self.triton(probe, wc)]
        fns += [lambda wc, a=algo: self.lt.run(probe, wc, out, a) for algo in algos]
        weights = self.timing_weights(w, gen)
        times = self.timer(fns, weights)
        # A second, separate round for the fastest few: a candidate that led the first round
        # by noise alone (one did on an H200: picked, it then ran 8% slower than its rivals)
        # rarely leads both. The pick is the least sum of the two rounds' medians.
        finalists = sorted(range(len(fns)), key=times.__getitem__)[:FINALISTS]  # at least Triton and one algo
        again = self.timer([fns[j] for j in finalists], weights)
        score = {j: times[j] + t for j, t in zip(finalists, again)}
        i = min(finalists, key=score.__getitem__)
        return Choice(None, "triton") if i == 0 else Choice(algos[i - 1], self.lt.describe(algos[i - 1]))


_CHOOSER: Optional[Chooser] = None


def snapshot() -> dict:
    """This process's choices so far, for a mismatch report: per "NxK dtype @ bucket" the kernel
    that serves it, and a digest of the whole set (two processes with one digest ran the same kernels)."""
    ch = _CHOOSER
    picks = {} if ch is None else {
        f"{n}x{k} {str(dtype).removeprefix('torch.')} @ M<={b}": c.label
        for (_dev, dtype, n, k, b), c in ch.buckets.items()}
    return {"env": envs.ONPOLICY_LINEAR_CUBLASLT, "cublaslt": ch is not None and ch.lt is not None, "picks": picks,
            "digest": hashlib.sha1(json.dumps(picks, sort_keys=True).encode()).hexdigest()[:12]}


def enabled(device: torch.device, hopper: bool) -> bool:
    flag = envs.ONPOLICY_LINEAR_CUBLASLT  # None: unset
    if device.type != "cuda" or flag is False:
        return False
    return hopper or flag is True


def chooser(triton: Callable) -> Optional[Chooser]:
    """The process's chooser, or None where libcublasLt cannot be loaded (logged once)."""
    global _CHOOSER
    if _CHOOSER is None:
        from . import cublaslt as _cublaslt

        try:
            _cublaslt._lib()
        except (OSError, RuntimeError, AttributeError) as e:
            logger.warning("onpolicy: cuBLASLt unavailable (%s); linear runs the Triton kernel only", e)
            _CHOOSER = Chooser(None, triton)
        else:
            _CHOOSER = Chooser(_cublaslt, triton, store=PickStore.default(_cublaslt.versions()))
    return _CHOOSER if _CHOOSER.lt is not None else None
