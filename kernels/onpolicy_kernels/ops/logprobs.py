"""Batch-invariant log-softmax and sampled-token logprobs, in fp32.

    log_softmax(logits, temperature=1.0)                 -> fp32 [..., V]
    token_logprobs(logits, token_ids, temperature=1.0)   -> fp32 [...]

With x = fp32(logits) / temperature (an IEEE division; temperature is a float
or one value per row), m = max(x) and s = sum(exp(x - m)):

    log_softmax(x)_i = (x_i - m) - log(s)

This is what vLLM's sampler calls *processed* logprobs (temperature applied),
and token_logprobs gives exactly the bits of log_softmax(...)[token]. Both the
vLLM adapter and the trainer call these ops, so their logprobs are equal.

Guarantee: a row's output bits depend only on that row (and its temperature),
never on how many rows share the call or where the row sits. CPU: fixed
pairwise trees and chunked exp/log (kernels/onpolicy_kernels/_cpu.py). Backward: standard.

GPU: the vocabulary is cut into chunks of CHUNK_STEPS x BLOCK columns, a size
set by V alone. Per chunk c, one pass gives (m_c, s_c): an online max/sum per
lane, lanes combined in an explicit pairwise tree (not tl.sum, whose order follows
the register layout and with it the logits' dtype: a row's bits are the same
whether its logits come as bf16 or as the same values in fp32). Then m = max_c m_c and
s = sum over c, in chunk order, of s_c * exp(m_c - m) (`_row_lse`). Two
launches compute exactly those operations, so they give the same bits:

  * "rows" (many rows): one program per row walks its chunks, then writes the
    row (log_softmax) or reads its token (token_logprobs) -- the row is still
    in L2 for the second read;
  * "split" (`split_launch`: up to SPLIT_MAX_ROWS rows; token_logprobs
    always): one program per (row, chunk) for the statistics, then one per
    (row, chunk) for the writes, so a handful of rows still spreads over the
    whole GPU (decode: 8 rows of 151936).

Which launch runs depends on the number of rows, but the bits do not
(tests/gpu/test_ops_gpu.py and the interpreter tests run both).
"""
from __future__ import annotations

from typing import Union

import torch

from .._cpu import chunked, tree_max, tree_sum
from .._dispatch import call, check_float, check_out, custom_op, rows, shaped, use_triton
from .._triton import HAS_TRITON, require_triton, tl, triton

ROWS_PER_CALL = 64  # CPU: bound the fp32 temporaries; rows are independent anyway.
VOCAB_BLOCK = 4096  # GPU: columns of one program step.
CHUNK_STEPS = 4  # GPU: steps per vocab chunk (16384 columns: 10 chunks at V = 151936).
SPLIT_MAX_ROWS = 1024  # GPU: log_softmax's split launch up to this many rows (token_logprobs: always).

