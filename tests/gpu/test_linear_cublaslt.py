"""GPU: cuBLASLt algorithms that never split K give the Triton kernel's bits, and the chooser keeps them.

kernels/onpolicy_kernels/ops/linear/chooser.py may serve a Hopper linear with a cuBLASLt no-split
algorithm instead of the Triton kernel. That is only sound if every such
algorithm gives the Triton kernel's bits: the first test enumerates every
candidate cuBLASLt's heuristic offers on the model shapes across M (the
"table" the chooser picks from) and compares each bitwise with the Triton
reference tile. The chooser checks this again at run time before using one.
"""

import pytest
import torch

from _gpu_util import is_hopper, pytestmark, require_compiled_triton  # noqa: F401
from onpolicy_kernels.ops.linear import cublaslt as lt
from onpolicy_kernels import linear
from onpolicy_kernels.ops.linear import chooser as C

import onpolicy_kernels.ops.linear as L
import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table

# (K, N): Qwen3-1.7B and -8B projections (qkv, o, gate_up, down) and the LM head.
SHAPES = [(2048, 4096), (2048, 2048), (2048, 12288), (6144, 2048),
          (4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096), (2048, 151936)]
MS = (1, 3, 16, 64, 200, 256, 512, 1000, 4096)


def _w(N, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K**0.5, g


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("K,N", SHAPES, ids=[f"K{k}-N{n}" for k, n in SHAPES])
def test_every_no_split_candidate_gives_the_triton_bits(K, N, dtype):
    """On plain random operands and on the chooser's planted ones (a cancelling +C/-C pair
    that makes any other summation order visible after rounding)."""
    require_compiled_triton()
    w, g = _w(N, K, dtype, K + N)
    for M in MS if N < 100000 else (1, 64, 256, 1000):
        x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
        wv, probes = C.verification_operands(N, K, M, dtype, "cuda", g)
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        cands = lt.candidates(x, w, out)
        assert cands, f"cuBLASLt offered no no-split algorithm at M={M}"
        for xs, ws in ((x, w), (probes[0], wv)):
            ref = LT.linear_triton(xs, ws, None, LT.SAFE_TILE)
            for algo, _ in cands:
                out.fill_(float("nan"))
                lt.run(xs, ws, out, algo)
                assert torch.equal(out, ref), f"M={M}: {lt.describe(algo)} {lt.config(algo)} gave other bits"


@pytest.fixture
def fresh_chooser(monkeypatch, tmp_path):
    monkeypatch.delenv(C.ENV, raising=False)
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path))  # no picks from an earlier process
    monkeypatch.setattr(C, "_CHOOSER", None)
    yield


def test_chooser_serves_buckets_with_cublaslt_and_rows_keep_their_bits(fresh_chooser):
    require_compiled_triton()
    if not is_hopper():
        pytest.skip("the chooser is on by default on Hopper only")
    K, N = 2048, 12288
    w, g = _w(N, K, torch.bfloat16, 1)
    probes = torch.randn(8, K, device="cuda", dtype=torch.bfloat16, generator=g)
    alone = torch.cat([linear(probes[i : i + 1], w) for i in range(8)])
    paths = set()
    for M in (1, 7, 64, 200, 256, 300, 512, 1000, 4096, 9000):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        n = min(M, 8)
        pos = torch.randperm(M, device="cuda", generator=g)[:n]
        x[pos] = probes[:n]
        out = linear(x, w)
        paths.add(L.path_for(x, w))
        assert torch.equal(out[pos], alone[:n]), f"rows changed inside a batch of M={M} ({L.path_for(x, w)})"
        assert torch.equal(out, LT.linear_triton(x, w, None, LT.SAFE_TILE)), f"M={M} ({L.path_for(x, w)})"
    assert any(p.startswith("cuBLASLt") for p in paths), paths
    assert any(p.startswith("triton") for p in paths), paths  # M = 4096 and 9000: above TUNE_MAX_ROWS


def test_capture_tunes_nothing_and_replays_the_same_bits(fresh_chooser):
    require_compiled_triton()
    if not is_hopper():
        pytest.skip("the chooser is on by default on Hopper only")
    K, N, M = 2048, 12288, 256
    w, g = _w(N, K, torch.bfloat16, 2)
    x1, x2 = (torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    static_x = x1.clone()
    LT.linear_triton(static_x, w, None)  # compile outside the capture, without tuning
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(static_x, w)
    assert C._CHOOSER is not None and C._CHOOSER.label(static_x, w) is None, "tuned inside a capture"
    static_x.copy_(x2)
    graph.replay()
    assert torch.equal(y, LT.linear_triton(x2, w, None, LT.SAFE_TILE))
    linear(x1, w)  # eager: tunes the bucket
    label = L.path_for(x1, w)
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        y2 = linear(static_x, w)
    static_x.copy_(x1)
    graph2.replay()
    assert torch.equal(y2, LT.linear_triton(x1, w, None, LT.SAFE_TILE)), label


def test_switched_off_runs_triton(fresh_chooser, monkeypatch):
    require_compiled_triton()
    monkeypatch.setenv(C.ENV, "0")
    w, g = _w(12288, 2048, torch.bfloat16, 3)
    x = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16, generator=g)
    assert torch.equal(linear(x, w), LT.linear_triton(x, w, None, LT.SAFE_TILE))
    assert L.path_for(x, w).startswith("triton")
    assert C._CHOOSER is None


def test_stored_picks_come_back_in_the_next_process_with_the_same_bits(fresh_chooser, tmp_path):
    """A pick stored by one chooser (the descriptor as text) is what the next one runs, untimed."""
    require_compiled_triton()
    if not is_hopper():
        pytest.skip("the chooser is on by default on Hopper only")
    K, N = 2048, 12288
    w, g = _w(N, K, torch.bfloat16, 4)
    x = torch.randn(200, K, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = LT.linear_triton(x, w, None, LT.SAFE_TILE)
    assert torch.equal(linear(x, w), ref)
    first = C._CHOOSER.label(x, w)
    saved = C.PickStore.default(lt.versions())._read()
    assert len(saved) >= 1 and all("label" in v for v in saved.values())
    for v in saved.values():
        if v["algo"] is not None:
            assert lt.identity(lt.from_json(v["algo"])) == tuple(int(h, 16) for h in v["algo"])
    timed = []

    def timer(fns, weights):
        timed.append(len(fns))
        return C._cuda_times(fns, weights)

    # the next engine start: a new chooser on the same store
    C._CHOOSER = C.Chooser(lt, L._triton_reference, timer=timer, store=C.PickStore.default(lt.versions()))
    assert torch.equal(linear(x, w), ref)
    assert C._CHOOSER.label(x, w) == first and timed == []
