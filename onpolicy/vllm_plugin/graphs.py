"""CUDA graphs for the two ops a vLLM decode step runs eagerly after its model's graph: the LM
head and the sampler's log-softmax.

vLLM replays the decoder as one CUDA graph, then calls the LM head and the sampler in
Python at every step. At a rollout's long tail (8 sequences) the engine is host-bound,
and onpolicy's head and log-softmax cost 125-168 us of host time per step (Triton's
launch path, three launches) where the default engine's cuBLAS head costs 17-33 us
(benchmarks/bench_host_overhead.py). Replaying them from a graph costs one copy of the
inputs and one graph launch.

`RowGraphs(fn)` runs `fn(*rows, *extra)` from a CUDA graph captured for the smallest
bucket (1, 2, 4, ..., MAX_ROWS) that holds the call's m rows: the rows are copied into
the graph's static inputs, the graph is replayed, and the first m rows of its static
output are returned. Rows past m hold whatever an earlier call left there. That changes
no bits: every onpolicy kernel is batch-invariant (a row's result depends on that row
only, never on the other rows or their number), and tests/gpu/test_decode_graphs.py
checks the graphs' rows against eager calls bitwise, at every row count of every bucket.

What is not graphed (runs eagerly, as before): more than MAX_ROWS rows, a call needing
autograd, a call made while a CUDA graph is being captured (vLLM's own capture), CPU
tensors, and any argument `RowGraphs` cannot key. A failed capture is logged and that
key runs eagerly from then on.

Memory: the buckets share their static buffers. A `RowGraphs` keeps one static input per
argument position (dtype, row shape) and, given `into` (a form of fn that writes into a given
tensor), one static output per argument kinds, each of the largest bucket's rows; a bucket's
graph reads and writes their first rows. All its graphs capture into one memory pool (their
scratch: only one replays at a time). At 256 rows and a 151936-token vocabulary the head's
and sampler's graphs hold 0.44 GiB by count (1.01 GiB with buffers per bucket), and the worker takes
them out of the KV cache's share of `gpu_memory_utilization` (`planned_bytes`), so the engine
stays inside its budget.

The returned tensor is a view of the graph's static output: it stays valid until the
next call of the same `RowGraphs` with the same argument kinds (any bucket). vLLM's model
runner V2 consumes the logits and the sampler's log-probabilities within the step (its
logprobs are gathered into new tensors), so the graphs are installed there only
(`wanted`), and not with speculative decoding (draft logits are kept across steps),
`enforce_eager`, or `ONPOLICY_DECODE_GRAPHS=0`.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import torch
from onpolicy_kernels import envs

logger = logging.getLogger("vllm.onpolicy")

MAX_ROWS = envs.DECODE_GRAPH_MAX_ROWS  # decode batches up to this many rows can run from graphs; larger ones eagerly
ENV = "ONPOLICY_DECODE_GRAPHS"  # 0: the head and sampler run eagerly
ROWS_ENV = "ONPOLICY_DECODE_GRAPH_ROWS"  # fewer rows (1..MAX_ROWS): fewer graphs, less memory


def bucket(m: int) -> int:
    """The padded row count a call of m rows (1 <= m <= MAX_ROWS) replays: the next power of two."""
    if m < 1:
        raise ValueError(f"bucket of {m} rows")
    return 1 << (m - 1).bit_length()


def buckets(max_rows: int) -> list[int]:
    """Every bucket a call of 1..max_rows rows can use (max_rows capped at MAX_ROWS)."""
    top = min(max_rows, MAX_ROWS)
    return [1 << i for i in range(bucket(top).bit_length())] if top >= 1 else []


def env_enabled() -> bool:
    return envs.ONPOLICY_DECODE_GRAPHS


def max_rows_from_env() -> int:
    return envs.ONPOLICY_DECODE_GRAPH_ROWS


def wanted(vllm_config, device, flavour: str) -> tuple[bool, str]:
    """(whether to graph the head and sampler, why not). `flavour` is the sampler's (compat.sampler_flavour)."""
    if not env_enabled():
        return False, f"{ENV}=0"
    if torch.device(device).type != "cuda":
        return False, "not a CUDA device"
    if flavour != "v2_026":
        return False, f"sampler layout {flavour!r} (graphs only with model runner V2)"
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enforce_eager", False):
        return False, "enforce_eager"
    if getattr(vllm_config, "speculative_config", None) is not None:
        return False, "speculative decoding (draft logits live across steps)"
    return True, ""


