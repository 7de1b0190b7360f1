"""The decode-step CUDA graphs' selection logic (graphs.py) on the CPU; the graphs themselves
are checked bitwise against eager calls by tests/gpu/test_decode_graphs.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from onpolicy.vllm_plugin import graphs as G


def test_buckets_cover_every_row_count_once():
    assert G.buckets(G.MAX_ROWS) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert G.buckets(5) == [1, 2, 4, 8] and G.buckets(1) == [1] and G.buckets(0) == []
    assert G.buckets(10_000) == G.buckets(G.MAX_ROWS)
    for m in range(1, G.MAX_ROWS + 1):
        b = G.bucket(m)
        assert m <= b < 2 * m and b in G.buckets(m)
    with pytest.raises(ValueError):
        G.bucket(0)


def _config(enforce_eager=False, spec=None):
    return SimpleNamespace(model_config=SimpleNamespace(enforce_eager=enforce_eager), speculative_config=spec)


@pytest.mark.parametrize("env,device,flavour,eager,spec,reason", [
    (None, "cuda", "v2_026", False, None, ""),
    ("1", "cuda:1", "v2_026", False, None, ""),
    ("0", "cuda", "v2_026", False, None, "ONPOLICY_DECODE_GRAPHS=0"),
    (None, "cpu", "v2_026", False, None, "not a CUDA device"),
    (None, "cuda", "v1", False, None, "sampler layout"),
    (None, "cuda", "v2_026", True, None, "enforce_eager"),
    (None, "cuda", "v2_026", False, object(), "speculative decoding"),
])
def test_graphs_wanted_only_where_their_outputs_are_consumed_within_the_step(monkeypatch, env, device, flavour,
                                                                             eager, spec, reason):
    if env is None:
        monkeypatch.delenv(G.ENV, raising=False)
    else:
        monkeypatch.setenv(G.ENV, env)
    ok, why = G.wanted(_config(eager, spec), device, flavour)
    assert ok == (reason == "") and reason in why


def test_a_bad_switch_value_names_the_fix(monkeypatch):
    monkeypatch.setenv(G.ENV, "maybe")
    with pytest.raises(ValueError, match="use 1 .* or 0"):
        G.wanted(_config(), "cuda", "v2_026")


def test_rows_switch(monkeypatch):
    monkeypatch.delenv(G.ROWS_ENV, raising=False)
    assert G.max_rows_from_env() == G.MAX_ROWS
    monkeypatch.setenv(G.ROWS_ENV, "64")
    assert G.max_rows_from_env() == 64
    for bad in ("0", "1000", "many"):
        monkeypatch.setenv(G.ROWS_ENV, bad)
        with pytest.raises(ValueError, match=f"1 to {G.MAX_ROWS}"):
            G.max_rows_from_env()


def test_cpu_rows_run_eagerly():
    import onpolicy_kernels as K

    graphs = G.RowGraphs(lambda x, w: K.linear(x, w), "head")
    x, w = torch.randn(3, 16), torch.randn(32, 16)
    assert torch.equal(graphs(x, extra=(w,)), K.linear(x, w))
    assert graphs.captures == 0 and graphs.replays == 0 and not graphs._graphs


def test_keys_tell_apart_what_a_graph_bakes_in():
    graphs = G.RowGraphs(lambda *a: None, "k")
    x = torch.zeros(5, 4)
    w = torch.zeros(3, 4)
    assert graphs._key((x,), (w,)) is None  # CPU rows: never graphed
    # what the key holds for a CUDA call, computed the same way on keyable values
    assert G._key_of(1.0) != G._key_of(1)  # the float temperature vs an int
    assert G._key_of(w) != G._key_of(w.clone())  # another tensor: another address
    assert G._key_of(object()) is None



def test_a_moved_weight_makes_its_old_graphs_stale():
    """TRL's weight sync writes in place (same address, the graph stays); a weight replaced by a
    new tensor gets new graphs, and the old ones (baked to the old address) are dropped."""
    w, w2, other = torch.zeros(8, 4), torch.zeros(8, 4), torch.zeros(3, 4)
    row = (torch.bfloat16, (4,))
    key = lambda b, e: (b, "dev", row, G._key_of(e))  # noqa: E731
    assert G.stale(key(8, w), key(8, w2))  # same kind, moved
    assert not G.stale(key(8, w), key(8, w))  # the same key
    assert G.stale(key(4, w), key(8, w2))  # another bucket of the moved weight: dead too, dropped at once
    assert not G.stale(key(8, other), key(8, w2))  # another shape: another kind of call
    assert not G.stale((8, "dev", row, G._key_of(1.0)), (8, "dev", row, G._key_of(2.0)))  # constants differ


@pytest.mark.parametrize("vocab", [48, 40], ids=["vocab=head", "padded_head"])
@pytest.mark.parametrize("head_dtype", [None, torch.bfloat16, torch.float32], ids=["model", "same", "fp32"])
def test_install_and_warm_up_wiring(monkeypatch, head_dtype, vocab):
    """Where graphs are wanted (forced here: the CPU never wants them), the sampler always gets
    graphs and the head gets them unless an fp32 head_dtype makes it run eagerly; the warm-up then
    visits every bucket with logits of the head's output dtype (on the CPU the calls run eagerly)."""
    import onpolicy.vllm_plugin as plugin

    plugin.enable()
    from onpolicy.vllm_plugin import compat
    from onpolicy.vllm_plugin.linear import classes

    LP = classes()["OnpolicyLogitsProcessor"]
    proc = LP.__new__(LP)
    torch.nn.Module.__init__(proc)
    # vocab 40 < 48 rows: vLLM's ParallelLMHead pads the vocabulary (to a multiple of 64), the logits
    # processor cuts the padding off, so the head's graphs hold 48 columns and the sampler's 40
    proc.head_dtype, proc.org_vocab_size = head_dtype, vocab
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(16, 48, bias=False).to(torch.bfloat16)
    model.logits_processor = proc
    sampler = SimpleNamespace()
    runner = SimpleNamespace(sampler=sampler)
    monkeypatch.setattr(compat, "sampler_flavour", lambda s: "v2_026")
    monkeypatch.setattr(G, "wanted", lambda cfg, dev, flavour: (True, ""))
    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=5))
    assert G.install(runner, model, cfg) == ""
    assert sampler._onpolicy_graphs.max_rows == 5
    assert hasattr(proc, "_onpolicy_graphs") == (head_dtype != torch.float32)
    head_graphs = [proc._onpolicy_graphs] if head_dtype != torch.float32 else []
    assert G.installed(runner, model) == head_graphs + [sampler._onpolicy_graphs]  # what the stats report
    import onpolicy_kernels as K  # the graphs run the plugin's own ops (eagerly on the CPU)

    x, w, lg = torch.randn(3, 16).to(torch.bfloat16), model.lm_head.weight, torch.randn(3, vocab)
    if head_dtype != torch.float32:
        assert torch.equal(proc._onpolicy_graphs(x, extra=(w,)), K.linear(x, w))
    assert torch.equal(sampler._onpolicy_graphs(lg, extra=(0.7,)), K.log_softmax(lg, 0.7))

    # what the worker takes out of the KV cache's budget: one input per argument position and one output
    # per argument kinds, of the largest bucket's rows (8 for max_num_seqs 5)
    logits_size = torch.empty((), dtype=head_dtype or torch.bfloat16).element_size()
    soft_bytes = 8 * (vocab * logits_size + 4) + 2 * 8 * vocab * 4
    head_bytes = 8 * (16 + 48) * 2 if head_dtype != torch.float32 else 0
    assert G.planned_bytes(runner, model) == soft_bytes + head_bytes

    seen = []
    monkeypatch.setattr(G, "capture_buckets", lambda g, make, extra=(): seen.append(
        (g.name, make(8)[0].dtype, tuple(make(8)[0].shape), extra)))
    G.warm_up(runner, model)
    logits = head_dtype or torch.bfloat16
    soft = [("the sampler's log-softmax", logits, (8, vocab), (1.0,)),
            ("the sampler's log-softmax", logits, (8, vocab), ())]
    head = [] if head_dtype == torch.float32 else [("the LM head", torch.bfloat16, (8, 16), (model.lm_head.weight,))]
    assert seen == head + soft
    assert sampler._onpolicy_graphs.warmed


