"""The Hopper kernel chooser (kernels/onpolicy_kernels/ops/linear/chooser.py), on the CPU with a fake cuBLASLt.

The fake's algorithms compute x @ w.T exactly as the reference does ("good"), in
another summation order (K split in two halves, as split-K would: rarely visible
after bf16 rounding on plain random data), with the last output column left
unwritten, or with every output nudged by a relative amount; each has a cost the
fake timer reports. The chooser must never pick one that differs, however fast,
must pick the fastest verified one per bucket, must not tune while a CUDA graph
is captured, and must fall back to the Triton kernel wherever an algorithm cannot run.
"""
import ctypes
import logging
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onpolicy_kernels.ops.linear import chooser as C

import onpolicy.vllm_plugin.warmup as W  # the engine warm-up plan (no vLLM import)
import onpolicy_kernels.ops.linear.triton_kernels as LT  # the Triton kernels and their tile table


def _ref(x, w):
    """Row by row, so that a row's bits never depend on M (as the Triton kernel's don't)."""
    return torch.stack([w.float() @ r.float() for r in x]).to(x.dtype) if len(x) else x.new_empty(0, w.shape[0])


def _split_order(x, w):
    """The same dot products with K summed as two halves (split-K's order), rounded once."""
    h = x.shape[1] // 2
    return (x[:, :h].float() @ w[:, :h].float().t() + x[:, h:].float() @ w[:, h:].float().t()).to(x.dtype)


class FakeAlgo:
    def __init__(self, name, cost, good=True, max_m=1 << 30, raises=False, kind="nudge"):
        self.name, self.cost, self.good, self.max_m, self.raises = name, cost, good, max_m, raises
        self.kind = kind  # how a bad algorithm differs: "nudge", "split" or "tail"


class FakeLt:
    def __init__(self, algos, triton_cost):
        self.algos, self.triton_cost = algos, triton_cost
        self.last_cost = None
        self.runs = []

    def candidates(self, x, w, out):
        return [(a, 1.0) for a in self.algos]

    def identity(self, a):
        return a.name

    def describe(self, a):
        return f"cuBLASLt {a.name}"

    def check(self, x, w, out, a):
        return x.shape[0] <= a.max_m

    def run(self, x, w, out, a):
        self.runs.append((a.name, x.shape[0]))
        if a.raises:
            raise RuntimeError("cuBLASLt Matmul failed with status 15")
        if a.good:
            out.copy_(_ref(x, w))
        elif a.kind == "split":
            out.copy_(_split_order(x, w))
        elif a.kind == "partial":  # right at the bucket's upper M only (a full tile), else another order
            out.copy_(_ref(x, w) if x.shape[0] == C.bucket(x.shape[0]) else _split_order(x, w))
        elif a.kind == "tail":
            out[:, :-1] = _ref(x, w)[:, :-1]  # the last column left as it was
        else:
            out.copy_(_ref(x, w) * 1.01)  # zero inputs would hide this one
        self.last_cost = a.cost
        return out

    def to_json(self, a):
        return a.name

    def from_json(self, name):
        return next(a for a in self.algos if a.name == name)

    def triton(self, x, w):
        self.last_cost = self.triton_cost
        self.triton_calls = getattr(self, "triton_calls", 0) + 1
        return _ref(x, w)


def _chooser(lt, capturing=lambda: False, rounds=None, first_round=lambda cost: cost):
    """A chooser on the fake; its timer reports each call's cost (`first_round` may skew the first
    timing round's, as noise would) and appends each round's number of calls to `rounds`."""
    rounds = [] if rounds is None else rounds

    def timer(fns, weights):
        costs = []
        for fn in fns:
            fn(weights[0])
            costs.append(lt.last_cost if rounds else first_round(lt.last_cost))
        rounds.append(len(fns))
        return costs

    return C.Chooser(lt, lt.triton, timer=timer, capturing=capturing, timing_weights=lambda w, gen: [w])