def _key_of(a):
    """What a captured graph assumes about one argument; None when it cannot be keyed."""
    if isinstance(a, torch.Tensor):  # an extra tensor is baked into the graph by address
        return ("t", a.data_ptr(), a.dtype, tuple(a.shape), a.stride(), a.device)
    if isinstance(a, (bool, int, float, type(None))):
        return ("c", type(a), a)
    return None


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs, output):
        self.graph, self.inputs, self.output = graph, inputs, output


class RowGraphs:
    """`fn(*rows, *extra)` replayed from CUDA graphs captured per row bucket (see the module docstring).

    rows: CUDA tensors whose first dimension is the call's m rows (copied into the graph's
    static inputs at every call); extra: values baked into the graph (floats, or tensors by
    address -- e.g. a weight loaded in place), part of the key.
    """

    def __init__(self, fn: Callable, name: str, max_rows: int = MAX_ROWS, into: Callable | None = None):
        self.fn = fn
        self.into = into  # into(*rows, *extra, out): fn's result written into out (same bits), or None
        self.name = name
        self.max_rows = min(max_rows, MAX_ROWS)
        self._graphs: dict = {}
        self._inputs: dict = {}  # (position, dtype, row shape, device) -> static rows of the largest bucket
        self._outputs: dict = {}  # a key without its bucket -> static output rows of the largest bucket
        self._pool = None  # one memory pool for every graph's scratch
        self.captures = 0
        self.replays = 0
        self.warmed = False  # set once warm_up has captured every bucket: later captures are logged
        self.paused = False  # True: every call runs eagerly (vLLM's memory profiling: see worker.py)

    def _key(self, rows, extra):
        x = rows[0]
        if not isinstance(x, torch.Tensor) or not x.is_cuda:
            return None
        m = x.shape[0]
        if not 0 < m <= self.max_rows:
            return None
        key = [bucket(m), x.device]
        for r in rows:
            if not isinstance(r, torch.Tensor) or r.shape[0] != m or r.device != x.device:
                return None
            key.append((r.dtype, tuple(r.shape[1:])))
        for e in extra:
            k = _key_of(e)
            if k is None:
                return None
            key.append(k)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*rows, *extra) if isinstance(t, torch.Tensor)):
            return None  # autograd needs the eager call
        return tuple(key)

    def __call__(self, *rows, extra: tuple = ()):
        key = None if self.paused else self._key(rows, extra)
        if key is None or torch.cuda.is_current_stream_capturing():
            return self.fn(*rows, *extra)
        g = self._graphs.get(key)
        if g is None:
            for old in [k for k in self._graphs if stale(k, key)]:
                del self._graphs[old]  # an extra tensor (a weight) now lives elsewhere: its graphs are dead
            self._forget_dropped()
            g = self._graphs[key] = self._capture(key, rows, extra)
        if g is False:  # its capture failed: eager
            return self.fn(*rows, *extra)
        m = rows[0].shape[0]
        for static, r in zip(g.inputs, rows):
            static[:m].copy_(r)
        g.graph.replay()
        self.replays += 1
        return g.output[:m]

    def _forget_dropped(self) -> None:
        """After graphs were dropped: their static outputs go, and where no graph is left, the memory
        pool too (PyTorch frees a pool whose last graph went; capturing into its handle again trips the
        caching allocator's assert `use_count > 0` -- seen on an H100, PyTorch 2.11)."""
        live = {k[1:] for k in self._graphs}
        for k in [k for k in self._outputs if k not in live]:
            del self._outputs[k]
        if not any(isinstance(g, _Graph) for g in self._graphs.values()):
            self._pool = None

    def _static(self, table: dict, key, row_shape: tuple, dtype, device, fill) -> torch.Tensor:
        """The largest bucket's static rows for `key` in `table` (made on first use)."""
        buf = table.get(key)
        if buf is None:
            with torch.inference_mode(False):  # plain tensors: copied into under any mode
                buf = table[key] = fill((bucket(self.max_rows),) + tuple(row_shape), dtype=dtype, device=device)
        return buf

    def _capture(self, key: tuple, rows, extra):
        b = key[0]
        if len(self._graphs) >= 64:  # e.g. extra tensors at new addresses each time: keep the newest only
            self._graphs.clear()
            self._forget_dropped()
        device = rows[0].device
        try:
            inputs = tuple(self._static(self._inputs, (i, r.dtype, tuple(r.shape[1:]), r.device), r.shape[1:],
                                        r.dtype, device, torch.ones)[:b] for i, r in enumerate(rows))
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.stream(side):
                ref = self.fn(*inputs, *extra)  # compiles and tunes (never inside the capture)
            out = None
            if self.into is not None and isinstance(ref, torch.Tensor) and ref.shape[:1] == (b,):
                # on the caller's stream, where the output is read (a block freed later goes back to it)
                out = self._static(self._outputs, key[1:], ref.shape[1:], ref.dtype, device, torch.empty)[:b]
                side.wait_stream(current)
            del ref
            with torch.cuda.stream(side):
                if out is not None:
                    self.into(*inputs, *extra, out=out)  # likewise for the form that writes into out
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    if out is None:
                        output = self.fn(*inputs, *extra)
                    else:
                        self.into(*inputs, *extra, out=out)
                        output = out
                finally:
                    graph.capture_end()
            current.wait_stream(side)
        except Exception as e:  # noqa: BLE001 -- logged; the key runs eagerly (same bits, slower)
            logger.warning("onpolicy: could not capture a CUDA graph of %s for %d rows (%s: %s); it runs eagerly",
                           self.name, b, type(e).__name__, e)
            return False
        if not isinstance(output, torch.Tensor) or output.shape[:1] != (b,):
            raise TypeError(f"{self.name}: a graphed function must return one tensor of {b} rows")
        self.captures += 1
        if self.warmed:
            logger.info("onpolicy: captured a CUDA graph of %s for %d rows while serving (a kind the warm-up did "
                        "not cover)", self.name, b)
        return _Graph(graph, inputs, output)


