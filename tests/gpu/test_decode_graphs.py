"""GPU: the vLLM decode step's LM head and log-softmax replayed from CUDA graphs (graphs.py) give
the eager ops' bits, at every row count of every bucket, whatever rows the padding holds."""
import pytest
import torch

from _gpu_util import pytestmark, require_compiled_triton  # noqa: F401
from onpolicy.vllm_plugin import graphs as G
import onpolicy_kernels as K

V, H = 151936, 2048  # Qwen3-1.7B's LM head


@pytest.fixture(scope="module")
def head():
    g = torch.Generator(device="cuda").manual_seed(0)
    return (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16)


def _orders():
    # every row count once, large then small (the padding holds the larger call's rows) and back
    ms = list(range(1, G.MAX_ROWS + 1))
    return ms[::-1] + ms


from onpolicy_kernels.ops.linear import linear_into  # noqa: E402
from onpolicy_kernels.ops.logprobs import log_softmax_into  # noqa: E402

INTO = [None, "into"]  # graphs that return fn's own output, and graphs writing into shared static outputs (the plugin's)


@pytest.mark.parametrize("into", INTO)
def test_head_graphs_equal_eager(head, into):
    require_compiled_triton()
    graphs = G.RowGraphs(lambda x, w: K.linear(x, w), "head", into=linear_into if into else None)
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.inference_mode():
        for m in _orders():
            x = torch.randn(m, H, device="cuda", generator=g, dtype=torch.bfloat16)
            got = graphs(x, extra=(head,))
            assert got.shape == (m, V)
            assert torch.equal(got, K.linear(x, head)), m
    assert graphs.captures == len(G.buckets(G.MAX_ROWS)) and graphs.replays == 2 * G.MAX_ROWS


@pytest.mark.parametrize("into", INTO)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_log_softmax_graphs_equal_eager(dtype, into):
    require_compiled_triton()
    graphs = G.RowGraphs(lambda lg, t: K.log_softmax(lg, t), "log_softmax", into=log_softmax_into if into else None)
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.inference_mode():
        for m in _orders():
            logits = (torch.randn(m, V, device="cuda", generator=g) * 4).to(dtype)
            t = 0.5 + torch.rand(m, device="cuda", generator=g)
            assert torch.equal(graphs(logits, t), K.log_softmax(logits, t)), m
            one = graphs(logits, extra=(1.0,))
            assert torch.equal(one, K.log_softmax(logits, 1.0)), m
            assert torch.equal(one, K.log_softmax(logits, torch.ones(m, device="cuda"))), m
            # a strided view (vLLM slices padded vocab off gathered logits): copied in, same bits
            wide = torch.randn(m, V + 64, device="cuda", generator=g).to(dtype)
            assert torch.equal(graphs(wide[:, :V], t), K.log_softmax(wide[:, :V], t)), m
    assert graphs.captures == 2 * len(G.buckets(G.MAX_ROWS))


def test_eager_where_graphs_do_not_apply(head):
    require_compiled_triton()
    graphs = G.RowGraphs(lambda x, w: K.linear(x, w), "head")
    with torch.inference_mode():
        big = torch.randn(G.MAX_ROWS + 1, H, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(graphs(big, extra=(head,)), K.linear(big, head))
        assert graphs.captures == 0 and graphs.replays == 0
        graphs.paused = True  # the worker pauses them while vLLM profiles its memory
        small = big[:4]
        assert torch.equal(graphs(small, extra=(head,)), K.linear(small, head))
        assert graphs.captures == 0 and graphs.replays == 0
        graphs.paused = False
    x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = graphs(x, extra=(head,))  # needs autograd: eager, differentiable
    y.float().sum().backward()
    assert x.grad is not None and graphs.captures == 0
    # inside someone else's capture: eager (captured into theirs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    xin = torch.randn(4, H, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        K.linear(xin, head)  # compile/tune outside the capture
        outer = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            outer.capture_begin()
            out = graphs(xin, extra=(head,))
            outer.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        outer.replay()
        torch.cuda.synchronize()
        assert graphs.captures == 0 and torch.equal(out, K.linear(xin, head))


def test_weight_updated_in_place_is_seen(head):
    """A weight sync (TRL's load_weights) writes into the same parameter: the graph reads it."""
    require_compiled_triton()
    w = head[:4096].clone()
    graphs = G.RowGraphs(lambda x, w: K.linear(x, w), "head")
    x = torch.randn(8, H, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        before = graphs(x, extra=(w,)).clone()
        w.mul_(-1)
        after = graphs(x, extra=(w,))
        assert torch.equal(after, K.linear(x, w)) and torch.equal(after, -before)
        w2 = w.clone()  # a new tensor: a new graph
        assert torch.equal(graphs(x, extra=(w2,)), K.linear(x, w2)) and graphs.captures == 2


def test_warm_up_holds_what_the_worker_took_out_of_the_kv_budget(head):
    """The plugin's graphs (install's: shared static inputs and outputs) after the engine's warm-up
    hold exactly planned_bytes -- what the worker takes out of the KV cache's budget -- and less
    than half of what a buffer per bucket held (1.01 GiB at 256 rows of a 151936 vocabulary)."""
    require_compiled_triton()
    from onpolicy.vllm_plugin.sampler import _log_softmax

    head_graphs = G.RowGraphs(lambda x, w: K.linear(x, w), "the LM head", into=linear_into)
    soft = G.RowGraphs(_log_softmax, "the sampler's log-softmax", into=log_softmax_into)
    plan = G.WarmUp(head_graphs, soft, head, V, head.dtype)
    plan.capture()
    held = sum(G.graph_bytes(g) for g in plan.held)
    assert held == plan.planned_bytes()
    assert held < 0.5 * 1.0142 * 2**30, held / 2**30
    g = torch.Generator(device="cuda").manual_seed(5)
    with torch.inference_mode():  # and they still give the eager bits, the sampler's two kinds in turn
        for m in (256, 3, 100, 1):
            x = torch.randn(m, H, device="cuda", generator=g, dtype=torch.bfloat16)
            logits = head_graphs(x, extra=(head,))
            assert torch.equal(logits, K.linear(x, head)), m
            t = 0.5 + torch.rand(m, device="cuda", generator=g)
            assert torch.equal(soft(logits, t), K.log_softmax(logits, t)), m
            assert torch.equal(soft(logits, extra=(1.0,)), K.log_softmax(logits, 1.0)), m