def test_the_worker_keeps_the_graphs_buffers_inside_the_memory_budget(monkeypatch):
    """vLLM sizes the KV cache from determine_available_memory; the plugin's worker returns it less the
    decode graphs' planned bytes (so the engine keeps to gpu_memory_utilization), with the graphs eager
    while vLLM profiles (its profile run calls the head and sampler: a capture there would count their
    buffers twice), leaves a KV cache the user sized (kv_cache_memory_bytes) alone -- but not one vLLM's
    startup plan sizes inside the call, from a run without the graphs -- and names the fixes where
    nothing would be left."""
    from onpolicy.vllm_plugin import compat, worker as W
    from onpolicy.vllm_plugin.errors import OnpolicyVllmError

    graphs = G.RowGraphs(lambda x: x, "head")
    seen = []

    class Base:
        def determine_available_memory(self):
            seen.append(graphs.paused)
            if self.startup_plan:
                self.cache_config.kv_cache_memory_bytes = self.available_kv_cache_memory_bytes
            return self.available_kv_cache_memory_bytes

    class Worker(W.OnpolicyWorkerMixin, Base):
        pass

    planned = {"bytes": 300}
    monkeypatch.setattr(G, "planned_bytes", lambda runner, model: planned["bytes"])
    monkeypatch.setattr(G, "installed", lambda runner, model: [graphs])
    monkeypatch.setattr(compat, "runner_model", lambda runner: object())
    w = Worker.__new__(Worker)  # no vLLM worker behind it
    w.model_runner, w.cache_config, w.available_kv_cache_memory_bytes = object(), SimpleNamespace(
        kv_cache_memory_bytes=None), 1000
    w.startup_plan = False
    assert w.determine_available_memory() == 700 and w.available_kv_cache_memory_bytes == 700
    assert seen == [True] and not graphs.paused  # eager during vLLM's profiling, graphed again after
    planned["bytes"] = 0  # no graphs installed (CPU, enforce_eager, ONPOLICY_DECODE_GRAPHS=0)
    assert w.determine_available_memory() == 700
    planned["bytes"] = 300
    w.cache_config.kv_cache_memory_bytes = 700  # the user's size
    assert w.determine_available_memory() == 700
    w.cache_config.kv_cache_memory_bytes, w.startup_plan = None, True  # set inside the call by vLLM
    assert w.determine_available_memory() == 400
    w.cache_config.kv_cache_memory_bytes, w.startup_plan = None, False
    planned["bytes"] = 900
    with pytest.raises(OnpolicyVllmError, match="raise gpu_memory_utilization, or lower ONPOLICY_DECODE_GRAPH_ROWS"):
        w.determine_available_memory()
    assert not graphs.paused


def test_a_pool_left_without_graphs_is_not_captured_into_again():
    """PyTorch frees a graph pool once its last graph goes; capturing into the old handle trips the
    caching allocator's `use_count > 0` assert (an H100, when a moved weight dropped every graph). So
    dropping the last graph forgets the pool (a new one is made at the next capture), and dropped
    graphs' static outputs go with them."""
    graphs = G.RowGraphs(lambda x: x, "head")
    live = G._Graph(None, (), None)
    graphs._pool = "pool"
    graphs._graphs = {(8, "dev", "a"): live, (8, "dev", "b"): False}
    graphs._outputs = {("dev", "a"): "out a", ("dev", "b"): "out b", ("dev", "c"): "out c"}
    graphs._forget_dropped()
    assert graphs._pool == "pool" and set(graphs._outputs) == {("dev", "a"), ("dev", "b")}
    del graphs._graphs[(8, "dev", "a")]  # only a failed capture (eager) left: no graph holds the pool
    graphs._forget_dropped()
    assert graphs._pool is None and set(graphs._outputs) == {("dev", "b")}