if HAS_TRITON:

    @triton.jit
    def _lane_stats(x_ptr, row, sx, t, v_start, v_stop, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        # One pass over columns [v_start, v_stop) of the row: each lane keeps a running
        # max and a sum of exp(x - max) rescaled whenever its max grows (online softmax);
        # the lanes are combined at the end by one fixed reduction tree. The order
        # depends only on the range and BLOCK, never on the other rows. -> (max, sum)
        cols = tl.arange(0, BLOCK)
        mvec = tl.full((BLOCK,), float("-inf"), tl.float32)
        svec = tl.zeros((BLOCK,), tl.float32)
        for v0 in range(v_start, v_stop, BLOCK):
            x = tl.load(x_ptr + row * sx + v0 + cols, mask=v0 + cols < v_stop,
                        other=float("-inf")).to(tl.float32) / t
            m_new = tl.maximum(mvec, x)
            live = m_new > float("-inf")
            scale = tl.where(live, tl.exp(mvec - m_new), 0.0)
            svec = svec * scale + tl.where(live, tl.exp(x - m_new), 0.0)
            mvec = m_new
        m = tl.max(mvec, axis=0)  # a max is exact in any order
        s = tl.where(mvec > float("-inf"), svec * tl.exp(mvec - m), 0.0)
        # The lanes' sum as an explicit pairwise tree (s[:h] + s[h:], halving), not tl.sum: tl.sum's
        # order follows the register layout, which the compiler picks from the load -- 8 bf16 or 4
        # fp32 logits per thread -- so the same values stored as bf16 and as fp32 (vLLM's V1 sampler
        # casts the LM head's bf16 logits to fp32; the trainer passes them as they are) were summed
        # in two orders: 1-ulp logprob differences on an H100 (Qwen3-MoE in vLLM 0.26).
        for _ in tl.static_range(LOG2_BLOCK):
            s = tl.sum(tl.reshape(s, (2, s.shape[0] // 2)), axis=0)
        tl.static_assert(s.shape[0] == 1, "LOG2_BLOCK must be log2(BLOCK): the tree has to reach one lane")
        return m, tl.sum(s, axis=0)  # one element left

    @triton.jit
    def _chunk_stats(x_ptr, row, sx, t, c, V, BLOCK: tl.constexpr, STEPS: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        start = c * (STEPS * BLOCK)
        return _lane_stats(x_ptr, row, sx, t, start, tl.minimum(start + STEPS * BLOCK, V), BLOCK, LOG2_BLOCK)

    @triton.jit
    def _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C: tl.constexpr):
        # (m, log s) of a row from its chunks' (m_c, s_c): the one combine both launches use.
        cs = tl.arange(0, BLOCK_C)
        m = tl.max(tl.load(pm_ptr + row * C + cs, mask=cs < C, other=float("-inf")), axis=0)
        s = 0.0
        for c in range(C):  # in chunk order: one fixed sequence of fp32 additions
            mc = tl.load(pm_ptr + row * C + c)
            sc = tl.load(ps_ptr + row * C + c)
            s += tl.where(mc > float("-inf"), sc * tl.exp(mc - m), 0.0)
        return m, tl.log(s)

    @triton.jit
    def _row_stats(x_ptr, row, V, sx, t, pm_ptr, ps_ptr, C,
                   BLOCK: tl.constexpr, STEPS: tl.constexpr, BLOCK_C: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        # "rows" launch: this program computes every chunk of its row, then combines them
        # through the same partials buffer as the split launch.
        for c in range(C):
            m_c, s_c = _chunk_stats(x_ptr, row, sx, t, c, V, BLOCK, STEPS, LOG2_BLOCK)
            tl.store(pm_ptr + row * C + c, m_c)
            tl.store(ps_ptr + row * C + c, s_c)
        tl.debug_barrier()  # the partials, stored by some threads, are read back by all
        return _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C)

    @triton.jit
    def _stats_kernel(x_ptr, t_ptr, pm_ptr, ps_ptr, V, sx, C, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                      LOG2_BLOCK: tl.constexpr):
        # "split" launch, pass 1: program (row, chunk).
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        m_c, s_c = _chunk_stats(x_ptr, row, sx, tl.load(t_ptr + row), c, V, BLOCK, STEPS, LOG2_BLOCK)
        tl.store(pm_ptr + row * C + c, m_c)
        tl.store(ps_ptr + row * C + c, s_c)

    @triton.jit
    def _write_cols(x_ptr, o_ptr, row, sx, so, t, m, lse, v_start, v_stop, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        for v0 in range(v_start, v_stop, BLOCK):
            mask = v0 + cols < v_stop
            x = tl.load(x_ptr + row * sx + v0 + cols, mask=mask, other=0.0).to(tl.float32) / t
            tl.store(o_ptr + row * so + v0 + cols, (x - m) - lse, mask=mask)

    @triton.jit
    def _token_value(x_ptr, id_ptr, o_ptr, row, sx, t, m, lse):
        tok = tl.load(id_ptr + row).to(tl.int64)
        x = tl.load(x_ptr + row * sx + tok).to(tl.float32) / t
        tl.store(o_ptr + row, (x - m) - lse)

    @triton.jit
    def _log_softmax_kernel(x_ptr, t_ptr, pm_ptr, ps_ptr, o_ptr, V, sx, so, C,
                            SPLIT: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr, BLOCK_C: tl.constexpr,
                            LOG2_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr + row)
        if SPLIT:  # pass 2 of the split launch: program (row, chunk) writes its chunk
            m, lse = _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C)
            start = tl.program_id(1) * (STEPS * BLOCK)
            _write_cols(x_ptr, o_ptr, row, sx, so, t, m, lse, start, tl.minimum(start + STEPS * BLOCK, V), BLOCK)
        else:
            m, lse = _row_stats(x_ptr, row, V, sx, t, pm_ptr, ps_ptr, C, BLOCK, STEPS, BLOCK_C, LOG2_BLOCK)
            _write_cols(x_ptr, o_ptr, row, sx, so, t, m, lse, 0, V, BLOCK)

    @triton.jit
    def _token_logprobs_kernel(x_ptr, t_ptr, id_ptr, pm_ptr, ps_ptr, o_ptr, V, sx, C,
                               SPLIT: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
                               BLOCK_C: tl.constexpr, LOG2_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(t_ptr + row)
        if SPLIT:  # pass 2 of the split launch: the statistics are in the partials already
            m, lse = _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C)
        else:
            m, lse = _row_stats(x_ptr, row, V, sx, t, pm_ptr, ps_ptr, C, BLOCK, STEPS, BLOCK_C, LOG2_BLOCK)
        _token_value(x_ptr, id_ptr, o_ptr, row, sx, t, m, lse)


def split_launch(rows: int) -> bool:
    """Whether GPU log_softmax uses the split launch for this many rows (the bits are the same).
    Measured before the lanes' explicit tree (which made the rows launch slower: an H100, bf16, 2048
    rows, 1078 -> 1604 us), so the threshold is to be re-picked. H200, fp32 logits of 151936:
    split/rows time 0.49x at 128 rows, 0.92x at 512, 0.96x at 2048; bf16 at 2048-4096 rows:
    1.04-1.07x. token_logprobs (one value per row) always splits: 0.30-0.88x (fp32 and bf16, 128-4096
    rows)."""
    return rows <= SPLIT_MAX_ROWS


def _gpu_setup(logits, temperature, split: bool):
    """(the kernels' tile arguments, chunks, partials m, partials s) for the GPU kernels; with `split`,
    runs the split launch's statistics pass."""
    M, V = logits.shape
    block = min(VOCAB_BLOCK, triton.next_power_of_2(V))
    tiles = dict(BLOCK=block, STEPS=CHUNK_STEPS, LOG2_BLOCK=block.bit_length() - 1)
    C = triton.cdiv(V, block * CHUNK_STEPS)
    pm = torch.empty(M, C, dtype=torch.float32, device=logits.device)
    ps = torch.empty_like(pm)
    if split:
        _stats_kernel[(M, C)](logits, temperature, pm, ps, V, logits.stride(0), C, **tiles, num_warps=8)
    return tiles, C, pm, ps


def _cpu_rows(logits, temperature):
    """(x, m, log s) for a block of rows on the CPU path."""
    x = logits.float() / temperature[:, None]
    m = tree_max(x)
    s = tree_sum(chunked(torch.exp, x - m))
    return x, m, chunked(torch.log, s)


def _unit_stride(t):
    """The GPU kernels address the vocab with stride 1."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _log_softmax_impl(logits, temperature, split=None, out=None):
    M, V = logits.shape
    if out is None:
        out = torch.empty(M, V, dtype=torch.float32, device=logits.device)
    if M == 0:
        return out
    if use_triton(logits):
        require_triton()
        logits = _unit_stride(logits)
        split = split_launch(M) if split is None else split
        tiles, C, pm, ps = _gpu_setup(logits, temperature, split)
        _log_softmax_kernel[(M, C) if split else (M,)](
            logits, temperature, pm, ps, out, V, logits.stride(0), out.stride(0), C, SPLIT=split, **tiles,
            BLOCK_C=triton.next_power_of_2(C), num_warps=8)
        return out
    for r in range(0, M, ROWS_PER_CALL):
        x, m, ls = _cpu_rows(logits[r : r + ROWS_PER_CALL], temperature[r : r + ROWS_PER_CALL])
        out[r : r + ROWS_PER_CALL] = (x - m) - ls
    return out


def _token_logprobs_impl(logits, token_ids, temperature, split=None):
    M, V = logits.shape
    out = torch.empty(M, dtype=torch.float32, device=logits.device)
    if M == 0:
        return out
    if use_triton(logits):
        require_triton()
        logits = _unit_stride(logits)
        split = True if split is None else split  # always, unless a test asks for the rows launch
        tiles, C, pm, ps = _gpu_setup(logits, temperature, split)
        _token_logprobs_kernel[(M,)](
            logits, temperature, token_ids, pm, ps, out, V, logits.stride(0), C, SPLIT=split, **tiles,
            BLOCK_C=triton.next_power_of_2(C), num_warps=1 if split else 8)
        return out
    for r in range(0, M, ROWS_PER_CALL):
        x, m, ls = _cpu_rows(logits[r : r + ROWS_PER_CALL], temperature[r : r + ROWS_PER_CALL])
        ids = token_ids[r : r + ROWS_PER_CALL].long()[:, None]
        out[r : r + ROWS_PER_CALL] = ((x.gather(1, ids) - m) - ls)[:, 0]
    return out


def _check_values(temperature, token_ids=None, V=0):
    """Value checks, inside the ops so they run eagerly also under torch.compile; skipped on
    the GPU, where they would cost a host sync."""
    if not temperature.is_cuda and temperature.numel() and not bool((temperature > 0).all()):
        raise ValueError("every temperature must be > 0; for greedy sampling use 1.0 as vLLM does")
    if token_ids is not None and token_ids.numel() and not token_ids.is_cuda:
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= V:
            raise ValueError(f"token id out of range [0, {V})")


@custom_op("onpolicy::log_softmax", mutates_args=())
def _log_softmax_op(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    _check_values(temperature)
    return _log_softmax_impl(logits, temperature)


@_log_softmax_op.register_fake
def _(logits, temperature):
    return logits.new_empty(logits.shape, dtype=torch.float32)


@custom_op("onpolicy::token_logprobs", mutates_args=())
def _token_logprobs_op(logits: torch.Tensor, token_ids: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    _check_values(temperature, token_ids, logits.shape[-1])
    return _token_logprobs_impl(logits, token_ids, temperature)


@_token_logprobs_op.register_fake
def _(logits, token_ids, temperature):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _setup_ls(ctx, inputs, output):
    ctx.save_for_backward(output, inputs[1])
    ctx.dtype = inputs[0].dtype


def _backward_ls(ctx, g):
    out, t = ctx.saved_tensors
    gx = (g - out.exp() * g.sum(-1, keepdim=True)) / t[:, None]
    return gx.to(ctx.dtype), None


_log_softmax_op.register_autograd(_backward_ls, setup_context=_setup_ls)


def _setup_tok(ctx, inputs, output):
    logits, ids, t = inputs
    ctx.save_for_backward(logits, ids, t)


def _backward_tok(ctx, g):
    logits, ids, t = ctx.saved_tensors
    p = torch.softmax(logits.float() / t[:, None], dim=-1)
    gx = -p * g[:, None]
    gx.scatter_add_(1, ids.long()[:, None], g[:, None].float())
    return (gx / t[:, None]).to(logits.dtype), None, None


_token_logprobs_op.register_autograd(_backward_tok, setup_context=_setup_tok)


def _temperature_rows(temperature: Union[float, torch.Tensor], rows: int, device) -> torch.Tensor:
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(rows)
        if t.numel() != rows:
            raise ValueError(f"temperature has {t.numel()} values for {rows} rows; give one float or one per row")
        return t.contiguous()
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0 (got {t}); for greedy sampling use 1.0 as vLLM does")
    return torch.full((rows,), t, dtype=torch.float32, device=device)


def log_softmax(logits: torch.Tensor, temperature: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """fp32 log_softmax(fp32(logits) / temperature) over the last dim (see module docstring)."""
    check_float("logits", logits)
    x = rows(logits)
    t = _temperature_rows(temperature, x.shape[0], logits.device)
    return shaped(call(_log_softmax_op, x, t), logits.shape)


def log_softmax_into(logits: torch.Tensor, temperature: Union[float, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits, temperature)` written into `out` and returned: logits [M, V], out fp32
    [M, V] with contiguous rows (e.g. the first M rows of a larger buffer, as a CUDA graph's static
    output). The same bits as `log_softmax`, whatever `out` is a view of. Not differentiable."""
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"log_softmax_into takes logits [M, V], got shape {tuple(logits.shape)}")
    M, V = logits.shape
    check_out(out, (M, V), torch.float32, logits.device)
    t = _temperature_rows(temperature, M, logits.device)
    _check_values(t)
    return _log_softmax_impl(logits, t, out=out)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature)[..., token_ids], bitwise equal to indexing `log_softmax`."""
    check_float("logits", logits)
    if token_ids.shape != logits.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}")
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_ids must be int32/int64, got {token_ids.dtype}")
    x = rows(logits)
    ids = token_ids.reshape(-1).to(logits.device)
    t = _temperature_rows(temperature, x.shape[0], logits.device)
    return shaped(call(_token_logprobs_op, x, ids.contiguous(), t), token_ids.shape)