def stale(old: tuple, new: tuple) -> bool:
    """Whether graph key `old` baked in a tensor that `new` has moved: the same argument kinds (any
    bucket: every bucket's graph of the old tensor is dead), an extra tensor of the same dtype, shape
    and device at another address."""
    if len(old) != len(new) or old[1] != new[1]:
        return False
    moved = False
    for a, b in zip(old[2:], new[2:]):
        if a == b:
            continue
        if not (isinstance(a, tuple) and isinstance(b, tuple) and a[:1] == b[:1] == ("t",)
                and a[2:] == b[2:] and a[1] != b[1]):
            return False
        moved = True
    return moved


def capture_buckets(graphs: RowGraphs, make_rows: Callable[[int], tuple], extra: tuple = ()) -> None:
    """Capture `graphs` for every bucket (rows from make_rows(b))."""
    for b in buckets(graphs.max_rows):
        graphs(*make_rows(b), extra=extra)


def logits_processors(model) -> list:
    """The model's OnpolicyLogitsProcessor modules (the LM head's caller)."""
    from .linear import classes

    return [m for m in model.modules() if isinstance(m, classes()["OnpolicyLogitsProcessor"])]


def installed(runner, model) -> list:
    """The RowGraphs `install` gave this worker: the LM head's (where it has them), then the sampler's."""
    from . import compat

    held = [getattr(p, "_onpolicy_graphs", None) for p in logits_processors(model)]
    held.append(getattr(compat.runner_sampler(runner), "_onpolicy_graphs", None))
    return [g for g in held if g is not None]


def install(runner, model, vllm_config) -> str:
    """Give the model's LM head (its OnpolicyLogitsProcessor) and the runner's sampler their
    RowGraphs where `wanted`; returns why not otherwise ("" when installed)."""
    from onpolicy_kernels.ops.linear import linear_into
    from onpolicy_kernels.ops.logprobs import log_softmax_into

    from . import compat
    from .linear import _linear
    from .sampler import _log_softmax

    sampler = compat.runner_sampler(runner)
    procs = logits_processors(model)
    if sampler is None or not procs:
        return "no sampler or logits processor in this worker"
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    ok, why = wanted(vllm_config, device, compat.sampler_flavour(sampler))
    if not ok:
        return why
    max_rows = min(max_rows_from_env(),
                   getattr(getattr(vllm_config, "scheduler_config", None), "max_num_seqs", MAX_ROWS) or MAX_ROWS)
    for p in procs:
        # An fp32 head_dtype under a bf16 model runs the head eagerly (a cast first): no head graphs.
        if getattr(p, "head_dtype", None) in (None, param.dtype):
            p._onpolicy_graphs = RowGraphs(functools.partial(_linear, bias=None), "the LM head", max_rows,
                                           into=linear_into)
    sampler._onpolicy_graphs = RowGraphs(_log_softmax, "the sampler's log-softmax", max_rows, into=log_softmax_into)
    return ""