def _aligned(t):
    """A copy of t whose storage starts on a 256-byte boundary (as CUDA allocations do)."""
    n = t.numel() * t.element_size()
    buf = torch.empty(n + 256, dtype=torch.uint8)
    off = -buf.data_ptr() % 256
    out = buf[off : off + n].view(t.dtype).view(t.shape)
    return out.copy_(t)


def _operands(M=5, K=32, N=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_aligned(torch.randn(M, K, generator=g).bfloat16()), _aligned(torch.randn(N, K, generator=g).bfloat16()),
            torch.empty(M, N, dtype=torch.bfloat16))


def test_fastest_verified_algorithm_wins_and_a_fast_bad_one_never_runs(caplog):
    bad = FakeAlgo("bad", cost=0.1, good=False)
    fast, slow = FakeAlgo("fast", cost=0.5), FakeAlgo("slow", cost=2.0)
    lt = FakeLt([bad, slow, fast], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands()
    with caplog.at_level(logging.WARNING, logger="onpolicy_kernels"):
        assert ch.pick(x, w, out) is fast
    assert "other bits" in caplog.text and "cuBLASLt bad" in caplog.text
    assert ch.label(x, w) == "cuBLASLt fast"
    # the bad algorithm failed its first verification probe (run at every M of the bucket, the
    # bucket's upper M first) and was remembered as such
    assert [m for name, m in lt.runs if name == "bad"] == list(reversed(C.bucket_rows(C.bucket(5))))
    x3, _, out3 = _operands(M=5, seed=2)
    ch.exact.clear()
    assert ch.pick(x3, w, out3) is fast and [n for n, _ in lt.runs].count("bad") == 2  # bucket cached
    x2, _, out2 = _operands(M=7, seed=1)  # another bucket: every candidate verified again, at its M
    assert C.bucket(7) != C.bucket(5)
    assert ch.pick(x2, w, out2) is fast
    assert [m for name, m in lt.runs if name == "bad"] == [*reversed(C.bucket_rows(C.bucket(5))),
                                                           *reversed(C.bucket_rows(C.bucket(7)))]


def test_triton_kept_where_it_is_fastest_or_no_candidate_verifies():
    x, w, out = _operands()
    lt = FakeLt([FakeAlgo("slow", cost=3.0), FakeAlgo("bad", cost=0.1, good=False)], triton_cost=1.0)
    ch = _chooser(lt)
    assert ch.pick(x, w, out) is None
    assert ch.label(x, w) == "triton"
    lt2 = FakeLt([FakeAlgo("broken", cost=0.1, raises=True)], triton_cost=1.0)
    assert _chooser(lt2).pick(x, w, out) is None


def test_verification_uses_seeded_operands_at_the_buckets_upper_m_not_the_callers():
    """Warm-up calls run on zeros, and a weight may be zero or sparse: either would make any
    algorithm look bit-equal. Verification runs on its own random operands."""
    lt = FakeLt([FakeAlgo("bad", cost=0.1, good=False), FakeAlgo("good", cost=0.2)], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands(M=100)
    x.zero_()
    w.zero_()
    assert ch.pick(x, w, out).name == "good"  # the bad algorithm was caught on the seeded probe
    assert {m for _, m in lt.runs} == set(C.bucket_rows(C.bucket(100))) == set(range(97, 129))


@pytest.mark.parametrize("K", [64, 2048])
def test_another_summation_order_is_caught(K):
    """Split-K's order changes a bf16 output only rarely on plain random data; the planted
    cancelling pair makes it show. Both checks below must hold for the test to mean anything."""
    gen = torch.Generator().manual_seed(0)
    wv, probes = C.verification_operands(24, K, 4, torch.bfloat16, "cpu", gen, plant=False)
    assert all(torch.equal(_split_order(x, wv), _ref(x, wv)) for x in probes[:1]), "plain data already shows it"
    gen = torch.Generator().manual_seed(0)
    wv, probes = C.verification_operands(24, K, 4, torch.bfloat16, "cpu", gen)
    assert not torch.equal(_split_order(probes[0], wv), _ref(probes[0], wv))
    lt = FakeLt([FakeAlgo("split", cost=0.1, good=False, kind="split")], triton_cost=1.0)
    x, w, out = _operands(M=3, K=K)
    assert _chooser(lt).pick(x, w, out) is None


def test_a_bucket_builds_its_verification_operands_once_for_all_candidates():
    lt = FakeLt([FakeAlgo(f"good{i}", cost=0.5 + i) for i in range(3)], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands()
    assert ch.pick(x, w, out).name == "good0"
    probes = min(16, -(-C.VERIFY_OUTPUTS // (C.bucket(5) * w.shape[0])))
    assert probes == 16  # the cap: 6 x 24 outputs per probe
    # every probe at every M of the bucket, then two timing rounds (good0, Triton and good1 are the
    # finalists; good2 is not)
    rows = len(C.bucket_rows(C.bucket(5)))
    assert sum(1 for name, _ in lt.runs if name == "good1") == probes * rows + 2
    assert sum(1 for name, _ in lt.runs if name == "good2") == probes * rows + 1
    assert lt.triton_calls == probes + 2  # one reference per probe, shared; then two timing rounds


def test_an_algorithm_right_only_at_the_buckets_upper_m_is_never_used():
    """The chooser serves every M of a bucket with the algorithm it verified; one that gives the
    reference bits at the upper M only (a full tile there, another code path on a partial one)
    must fail verification, however fast -- the cause of a run-to-run mismatch on an H100."""
    lt = FakeLt([FakeAlgo("partial", cost=0.1, good=False, kind="partial"), FakeAlgo("good", cost=0.5)],
                triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands(M=100, K=64)
    assert ch.pick(x, w, out).name == "good"
    # the same algorithm is right on the planted probe at the upper M (what was verified before)
    wv, probes = C.verification_operands(24, 64, 128, torch.bfloat16, "cpu", torch.Generator().manual_seed(0))
    full = torch.empty(128, 24, dtype=torch.bfloat16)
    assert torch.equal(lt.run(probes[0], wv, full, lt.algos[0]), _ref(probes[0], wv))
    assert not torch.equal(lt.run(probes[0][:100], wv, full[:100], lt.algos[0]), _ref(probes[0][:100], wv))


def test_an_output_left_unwritten_is_caught():
    lt = FakeLt([FakeAlgo("good", cost=0.5), FakeAlgo("tail", cost=0.1, good=False, kind="tail")], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands()
    assert ch.pick(x, w, out).name == "good"  # "tail" ran after "good" on the same shapes, and still failed


def test_planted_probes_cancel_exactly_and_fit_fp16():
    gen = torch.Generator().manual_seed(0)
    wv, probes = C.verification_operands(8, 32, 3, torch.float16, "cpu", gen)
    assert len(probes) == 16 and all(p.shape == (3, 32) for p in probes)
    x = probes[0]
    assert x[0, 0] == C.PLANT and x[0, -1] == -C.PLANT and x[1, 0] != C.PLANT
    assert torch.isfinite(x).all() and torch.isfinite(wv).all()
    planted = x[0::2].double()
    pair = planted[:, :1] * wv[:, 0].double() + planted[:, -1:] * wv[:, -1].double()
    assert (pair == 0).all() and (planted[:, :1] * wv[:, 0].double()).abs().min() == 2.0**20  # cancels exactly


def test_a_tuning_failure_is_remembered_and_triton_serves(caplog):
    lt = FakeLt([FakeAlgo("fast", cost=0.1)], triton_cost=1.0)
    calls = []

    def broken(x, w, out):
        calls.append(1)
        raise RuntimeError("cuBLASLt AlgoGetHeuristic failed with status 7")

    lt.candidates = broken
    ch = _chooser(lt)
    x, w, out = _operands()
    with caplog.at_level(logging.WARNING, logger="onpolicy_kernels"):
        assert ch.pick(x, w, out) is None
    assert "tuning the linear" in caplog.text and "tuning failed" in ch.label(x, w)
    x2, _, out2 = _operands(M=6, seed=5)
    assert ch.pick(x2, w, out2) is None and len(calls) == 1


def test_no_tuning_while_a_cuda_graph_is_captured():
    fast = FakeAlgo("fast", cost=0.1)
    lt = FakeLt([fast], triton_cost=1.0)
    capturing = [True]
    ch = _chooser(lt, capturing=lambda: capturing[0])
    x, w, out = _operands()
    assert ch.pick(x, w, out) is None and lt.runs == []
    assert ch.label(x, w) is None and not ch.exact  # nothing remembered: tuned on the next eager call
    capturing[0] = False
    assert ch.pick(x, w, out) is fast
    capturing[0] = True  # a tuned bucket serves capture (check() is host-only)
    x2, _, out2 = _operands(M=4, seed=3)
    assert C.bucket(4) != C.bucket(5)
    assert ch.pick(x2, w, out2) is None  # bucket of 4 not tuned yet
    x3, _, out3 = _operands(M=6, seed=4)
    assert C.bucket(6) == C.bucket(5)
    assert ch.pick(x3, w, out3) is fast


def test_an_algorithm_that_cannot_run_at_an_exact_m_falls_back_for_that_m_only():
    algo = FakeAlgo("narrow", cost=0.1, max_m=200)
    lt = FakeLt([algo], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands(M=195)
    assert C.bucket(195) == C.bucket(250) == 256
    lt.algos[0].max_m = 1 << 30  # valid at the tuning M (256)
    assert ch.pick(x, w, out) is algo
    algo.max_m = 200
    x2, _, out2 = _operands(M=250, seed=2)
    assert ch.pick(x2, w, out2) is None
    assert ch.pick(x, w, out) is algo  # cached per exact shape


def test_eligibility():
    ch = _chooser(FakeLt([], 1.0))
    x, w, _ = _operands(K=64)
    assert ch.eligible(x, w, None)
    assert not ch.eligible(x, w, torch.zeros(w.shape[0], dtype=x.dtype))  # bias: Triton
    assert not ch.eligible(_aligned(x.float()), _aligned(w.float()), None)  # fp32: Triton
    assert not ch.eligible(x[:, 1:], w[:, 1:], None)  # misaligned rows
    assert not ch.eligible(_aligned(torch.ones(3, 68).bfloat16())[:, :64], w, None)  # row stride 136 B: not 16-aligned
    assert not ch.eligible(x.t().contiguous().t(), w, None)  # column-major x
    assert not ch.eligible(_aligned(torch.ones(1, 64).bfloat16()).expand(4, 64), w, None)  # row stride 0


@pytest.mark.parametrize("flag,hopper,expect", [
    ("", True, True), ("", False, False), ("0", True, False), ("off", True, False), ("1", False, True),
])
def test_enabled(flag, hopper, expect, monkeypatch):
    monkeypatch.setenv(C.ENV, flag)
    assert C.enabled(torch.device("cuda", 0), hopper) is expect
    assert C.enabled(torch.device("cpu"), hopper) is False


@settings(max_examples=200, deadline=None)
@given(max_rows=st.integers(1, 20000))
def test_warm_up_rows_tune_every_bucket_the_batch_can_reach(max_rows):
    rows = C.warm_up_rows(max_rows)
    assert all(1 <= r <= min(max_rows, C.TUNE_MAX_ROWS) for r in rows)
    reachable = {C.bucket(m) for m in range(1, min(max_rows, C.TUNE_MAX_ROWS) + 1)}
    assert {C.bucket(r) for r in rows} == reachable
    assert len(rows) == len(reachable), "one call per bucket"


def test_buckets_cover_m_up_to_tune_max_rows():
    assert C.bucket(1) == 1 and C.bucket(5) == 6 and C.bucket(129) == 192 and C.bucket(C.TUNE_MAX_ROWS) == C.TUNE_MAX_ROWS
    assert all(C.bucket(m) >= m for m in range(1, C.TUNE_MAX_ROWS + 1))
    with pytest.raises(ValueError, match="Triton kernel serves it"):
        C.bucket(C.TUNE_MAX_ROWS + 1)


def test_large_m_is_left_to_triton():
    lt = FakeLt([FakeAlgo("fast", cost=0.1)], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, _ = _operands(M=C.TUNE_MAX_ROWS + 1, K=64)
    assert not ch.eligible(x, w, None)
    assert ch.label(x, w) is None


def test_engine_warm_up_adds_the_buckets_when_the_chooser_serves():
    cuda = torch.device("cuda", 0)
    with mock.patch.object(LT, "_is_hopper", lambda index: True):
        tiles_only = W.warm_up_rows(6144, 600, cuda)
        both = W.warm_up_rows(6144, 600, cuda, buckets=True)
    assert set(tiles_only) < set(both)
    assert set(C.warm_up_rows(600)) <= set(both)


def test_ctypes_layouts_match_cublaslt_h():
    """cublasLtMatmulAlgo_t is uint64_t[8]; cublasLtMatmulHeuristicResult_t is that, a size_t,
    a status, a float and int[4] (cublasLt.h). No library needed to check the layouts."""
    from onpolicy_kernels.ops.linear import cublaslt as lt

    assert ctypes.sizeof(lt.Algo) == 64
    assert ctypes.sizeof(lt._Heuristic) == 96
    assert lt._Heuristic.workspace.offset == 64 and lt._Heuristic.state.offset == 72
    assert lt._Heuristic.waves.offset == 76 and lt._Heuristic.reserved.offset == 80
    assert (lt._DESC_TRANSA, lt._PREF_MAX_WORKSPACE_BYTES, lt._PREF_REDUCTION_SCHEME_MASK) == (3, 1, 3)
    assert lt._PREF_MIN_ALIGNMENT == (5, 6, 7, 8) and lt._COMPUTE_32F == 68
    assert {k: v[0] for k, v in lt._CFG.items()}["splitk"] == 2 and lt._CFG["reduction"][0] == 3


def test_a_first_round_lead_by_noise_does_not_decide_the_pick():
    """The first timing round flatters one algorithm (noise); the second round, of the
    fastest few only, shows it slower, and the sum of both rounds picks the other."""
    lucky, steady = FakeAlgo("lucky", cost=1.0), FakeAlgo("steady", cost=0.9)
    lt = FakeLt([lucky, steady, FakeAlgo("slow", cost=5.0)], triton_cost=1.2)
    rounds = []
    # the first round's noise: lucky (really 1.0) measures 0.85 and leads it
    ch = _chooser(lt, rounds=rounds, first_round=lambda cost: 0.85 if cost == lucky.cost else cost)
    x, w, out = _operands()
    assert ch.pick(x, w, out) is steady  # sums: lucky 0.85 + 1.0, steady 0.9 + 0.9
    assert rounds == [4, C.FINALISTS]  # every candidate and Triton, then the fastest few again


def test_snapshot_names_each_buckets_kernel(monkeypatch):
    """What a mismatch report records: per weight shape and bucket, the kernel that serves it."""
    lt = FakeLt([FakeAlgo("fast", cost=0.5)], triton_cost=1.0)
    ch = _chooser(lt)
    monkeypatch.setattr(C, "_CHOOSER", ch)
    x, w, out = _operands()
    ch.pick(x, w, out)
    lt2 = FakeLt([FakeAlgo("slow", cost=3.0)], triton_cost=1.0)
    ch2 = _chooser(lt2)
    ch.buckets.update({(k[0], k[1], k[2], k[3], 128): v for k, v in _tuned(ch2, M=100).items()})
    snap = C.snapshot()
    assert snap["picks"] == {"24x32 bfloat16 @ M<=6": "cuBLASLt fast", "24x32 bfloat16 @ M<=128": "triton"}
    assert snap["cublaslt"] is True and len(snap["digest"]) == 12
    same = C.snapshot()["digest"]
    ch.buckets.pop(next(iter(ch.buckets)))
    assert C.snapshot()["digest"] != same


def _tuned(ch, M):
    x, w, out = _operands(M=M)
    ch.pick(x, w, out)
    return ch.buckets


def test_a_stored_pick_is_reused_by_the_next_process_without_timing(tmp_path):
    """Two choosers on one store = two engine starts: the second runs what the first picked, even
    where its own timing would have picked otherwise, after verifying it at every M of the bucket."""
    store = str(tmp_path / "picks.json")
    fast, close = FakeAlgo("fast", cost=0.5), FakeAlgo("close", cost=0.55)
    lt = FakeLt([close, fast], triton_cost=1.0)
    first = C.Chooser(lt, lt.triton, timer=_chooser(lt).timer, timing_weights=lambda w, gen: [w],
                      store=C.PickStore(store))
    x, w, out = _operands()
    assert first.pick(x, w, out) is fast
    rounds = []
    lt2 = FakeLt([close, fast], triton_cost=1.0)
    # this start's timing would favour "close"
    second = _chooser(lt2, rounds=rounds, first_round=lambda c: 0.1 if c == close.cost else c)
    second.store = C.PickStore(store)
    assert second.pick(x, w, out) is fast and rounds == []  # nothing timed
    assert sorted({m for n, m in lt2.runs if n == "fast"}) == list(C.bucket_rows(C.bucket(5)))  # verified
    other = _chooser(FakeLt([close, fast], triton_cost=1.0), first_round=lambda c: 0.1 if c == close.cost else c)
    assert other.pick(x, w, out) is close  # without the store, the timing decides


def test_a_stored_pick_that_no_longer_verifies_is_timed_again_and_replaced(tmp_path, caplog):
    store = C.PickStore(str(tmp_path / "picks.json"))
    good = FakeAlgo("x", cost=0.5)
    lt = FakeLt([good], triton_cost=1.0)
    ch = _chooser(lt)
    ch.store = store
    x, w, out = _operands()
    assert ch.pick(x, w, out) is good
    lt2 = FakeLt([FakeAlgo("x", cost=0.1, good=False), FakeAlgo("y", cost=0.5)], triton_cost=1.0)
    ch2 = _chooser(lt2)
    ch2.store = C.PickStore(store.path)
    with caplog.at_level(logging.WARNING, logger="onpolicy_kernels"):
        assert ch2.pick(x, w, out).name == "y"
    assert "no longer verifies" in caplog.text
    assert list(C.PickStore(store.path)._read().values())[0]["algo"] == "y"


def test_the_store_is_optional_and_a_broken_file_is_only_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(C.CACHE_ENV, "0")
    assert C.PickStore.default("v") is None
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path))
    assert C.PickStore.default("v1").path == str(tmp_path / "linear_picks_v1.json")
    (tmp_path / "linear_picks_v1.json").write_text("{not json")
    lt = FakeLt([FakeAlgo("fast", cost=0.5)], triton_cost=1.0)
    ch = _chooser(lt)
    ch.store = C.PickStore.default("v1")
    x, w, out = _operands()
    with caplog.at_level(logging.WARNING, logger="onpolicy_kernels"):
        assert ch.pick(x, w, out).name == "fast"
    assert "could not be read" in caplog.text
    # a stored Triton pick is taken as it is (the Triton kernel is the reference)
    lt3 = FakeLt([FakeAlgo("fast", cost=0.5)], triton_cost=0.1)
    ch3 = _chooser(lt3)
    ch3.store = C.PickStore(str(tmp_path / "t.json"))
    assert ch3.pick(x, w, out) is None
    ch4 = _chooser(FakeLt([FakeAlgo("fast", cost=0.01)], triton_cost=1.0))
    ch4.store = C.PickStore(str(tmp_path / "t.json"))
    assert ch4.pick(x, w, out) is None and ch4.label(x, w) == "triton"


def test_an_algorithm_the_check_refuses_at_the_buckets_upper_m_is_not_timed():
    """cuBLASLt's heuristic offers algorithms its own check then refuses (every LM-head one on an
    H100): such a one must not win the bucket on timing and leave it to the Triton kernel."""
    short, good = FakeAlgo("short", cost=0.1, max_m=3), FakeAlgo("good", cost=0.5)
    lt = FakeLt([short, good], triton_cost=1.0)
    ch = _chooser(lt)
    x, w, out = _operands(M=5)
    assert ch.pick(x, w, out) is good
    assert "short" not in {n for n, _ in lt.runs}
