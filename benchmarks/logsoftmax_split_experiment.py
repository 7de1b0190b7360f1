"""Experiment (not shipped): log-softmax with each row split over several programs, for issue 12.

    python3 benchmarks/logsoftmax_split_experiment.py [--ms 1,8,64,256,2048]
    TRITON_INTERPRET=1 python3 benchmarks/logsoftmax_split_experiment.py --check   # bits, on a CPU

The shipped kernels (kernels/logprobs.py) run one program per row: at the
sampler's M = 256 rows of V = 151936 they reach 47% of copy bandwidth, and the
vLLM profile put them at 14 ms of a 256 x 128 run that the default sampler does
not spend. Splitting a row stays batch-invariant when the split is fixed by V:

  stats:  program (row, c) walks vocab chunk c (CHUNK = PARTS_BLOCK steps of BLOCK)
          with the shipped online per-lane max/sum, lanes folded by one fixed tree
          -> (m_c, s_c)
  lse:    m = max_c m_c;  s = sum over c in order of s_c * exp(m_c - m);  lse = log(s)
          (every consumer recomputes it from the same partials, in the same order)
  write:  program (row, c) writes (x - m) - lse over chunk c      (log_softmax)
  gather: program row reads its token                              (token_logprobs)

so token_logprobs == log_softmax[token] bitwise, and a row's bits do not depend on
the other rows. They differ from the shipped kernels' bits (another reduction
tree), so adopting it means switching sampler and trainer together.
`--check` proves the two properties (interpreter or GPU); the benchmark times the
split kernels against the shipped ones side by side.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onpolicy_kernels.logprobs import _lane_stats  # noqa: E402

BLOCK = 4096
STEPS = 4  # BLOCK steps per chunk: CHUNK = 16384 -> 10 chunks at V = 151936


@triton.jit
def _chunk_stats(x_ptr, t_ptr, pm_ptr, ps_ptr, V, sx, C, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    # The shipped kernels' per-lane pass (kernels/logprobs.py: _lane_stats) over one chunk.
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(t_ptr + row)
    start = c * STEPS * BLOCK
    m, s = _lane_stats(x_ptr, row, sx, t, start, tl.minimum(start + STEPS * BLOCK, V), BLOCK)
    tl.store(pm_ptr + row * C + c, m)
    tl.store(ps_ptr + row * C + c, s)


@triton.jit
def _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C: tl.constexpr):
    cs = tl.arange(0, BLOCK_C)
    mask = cs < C
    m = tl.max(tl.load(pm_ptr + row * C + cs, mask=mask, other=float("-inf")), axis=0)
    # In chunk order: one fixed sequence of fp32 additions for every consumer.
    s = 0.0
    for c in range(C):
        mc = tl.load(pm_ptr + row * C + c)
        sc = tl.load(ps_ptr + row * C + c)
        s += tl.where(mc > float("-inf"), sc * tl.exp(mc - m), 0.0)
    return m, tl.log(s)


@triton.jit
def _write_kernel(x_ptr, t_ptr, pm_ptr, ps_ptr, o_ptr, V, sx, so, C,
                  BLOCK: tl.constexpr, STEPS: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = tl.load(t_ptr + row)
    m, lse = _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C)
    cols = tl.arange(0, BLOCK)
    for i in range(STEPS):
        v0 = (c * STEPS + i) * BLOCK
        mask = v0 + cols < V
        x = tl.load(x_ptr + row * sx + v0 + cols, mask=mask, other=0.0).to(tl.float32) / t
        tl.store(o_ptr + row * so + v0 + cols, (x - m) - lse, mask=mask)


@triton.jit
def _gather_kernel(x_ptr, t_ptr, id_ptr, pm_ptr, ps_ptr, o_ptr, sx, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(t_ptr + row)
    m, lse = _row_lse(pm_ptr, ps_ptr, row, C, BLOCK_C)
    tok = tl.load(id_ptr + row).to(tl.int64)
    x = tl.load(x_ptr + row * sx + tok).to(tl.float32) / t
    tl.store(o_ptr + row, (x - m) - lse)


def _stats(logits, temperature, block, steps):
    M, V = logits.shape
    C = triton.cdiv(V, block * steps)
    pm = torch.empty(M, C, dtype=torch.float32, device=logits.device)
    ps = torch.empty_like(pm)
    _chunk_stats[(M, C)](logits, temperature, pm, ps, V, logits.stride(0), C, BLOCK=block, STEPS=steps, num_warps=8)
    return pm, ps, C


def log_softmax_split(logits, temperature, block=BLOCK, steps=STEPS):
    M, V = logits.shape
    out = torch.empty(M, V, dtype=torch.float32, device=logits.device)
    pm, ps, C = _stats(logits, temperature, block, steps)
    _write_kernel[(M, C)](logits, temperature, pm, ps, out, V, logits.stride(0), out.stride(0), C,
                          BLOCK=block, STEPS=steps, BLOCK_C=triton.next_power_of_2(C), num_warps=8)
    return out


def token_logprobs_split(logits, token_ids, temperature, block=BLOCK, steps=STEPS):
    M, V = logits.shape
    out = torch.empty(M, dtype=torch.float32, device=logits.device)
    pm, ps, C = _stats(logits, temperature, block, steps)
    _gather_kernel[(M,)](logits, temperature, token_ids, pm, ps, out, logits.stride(0), C,
                         BLOCK_C=triton.next_power_of_2(C), num_warps=1)
    return out


def check():
    """token_logprobs == log_softmax[token] and a row alone == inside a batch, bitwise; close to torch."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    V, block, steps = (151936, BLOCK, STEPS) if dev == "cuda" else (1000, 64, 2)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, V, generator=g) * 4).to(dev)
    temp = torch.tensor([1.0, 0.7, 1.3, 1.0, 0.5, 2.0, 1.0, 0.9, 1.1], device=dev)
    ids = torch.randint(0, V, (9,), generator=g).to(dev)
    full = log_softmax_split(logits, temp, block, steps)
    tok = token_logprobs_split(logits, ids, temp, block, steps)
    ok_gather = torch.equal(full.gather(1, ids[:, None].long())[:, 0], tok)
    ok_rows = all(torch.equal(log_softmax_split(logits[i:i + 1], temp[i:i + 1], block, steps), full[i:i + 1])
                  for i in (0, 4, 8))
    ok_tok = all(torch.equal(token_logprobs_split(logits[i:i + 3], ids[i:i + 3], temp[i:i + 3], block, steps),
                             tok[i:i + 3]) for i in (0, 5))
    err = float((full - torch.log_softmax(logits.double() / temp[:, None].double(), -1)).abs().max())
    print(f"token_logprobs == log_softmax[token]: {ok_gather}; rows alone == batched: {ok_rows}, {ok_tok}; "
          f"max |error| vs float64 {err:.2e}")
    return ok_gather and ok_rows and ok_tok and err < 1e-4


