"""The ops are opaque custom ops: torch.library.opcheck passes, and torch.compile(fullgraph=True)
of a small block using every op gives the eager bits (Inductor cannot fuse or reorder inside them)."""
import pytest
import torch

from onpolicy_kernels import (build_cos_sin_cache, fused_add_rms_norm, linear, log_softmax, rms_norm, rotary_embedding,
                              silu_and_mul, token_logprobs)

CACHE = build_cos_sin_cache(32, 32, 64, 1e4)


def _samples():
    g = torch.Generator().manual_seed(0)

    def r(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)

    ops = torch.ops.onpolicy
    for dtype in (torch.float32, torch.bfloat16):
        grad = dtype == torch.float32
        yield "linear", ops.linear.default, (r(5, 48, dtype=dtype, grad=grad), r(40, 48, dtype=dtype, grad=grad),
                                             r(40, dtype=dtype, grad=grad))
        yield "linear-nobias", ops.linear.default, (r(96, 5, dtype=dtype).t(), r(40, 96, dtype=dtype), None)
        yield "rms_norm", ops.rms_norm.default, (r(6, 64, dtype=dtype, grad=grad), r(64, dtype=dtype, grad=grad), 1e-6)
        yield "fused_add_rms_norm", ops.fused_add_rms_norm.default, (
            r(6, 64, dtype=dtype, grad=grad), r(6, 64, dtype=dtype, grad=grad), r(64, dtype=dtype, grad=grad), 1e-6)
        yield "silu_and_mul", ops.silu_and_mul.default, (r(6, 64, dtype=dtype, grad=grad),)
        yield "rank_sum", ops.rank_sum.default, (r(4, 6, 64, dtype=dtype, grad=grad),)
        yield "rotary_embedding", ops.rotary_embedding.default, (
            torch.tensor([0, 5, 63]), r(3, 4, 32, dtype=dtype, grad=grad), r(3, 2, 32, dtype=dtype, grad=grad), CACHE, True)
        yield "log_softmax", ops.log_softmax.default, (r(4, 100, dtype=dtype, grad=grad), torch.full((4,), 0.8))
        yield "token_logprobs", ops.token_logprobs.default, (
            r(4, 100, dtype=dtype, grad=grad), torch.tensor([0, 5, 99, 42]), torch.full((4,), 0.8))
        yield "truncation_thresholds", ops.truncation_thresholds.default, (
            r(4, 100), torch.tensor([0, 5, 0, 3]), torch.tensor([1.0, 0.9, 0.5, 1.0]), torch.tensor([0.0, 0.0, 0.1, 0.0]))


SAMPLES = list(_samples())


@pytest.mark.parametrize("name,op,args", SAMPLES, ids=[f"{s[0]}-{i}" for i, s in enumerate(SAMPLES)])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _block(x, res, w_qkv, w_o, w_gu, w_d, w_head, norm_w, pos, ids):
    """A miniature decoder layer + LM head + logprobs built from the ops (views and splits between them)."""
    h, res = fused_add_rms_norm(x, res, norm_w, 1e-6)
    q, k, v = linear(h, w_qkv).split([64, 32, 32], dim=-1)
    q, k = rotary_embedding(pos, q, k, CACHE, head_size=32)
    h = linear(q + 0 * v.sum(), w_o)  # stand-in for attention: only views/elementwise glue in between
    h, res = fused_add_rms_norm(h, res, norm_w, 1e-6)
    h = linear(silu_and_mul(linear(h, w_gu)), w_d)
    logits = linear(rms_norm(h + res, norm_w, 1e-6), w_head)
    return log_softmax(logits, 0.7), token_logprobs(logits, ids, 0.7)


def test_compiled_block_equals_eager_bitwise():
    g = torch.Generator().manual_seed(1)
    D, T, V = 64, 11, 300

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)

    args = (r(T, D), r(T, D), r(128, D, scale=D**-0.5), r(D, 64, scale=0.125), r(256, D, scale=0.125),
            r(D, 128, scale=0.1), r(V, D, scale=0.125), r(D) + 1, torch.randint(0, 64, (T,), generator=g),
            torch.randint(0, V, (T,), generator=g))
    eager = _block(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True)(*args)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_compiled_truncated_logprobs_equal_eager_bitwise():
    """The truncation's mask is one opaque op; what surrounds it (masked_fill, log_softmax, where) is
    exact or an op itself, so a compiled caller gets the eager bits."""
    from onpolicy_kernels import truncated_token_logprobs

    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(12, 300, generator=g) * 3).to(torch.bfloat16)
    ids = logits.float().argmax(-1)

    def f(x, i):
        return truncated_token_logprobs(x, i, 0.7, top_k=20, top_p=0.9, min_p=0.02)

    eager = f(logits, ids)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f)(logits, ids), eager)
