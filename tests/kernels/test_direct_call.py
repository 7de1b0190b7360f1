"""Eager calls run an op's body directly (kernels/onpolicy_kernels/_dispatch.py `call`): as is where no
autograd is needed, inside an autograd.Function built from the op's registered autograd
formula where it is (a training step).

The promise: the same bits as the registered op, forward and backward; the registered op
still serves every call that torch.compile, a dispatch or function mode, or fake tensors
must see.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import onpolicy_kernels as K
from onpolicy_kernels import _dispatch
from onpolicy_kernels.ops import activation, attention, linear, logprobs, reduce, rms_norm, rotary  # the op modules

CACHE = K.build_cos_sin_cache(32, 32, 64, 1e4)


def _cases(grad: bool = False):
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).requires_grad_(grad)

    x, w = r(5, 48), r(40, 48)
    yield "linear", linear._linear_op, lambda: K.linear(x, w), lambda: torch.ops.onpolicy.linear(x, w, None)
    h, nw = r(6, 64), r(64)
    yield "rms_norm", rms_norm._rms_norm_op, lambda: K.rms_norm(h, nw, 1e-6), \
        lambda: torch.ops.onpolicy.rms_norm(h, nw, 1e-6)
    res = r(6, 64)
    yield "fused_add_rms_norm", rms_norm._fused_op, lambda: K.fused_add_rms_norm(h, res, nw, 1e-6), \
        lambda: torch.ops.onpolicy.fused_add_rms_norm(h, res, nw, 1e-6)
    yield "silu_and_mul", activation._silu_and_mul_op, lambda: K.silu_and_mul(h), \
        lambda: torch.ops.onpolicy.silu_and_mul(h)
    parts = r(4, 6, 64)
    yield "rank_sum", reduce._rank_sum_op, lambda: K.rank_sum(parts), lambda: torch.ops.onpolicy.rank_sum(parts)
    pos, q, k = torch.tensor([0, 5, 63]), r(3, 4, 32), r(3, 2, 32)
    yield "rotary_embedding", rotary._rotary_op, lambda: K.rotary_embedding(pos, q, k, CACHE), \
        lambda: torch.ops.onpolicy.rotary_embedding(pos, q, k, CACHE, True)
    lg, t, ids = r(4, 100), torch.full((4,), 0.8), torch.tensor([0, 5, 99, 42])
    yield "log_softmax", logprobs._log_softmax_op, lambda: K.log_softmax(lg, 0.8), \
        lambda: torch.ops.onpolicy.log_softmax(lg, t)
    yield "token_logprobs", logprobs._token_logprobs_op, lambda: K.token_logprobs(lg, ids, 0.8), \
        lambda: torch.ops.onpolicy.token_logprobs(lg, ids, t)
    qa, ka, va, cu = r(7, 4, 16), r(7, 2, 16), r(7, 2, 16), torch.tensor([0, 3, 7], dtype=torch.int32)
    yield "attention_contiguous", attention._attention_contiguous_op, \
        lambda: attention.attention_contiguous(qa, ka, va, cu, 0.25), \
        lambda: torch.ops.onpolicy.attention_contiguous(qa, ka, va, cu, 0.25, 0)


CASES = list(_cases())
IDS = [c[0] for c in CASES]


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _spy(monkeypatch, op):
    calls = []
    body = op.body

    def spy(*args):
        calls.append(args)
        return body(*args)

    monkeypatch.setattr(op, "body", spy)
    return calls


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("name,op,api,registered", CASES, ids=IDS)
def test_eager_inference_runs_the_body_with_the_ops_bits(monkeypatch, ctx, name, op, api, registered):
    calls = _spy(monkeypatch, op)
    with ctx():
        ours = _flat(api())
        assert len(calls) == 1, "the eager call went through the dispatcher"
        ref = _flat(registered())
        assert len(calls) == 1, "torch.ops.onpolicy.* must not take the shortcut"
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def _leaves(api):
    """The tensors requiring grad that `api` closes over (its inputs)."""
    cells = [c.cell_contents for c in (api.__closure__ or ())]
    return [t for t in cells if isinstance(t, torch.Tensor) and t.requires_grad]


def _graph_names(t, depth=3):
    """Names of the autograd nodes within `depth` steps of t's grad_fn (the API may view the op's output)."""
    names, frontier = set(), [t.grad_fn]
    for _ in range(depth):
        nxt = []
        for f in frontier:
            if f is not None:
                names.add(type(f).__name__)
                nxt += [n for n, _ in f.next_functions]
        frontier = nxt
    return names


def _loss(outs):
    g = torch.Generator().manual_seed(7)
    return sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)


@pytest.mark.parametrize("name,op,api,registered", list(_cases(grad=True)), ids=IDS)
def test_grad_runs_the_body_and_formula_with_the_ops_bits_and_grads(monkeypatch, name, op, api, registered):
    calls = _spy(monkeypatch, op)
    ours = _flat(api())
    assert len(calls) == 1, "the training call went through the dispatcher"
    assert all(o.requires_grad for o in ours)
    assert all(any(n.endswith("_eagerBackward") for n in _graph_names(o)) for o in ours)
    leaves = _leaves(registered)
    assert leaves
    got = torch.autograd.grad(_loss(ours), leaves)
    ref = _flat(registered())
    assert len(calls) == 1, "torch.ops.onpolicy.* must not take the shortcut"
    assert all(any(n.startswith("GeneratedBackwardFor_onpolicy") for n in _graph_names(o)) for o in ref)
    want = torch.autograd.grad(_loss(ref), leaves)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_grad_through_a_function_mode_uses_the_op(monkeypatch):
    calls = _spy(monkeypatch, linear._linear_op)
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with torch.device("cpu"):
        y = K.linear(x, w)
    assert not calls and any(n.startswith("GeneratedBackwardFor_onpolicy") for n in _graph_names(y))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_an_op_without_autograd_formula_keeps_the_dispatcher():
    class Op:
        function = None
        seen = []

        def body(self, *a):
            raise AssertionError("body called directly")

        def __call__(self, *a):
            self.seen.append(a)
            return a[0] * 2

    op = Op()
    x = torch.randn(3, requires_grad=True)
    y = _dispatch.call(op, x)
    assert len(op.seen) == 1 and torch.equal(y, x * 2)


def test_no_grad_with_parameters_takes_the_body(monkeypatch):
    calls = _spy(monkeypatch, linear._linear_op)
    w = torch.nn.Parameter(torch.randn(8, 16))
    with torch.no_grad():
        y = K.linear(torch.randn(3, 16), w)
    assert len(calls) == 1 and not y.requires_grad


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op(monkeypatch):
    calls = _spy(monkeypatch, linear._linear_op)
    with torch.no_grad(), _Names() as mode:
        K.linear(torch.randn(3, 16), torch.randn(8, 16))
    assert not calls
    assert "onpolicy.linear.default" in mode.names


def test_a_function_mode_sees_the_op(monkeypatch):
    calls = _spy(monkeypatch, linear._linear_op)
    with torch.no_grad(), torch.device("cpu"):
        K.linear(torch.randn(3, 16), torch.randn(8, 16))
    assert not calls


def test_fake_tensors_use_the_registered_fake(monkeypatch):
    calls = _spy(monkeypatch, logprobs._log_softmax_op)
    with torch.no_grad(), FakeTensorMode():
        out = K.log_softmax(torch.empty(3, 50, dtype=torch.bfloat16), 0.7)
    assert not calls and out.shape == (3, 50) and out.dtype == torch.float32


def test_compiled_graph_keeps_the_op(monkeypatch):
    calls = _spy(monkeypatch, linear._linear_op)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x, w: K.linear(x, w) * 2, backend=backend, fullgraph=True)
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with torch.no_grad():
        y = f(x, w)
        assert torch.equal(y, K.linear(x, w) * 2)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert "onpolicy.linear.default" in targets, targets
    assert len(calls) == 1  # only the eager reference took the shortcut


def test_direct_rejects_non_tensor_arguments():
    class Proxyish:
        pass

    assert _dispatch.direct((torch.randn(2), 1.0, None, True))
    assert not _dispatch.direct((torch.randn(2), Proxyish()))
    assert not _dispatch.direct((torch.empty(2, device="meta"),))