def bench(ms):
    from _common import copy_bandwidth, device_line, time_calls

    from onpolicy_kernels.logprobs import log_softmax, token_logprobs

    V = 151936
    bw = max(copy_bandwidth().values())
    print(device_line(), f"| V = {V} | copy bandwidth {bw:.0f} GB/s | times in us (CUDA-graph replays)")
    print("| M | log_softmax shipped | split | speed-up | % of copy (split) | token_logprobs shipped | split | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for M in ms:
        x = torch.randn(M, V, device="cuda")
        t = torch.ones(M, device="cuda")
        ids = torch.randint(0, V, (M,), device="cuda")
        a = time_calls([lambda: log_softmax(x, t)])
        b = time_calls([lambda: log_softmax_split(x, t)])
        c = time_calls([lambda: token_logprobs(x, ids, t)])
        d = time_calls([lambda: token_logprobs_split(x, ids, t)])
        share = 2 * M * V * 4 / (b * 1e-6) / 1e9 / bw * 100
        print(f"| {M} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {share:.0f}% | {c:.1f} | {d:.1f} | {c / d:.2f}x |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--ms", default="1,8,64,256,2048")
    a = ap.parse_args()
    ok = check()
    if a.check or not torch.cuda.is_available() or not ok:
        sys.exit(0 if ok else 1)
    bench([int(m) for m in a.ms.split(",")])


if __name__ == "__main__":
    main()