class WarmUp:
    """What `warm_up` captures for one worker: the head's graphs on [b, K] rows of the weight's dtype
    (where installed), the log-softmax's on logits of the head's dtype (or head_dtype) over the
    processor's vocabulary, with a float temperature (every request at 0 or 1) and with per-row ones."""

    def __init__(self, head_graphs, soft: RowGraphs, weight: torch.Tensor, vocab: int, logits_dtype):
        self.head_graphs, self.soft, self.w, self.vocab, self.logits_dtype = head_graphs, soft, weight, vocab, logits_dtype

    @classmethod
    def of(cls, runner, model):
        """The worker's, or None where `install` gave it no graphs."""
        from . import compat

        soft = getattr(compat.runner_sampler(runner), "_onpolicy_graphs", None)
        procs = logits_processors(model)
        head = getattr(model, "lm_head", None)
        if soft is None or not procs or head is None:
            return None
        w = head.weight
        return cls(getattr(procs[0], "_onpolicy_graphs", None), soft, w,
                   getattr(procs[0], "org_vocab_size", None) or w.shape[0],
                   getattr(procs[0], "head_dtype", None) or w.dtype)

    @property
    def held(self) -> list:
        return [g for g in (self.head_graphs, self.soft) if g is not None]

    def planned_bytes(self) -> int:
        """What the static buffers will hold once `capture` ran: per RowGraphs, one input per argument
        position and one output per argument kinds, each of its largest bucket's rows."""
        w, total = self.w, 0
        if self.head_graphs is not None:
            rows = bucket(self.head_graphs.max_rows)
            total += rows * (w.shape[1] + w.shape[0]) * w.element_size()
        rows = bucket(self.soft.max_rows)
        total += rows * (self.vocab * self.logits_dtype.itemsize + 4)  # the logits and per-row temperatures
        return total + 2 * rows * self.vocab * 4  # fp32 log-probabilities, float and per-row temperature

    def capture(self) -> None:
        w, dev = self.w, self.w.device
        with torch.inference_mode():
            if self.head_graphs is not None:
                capture_buckets(self.head_graphs, lambda b: (torch.zeros(b, w.shape[1], dtype=w.dtype, device=dev),),
                                extra=(w,))
            logits = lambda b: torch.zeros(b, self.vocab, dtype=self.logits_dtype, device=dev)  # noqa: E731
            capture_buckets(self.soft, lambda b: (logits(b),), extra=(1.0,))
            capture_buckets(self.soft, lambda b: (logits(b), torch.ones(b, dtype=torch.float32, device=dev)))
        for g in self.held:
            g.warmed = True


def planned_bytes(runner, model) -> int:
    """Bytes `warm_up` will keep in the graphs' static buffers (0 where none are installed): the
    worker takes them out of the KV cache's budget before vLLM sizes it."""
    plan = WarmUp.of(runner, model)
    return plan.planned_bytes() if plan is not None else 0


def warm_up(runner, model) -> None:
    """Capture every bucket's graphs before the engine serves (else the first decode step of a
    bucket pays its capture), if `install` gave them (see `WarmUp`)."""
    plan = WarmUp.of(runner, model)
    if plan is None:
        return  # graphs not installed (`wanted` said why in the load log)
    held = plan.held
    start = time.perf_counter()
    before = sum(g.captures for g in held)
    plan.capture()
    total = sum(g.captures for g in held)
    logger.info("onpolicy: %d CUDA graphs of the %s (%d captured by this warm-up, %.2f s; buckets up to %d rows; "
                "their static buffers hold %.2f GiB, taken out of the KV cache's share of gpu_memory_utilization; "
                "%s=N for fewer rows)", total,
                "LM head and sampler" if plan.head_graphs is not None else "sampler (the fp32 head runs eagerly)",
                total - before, time.perf_counter() - start, plan.soft.max_rows,
                sum(graph_bytes(g) for g in held) / 2**30, ROWS_ENV)


def graph_bytes(graphs: RowGraphs) -> int:
    """Bytes of the static inputs and outputs `graphs` holds (what stays allocated between replays),
    each buffer counted once (the buckets' graphs hold views of shared ones)."""
    sizes = {}
    for g in graphs._graphs.values():
        if g:
            for t in (*g.inputs, g.output):
                base = t._base if t._base is not None else t
                sizes[base.data_ptr()] = base.numel() * base.element_size()
    return sum(sizes.values())
