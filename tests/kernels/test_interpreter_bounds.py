"""Memory safety of the Triton kernels under TRITON_INTERPRET=1: no access outside the tensors.

Under the interpreter an unmasked load or store at an edge tile touches host memory
outside the tensor (and may corrupt the heap, crashing the process later and
elsewhere). Two independent checks, on shapes that leave every kind of partial
tile (M, N, K, head dim, heads, vocab not multiples of their blocks; decode and
empty-query sequences; padding slots):

* the bounds checker (tests/kernels/_bounds.py, installed by conftest.py for every
  kernel test) verifies every enabled element of every load and store lies inside a
  tensor argument -- shown here to catch a deliberately unmasked kernel;
* guard buffers: every input sits inside a larger buffer filled with NaN (int inputs:
  a huge value), which must be bit-for-bit untouched afterwards, and the outputs must
  equal those of plain tensors (a read of the guard would bring NaN in).
"""
from __future__ import annotations

import os

import pytest
import torch

import _bounds
from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, linear, log_softmax, reshape_and_cache,
                              rms_norm, rotary_embedding, silu_and_mul, token_logprobs)
from onpolicy_kernels._triton import HAS_TRITON, tl, triton

import onpolicy_kernels.ops.attention as A

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and INTERPRETING),
                                reason="needs triton with TRITON_INTERPRET=1 set before import (tests/kernels/conftest.py)")

GUARD = 4096  # elements of guard on each side (more than any block of these kernels)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("ONPOLICY_KERNELS_BACKEND", "triton")


def _g(seed):
    return torch.Generator().manual_seed(seed)


class Guarded:
    """Copies of tensors placed inside guard-filled buffers; `check()` asserts the guards intact."""

    def __init__(self):
        self.buffers = []

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        fill = float("nan") if t.is_floating_point() else 2**30
        buf = torch.full((GUARD + t.numel() + GUARD,), fill, dtype=t.dtype)
        view = buf[GUARD:GUARD + t.numel()].view(t.shape)
        view.copy_(t)
        self.buffers.append((buf, buf[:GUARD].clone(), buf[-GUARD:].clone()))
        return view

    def check(self):
        for buf, lo, hi in self.buffers:
            bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}.get(buf.dtype)
            same = (lambda a, b: torch.equal(a.view(bits), b.view(bits))) if bits else torch.equal
            assert same(buf[:GUARD], lo) and same(buf[-GUARD:], hi), "a kernel wrote into a guard region"


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) or (a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a.nan_to_num(), b.nan_to_num()))


def _run_guarded(fn, *args):
    """fn(*args) on plain tensors and on guarded copies: same bits, guards untouched, checker active."""
    before = _bounds.elements_checked()
    plain = fn(*args)
    assert _bounds.elements_checked() > before, "the interpreter bounds checker did not run"
    guard = Guarded()
    guarded = fn(*[guard(a) if isinstance(a, torch.Tensor) else a for a in args])
    guard.check()
    assert _same(plain, guarded)
    return plain


# --- the checker itself ---------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _copy_kernel(x_ptr, o_ptr, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            tl.store(o_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)
        else:
            tl.store(o_ptr + i, tl.load(x_ptr + i))


def test_checker_catches_an_unmasked_edge_tile():
    # Views of one buffer, so the addresses past them are deterministic: inside the
    # buffer's storage (a real overrun here corrupts nothing) but outside every view.
    buf = torch.arange(1000, dtype=torch.float32)
    x, out = buf[:100], buf[500:600]
    _copy_kernel[(2,)](x, out, 100, MASKED=True, BLOCK=64)
    assert torch.equal(out, x)
    # The checker raises before the access happens: nothing outside the tensors is touched.
    with pytest.raises(Exception, match="_copy_kernel: load of 28 element"):
        _copy_kernel[(2,)](x, out, 100, MASKED=False, BLOCK=64)  # reads buf[100:128]
    with pytest.raises(Exception, match="_copy_kernel: store of 28 element"):
        _copy_kernel[(2,)](buf[:128], out, 100, MASKED=False, BLOCK=64)  # writes buf[600:628]
    assert torch.equal(buf[600:628], torch.arange(600, 628, dtype=torch.float32))


# --- every kernel on edge shapes --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (17, 65, 33), (65, 130, 100)])
def test_linear_in_bounds(M, N, K, dtype):
    g = _g(M + N + K)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((M, K), (N, K), (N,)))
    _run_guarded(linear, x, w, b)
    _run_guarded(linear, x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 100])
def test_norms_and_activation_in_bounds(N, dtype):
    g = _g(N)
    x, r = torch.randn(5, N, generator=g).to(dtype), torch.randn(5, N, generator=g).to(dtype)
    w = torch.randn(N, generator=g).to(dtype)
    _run_guarded(rms_norm, x, w, 1e-6)
    _run_guarded(fused_add_rms_norm, x, r, w, 1e-6)
    d = 1025 if N == 100 else 1  # one element past a 1024-wide block
    _run_guarded(silu_and_mul, torch.randn(3, 2 * d, generator=g).to(dtype))


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("D,rot,H", [(32, 32, 1), (80, 16, 17)])
def test_rotary_in_bounds(D, rot, H, is_neox):
    g = _g(D + H)
    cache = build_cos_sin_cache(D, rot, 40, 1e4)
    pos = torch.tensor([0, 39, 7])
    q, k = torch.randn(3, H, D, generator=g), torch.randn(3, 1, D, generator=g)
    _run_guarded(lambda p, a, b, c: rotary_embedding(p, a, b, c, is_neox=is_neox), pos, q, k, cache)


@pytest.mark.parametrize("V", [1, 4097])
def test_logprobs_in_bounds(V):
    g = _g(V)
    x = torch.randn(3, V, generator=g).to(torch.float16)
    ids = torch.tensor([0, V - 1, V // 2])
    t = torch.tensor([0.7, 1.0, 1.3])
    _run_guarded(log_softmax, x, t)
    _run_guarded(token_logprobs, x, ids, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_attention_and_cache_write_in_bounds(dtype):
    g = _g(0)
    Hq, Hkv, D, bs = 6, 2, 80, 16  # G = 3 (a 64-row tile is not whole positions); D pads to 128
    seq_lens = [1, 70, 5, 65]
    q_lens = [1, 3, 0, 65]  # a decode, a chunk, a sequence without queries, a prefill
    need = [-(-L // bs) for L in seq_lens]
    nb = sum(need)
    kc, vc = (torch.randn(nb, bs, Hkv, D, generator=g).to(dtype) for _ in range(2))
    perm = torch.randperm(nb, generator=g)
    bt = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i:i + n].int()
        i += n
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), Hq, D, generator=g).to(dtype)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    for causal in (True, False):
        _run_guarded(lambda *a: A.attention(*a, causal=causal), q, kc, vc, bt, cu, sl, 0.1)
    T = int(cu[-1])
    k, v = torch.randn(T, Hkv, D, generator=g).to(dtype), torch.randn(T, Hkv, D, generator=g).to(dtype)
    _run_guarded(A.attention_contiguous, q, k, v, cu, 0.1)

    def write(key, value, kc, vc, slots):  # in place: the guarded run writes into guarded caches
        reshape_and_cache(key, value, kc, vc, slots)
        return kc, vc

    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[[0, 5, T - 1]] = -1  # padding
    slots[1] = nb * bs - 1  # the very last slot
    _run_guarded(write, k, v, kc, vc, slots)
