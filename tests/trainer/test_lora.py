"""LoRA (PEFT) on the patched forward (onpolicy/trainer/lora.py), without vLLM: the forward of a LoRA model
equals, bitwise, the forward of the model holding the merged weights the sync sends; gradients reach the
adapter only; the sync's merge leaves the base weights' bits alone, where PEFT's own merge/unmerge
moves them (the control); unsupported configs are refused with the fix."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import onpolicy  # noqa: E402
from onpolicy.trainer import lora  # noqa: E402


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from onpolicy.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("lora") / "qwen3", "qwen3", dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def _lora_model(base, seed=0, **cfg):
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would make every merge exact
        for _, m in lora.lora_layers(model):
            b = m.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.01)
    return model


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _ids(seed=1):
    return torch.randint(0, 1024, (3, 20), generator=torch.Generator().manual_seed(seed))


def test_lora_forward_is_the_merged_weights_forward_bitwise(base_model):
    model = _lora_model(base_model)
    assert lora.check_lora_model(model) == []
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's upcast
    ids = _ids()
    with onpolicy.patched(model.get_base_model()):
        mine = onpolicy.token_logprobs(model.get_base_model(), ids)
        with model.disable_adapter():  # TRL's reference pass with PEFT: the base weights only
            ref = onpolicy.token_logprobs(model.get_base_model(), ids)
    # what vLLM receives: the weights as the (exact) sync leaves them merged
    lora.install_exact_merge(model)
    model.merge_adapter()
    merged = copy.deepcopy(base_model)  # a plain model holding the merged weights, no adapter left to apply
    with torch.no_grad():
        for name, m in lora.lora_layers(model):
            merged.get_submodule(name.removeprefix("base_model.model.")).weight.copy_(m.get_base_layer().weight)
    model.unmerge_adapter()
    with onpolicy.patched(merged):
        want = onpolicy.token_logprobs(merged, ids)
    with onpolicy.patched(base_model):
        base = onpolicy.token_logprobs(base_model, ids)
    assert torch.equal(mine, want)
    assert torch.equal(ref, base)
    assert not torch.equal(mine, base)  # the adapter does change the numbers (the test can fail)
    assert (mine < -0.5).float().mean() > 0.5  # non-degenerate: logprobs well below 0


def test_gradients_reach_the_adapter_only(base_model):
    model = _lora_model(base_model)
    ids = _ids(2)
    with onpolicy.patched(model.get_base_model()):
        onpolicy.token_logprobs(model.get_base_model(), ids).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    lora_grads = [g for n, g in grads.items() if "lora_" in n]
    assert len(lora_grads) == 2 * 7 * base_model.config.num_hidden_layers and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_exact_merge_keeps_base_bits_where_peft_merge_drifts(base_model):
    peft_model = _lora_model(base_model)
    before = _base_weights(peft_model)
    for _ in range(3):  # PEFT's own merge/unmerge, as TRL's sync calls it: (W + d) - d in bf16
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
    after = _base_weights(peft_model)
    drifted = sum(int((before[n] != after[n]).sum()) for n in before)
    assert drifted > 0, "control: PEFT's merge/unmerge kept the base bits, the test below proves nothing"

    model = _lora_model(base_model)
    assert lora.install_exact_merge(model) == 7 * base_model.config.num_hidden_layers
    before = _base_weights(model)
    for _ in range(3):
        model.merge_adapter()
        m = lora.lora_layers(model)[0][1]
        w = m.get_base_layer().weight
        assert m.merged and torch.equal(w, lora.merged_weight(before[f"{lora.lora_layers(model)[0][0]}.base_layer."
                                                                        "weight"], m.lora_A["default"].weight,
                                                                 m.lora_B["default"].weight, m.scaling["default"]))
        model.unmerge_adapter()
    after = _base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    print(f"\nPEFT merge/unmerge x3 moved {drifted} base weight elements; onpolicy's exact merge moved 0")


@pytest.mark.parametrize("cfg, disable_dropout, needle", [
    ({"use_dora": True}, False, "use_dora"),
    ({"lora_dropout": 0.1}, False, "disable_dropout=True"),
    ({"lora_bias": True}, False, "lora_bias=False"),
    ({"modules_to_save": ["lm_head"]}, False, "modules_to_save"),
])
def test_unsupported_configs_are_refused_with_the_fix(cfg, disable_dropout, needle):
    problems = lora.check_lora_config(LoraConfig(r=8, **cfg), disable_dropout)
    assert len(problems) == 1 and needle in problems[0], problems


def test_supported_configs_pass():
    assert lora.check_lora_config(LoraConfig(r=8, lora_dropout=0.1), disable_dropout=True) == []
    assert lora.check_lora_config(LoraConfig(r=4, use_rslora=True, target_modules=["q_proj", "v_proj"]), False) == []
    from peft import PrefixTuningConfig

    (p,) = lora.check_lora_config(PrefixTuningConfig(num_virtual_tokens=4), False)
    assert "LoraConfig" in p


def test_lora_on_the_embedding_is_refused(base_model):
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    (p,) = lora.check_lora_model(model)
    assert "embed_tokens" in p and "target_modules" in p


def test_peft_style_forward_is_not_the_merged_bits(base_model):
    """Why the trainer multiplies by the merged weight: PEFT's forward, x W^T + s * B(A x), is the same function
    with other bits than vLLM's one product with the merged weight."""
    import onpolicy_kernels as K

    model = _lora_model(base_model, seed=3)
    m = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(64, m.in_features, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
    with torch.no_grad():
        merged = K.linear(x, lora.weight_of(m))
        peft_style = (K.linear(x, m.get_base_layer().weight) + (x.float() @ a.t() @ b.t()) * s).to(torch.bfloat16)
    assert not torch.equal(merged, peft_style)
    assert torch.allclose(merged.float(), peft_style.float(), atol=0.1)  # the same function


def test_the_trainer_refuses_an_unsupported_lora_config_before_the_engine(tmp_path):
    from trl import GRPOConfig

    from onpolicy.trl_grpo import OnPolicyGRPOTrainer

    cfg = GRPOConfig(use_vllm=True, vllm_mode="colocate", use_cpu=True, output_dir=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match=r"(?s)cannot make this PEFT config bitwise.*use_dora.*use plain LoRA") as e:
        OnPolicyGRPOTrainer(model="no-such-model", reward_funcs=[], args=cfg,
                            peft_config=LoraConfig(r=8, use_dora=True, lora_dropout=0.05))
    assert "disable_dropout=True" in str(e.value)  # every problem named, each with its fix
