"""Issue 28 (first contact), the trainer-side items that need no vLLM engine.

* item 1: TRL's default `bf16=True` runs the trainer under autocast; the patched forward (and
  TRL's fused LM head served by onpolicy) must give the same bits with and without it. TRL
  settings that cannot be made bitwise are refused before the engine is built, naming the
  setting and the fix; the mismatch hint names the likely cause.
* item 5: run directories hold one run (refused / overwritten / resumed).
* item 8: `token_logprobs` input validation.
* item 10: patch_model twice, unpatch_model once.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

import onpolicy
from onpolicy.tiny import make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path_factory.mktemp("fc") / "qwen3", "qwen3", dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def _batch(seed=0, B=4, L=20, vocab=1024):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, L), generator=g)
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :5] = 0  # left padding in one row
    return ids, mask


# --- item 1: autocast --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_does_not_change_the_patched_bits(model, monkeypatch, tmp_path, dtype):
    """bf16=True / fp16=True in TRL: autocast in the model's dtype around the trainer's forward."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from onpolicy.trainer import forward

    if dtype != torch.bfloat16:
        model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", "qwen3", dtype=dtype),
                                                     dtype=dtype).eval()
    ids, mask = _batch()
    with torch.no_grad():
        plain = onpolicy.token_logprobs(model, ids, mask, temperature=0.7)
        with torch.autocast("cpu", dtype=dtype):
            auto = onpolicy.token_logprobs(model, ids, mask, temperature=0.7)
    assert auto.dtype == torch.float32 and torch.equal(plain, auto)
    assert float(plain[mask[:, 1:].bool()].mean()) < -0.5  # a real distribution, not a degenerate one
    # control: without the fix (autocast left on inside the patched forward) the bits change
    monkeypatch.setattr(forward, "no_autocast", lambda device: contextlib.nullcontext())
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        broken = onpolicy.token_logprobs(model, ids, mask, temperature=0.7)
    assert not torch.equal(plain, broken)


def test_trl_fused_lm_head_is_bitwise_under_autocast(model):
    """TRL's `model(..., labels=..., fused_lm_head=True)` inside `accelerator.autocast()` (bf16=True)."""
    pytest.importorskip("trl")
    import copy

    from onpolicy.trl_grpo import add_onpolicy_lm_head

    m = copy.deepcopy(model)
    onpolicy.patch_model(m)
    add_onpolicy_lm_head(m, 1.0)
    ids, mask = _batch(1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-8] = -100
    with torch.no_grad():
        plain = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
        want = onpolicy.token_logprobs(model, ids, mask, temperature=1.0)
    assert torch.equal(plain, auto)
    keep = labels[:, 1:] != -100
    assert torch.equal(auto[keep], want[keep])


# --- item 1: settings refused before the engine is built ----------------------------------------------------------

def _cfg(**kw):
    base = dict(top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, generation_kwargs=None,
                use_liger_kernel=False, cast_lm_head_to_fp32=False, vllm_importance_sampling_correction=True,
                bf16=True, fp16=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("change, named", [
    ({"top_p": 1.5}, "top_p must be in (0, 1]"), ({"min_p": 2.0}, "min_p must be in [0, 1]"),
    ({"top_k": -3}, "top_k must be 0 or -1 (off) or >= 1"),
    ({"generation_kwargs": {"top_p": 0.9}}, "set GRPOConfig(top_p=...) instead"),
    ({"repetition_penalty": 1.1}, "repetition_penalty=1.1"),
    ({"generation_kwargs": {"presence_penalty": 0.5}}, "generation_kwargs['presence_penalty']"),
    ({"use_liger_kernel": True}, "use_liger_kernel=True"),
    ({"cast_lm_head_to_fp32": True}, "cast_lm_head_to_fp32=True"),
    ({"vllm_importance_sampling_correction": False}, "vllm_importance_sampling_correction=False"),
])
def test_settings_that_cannot_be_bitwise_are_refused_naming_the_fix(change, named):
    from onpolicy.trl_grpo import check_settings

    assert check_settings(_cfg(), "strict") == []  # TRL's defaults (bf16=True included) pass
    with pytest.raises(ValueError) as e:
        check_settings(_cfg(**change), "strict")
    msg = str(e.value)
    assert named in msg and "set " in msg or "remove it" in msg or "must be" in msg, msg


@pytest.mark.parametrize("change", [{"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"top_k": 20, "top_p": 0.95, "min_p": 0.05}])
def test_top_k_top_p_min_p_are_accepted(change):
    """Issue 32: the trainer applies the sampler's truncation, so these are bitwise, not refused."""
    from onpolicy.trl_grpo import check_settings

    assert check_settings(_cfg(**change), "strict") == []


def test_repetition_penalty_is_a_warning_in_monitor_mode_and_fine_in_the_control():
    from onpolicy.trl_grpo import check_settings

    warnings = check_settings(_cfg(repetition_penalty=1.2), "monitor")
    assert len(warnings) == 1 and "repetition_penalty=1.2" in warnings[0]
    assert check_settings(_cfg(repetition_penalty=1.2, top_k=5), "off") == []
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=False"):
        check_settings(_cfg(vllm_importance_sampling_correction=False), "off")


def test_the_mismatch_hint_names_the_likely_cause():
    from onpolicy.metrics import describe_mismatch, mismatch_metrics

    s = torch.tensor([[-1.0, -2.0]])
    m = mismatch_metrics(s, s + torch.tensor([[0.0, 1e-3]]))
    assert "onpolicy check" in describe_mismatch(m, 1)  # no cause known: the generic hint
    msg = describe_mismatch(m, 3, cause="likely cause: this run's configuration (repetition_penalty=1.1)")
    assert msg.startswith("step 3: ") and "repetition_penalty=1.1" in msg and "onpolicy check" not in msg


# --- item 5: run directories --------------------------------------------------------------------------------------

def test_a_run_dir_with_an_earlier_run_is_refused_overwritten_or_resumed(tmp_path):
    from onpolicy.runlog import RunDirError, RunLog, checkpoint_step

    d = tmp_path / "run"
    log = RunLog.open(d)  # a fresh directory
    for step in (1, 2, 3):
        log.log_step(step, {"tokens": step}, [{"seq": 0}])
    (d / "runs" / "x").mkdir(parents=True)
    (d / "runs" / "x" / "events.out.tfevents.1.host").write_bytes(b"old")
    with pytest.raises(RunDirError, match="already holds an earlier run's records.*metrics.jsonl.*tokens/.*TensorBoard"):
        RunLog.open(d)
    # resume at step 2: step 3's records go (the resumed run redoes step 3), steps 1-2 stay
    (d / "checkpoint-2").mkdir()
    (d / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    log = RunLog.open(d, resume_step=checkpoint_step(d / "checkpoint-2"))
    log.log_step(3, {"tokens": 30})
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tokens"]) for r in rows] == [(1, 1), (2, 2), (3, 30)]
    assert sorted(p.name for p in (d / "tokens").iterdir()) == ["step_000001.json", "step_000002.json"]
    # overwrite: every earlier record is gone (TensorBoard events included), the checkpoint stays
    RunLog.open(d, overwrite=True).log_step(1, {"tokens": 9})
    assert [json.loads(x)["tokens"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [9]
    assert not list((d / "tokens").iterdir()) and not list(d.rglob("events.out.tfevents.*"))
    assert (d / "checkpoint-2" / "trainer_state.json").exists()
    with pytest.raises(ValueError, match="cannot read the step of checkpoint"):
        checkpoint_step(tmp_path / "nope")


# --- item 8: token_logprobs input validation -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"chunk_rows": -5}, "chunk_rows"),
    ({"chunk_rows": 0}, "chunk_rows"),
    ({"input_ids": torch.zeros(0, 8, dtype=torch.long)}, "input_ids has shape (0, 8)"),
    ({"input_ids": torch.ones(2, 1, dtype=torch.long)}, "input_ids has shape (2, 1)"),
    ({"attention_mask": torch.zeros(4, 20, dtype=torch.long)}, "attention_mask is all padding"),
    ({"attention_mask": torch.ones(4, 19, dtype=torch.long)}, "attention_mask must have input_ids' shape"),
    ({"temperature": torch.ones(3)}, "one value per row (4)"),
    ({"temperature": float("inf")}, "temperature must be finite and > 0"),
    ({"temperature": float("nan")}, "temperature must be finite and > 0"),
    ({"temperature": 0.0}, "temperature must be finite and > 0"),
    ({"temperature": -1.0}, "temperature must be finite and > 0"),
    ({"temperature": torch.tensor([1.0, 0.7, float("inf"), 1.0])}, "temperature must be finite and > 0"),
    ({"input_ids": torch.full((4, 20), 1024)}, "token id 1024, outside the model's vocabulary [0, 1024)"),
    ({"input_ids": torch.full((4, 20), -1)}, "token id -1"),
    ({"input_ids": torch.ones(4, 20)}, "integer token ids"),
])
def test_token_logprobs_rejects_bad_input_naming_the_argument(model, kwargs, named):
    ids, _ = _batch()
    args = {"input_ids": ids, "attention_mask": None, **kwargs}
    with pytest.raises(ValueError) as e:
        onpolicy.token_logprobs(model, args.pop("input_ids"), args.pop("attention_mask"), **args)
    assert named in str(e.value), str(e.value)
    assert not onpolicy.is_patched(model)  # a refused call leaves nothing behind


def test_chunk_rows_splits_without_changing_the_bits(model):
    ids, mask = _batch(2)
    with torch.no_grad():
        whole = onpolicy.token_logprobs(model, ids, mask)
        chunked = onpolicy.token_logprobs(model, ids, mask, chunk_rows=7)
    scored = (mask[:, 1:] * mask[:, :-1]).bool()
    assert torch.equal(whole, chunked) and bool((whole[scored] < 0).all())


# --- item 10: patch twice, unpatch once ------------------------------------------------------------------------------

def test_patch_twice_unpatch_once_stays_patched_as_documented(model):
    from onpolicy.trainer import patch

    ids, _ = _batch(3, B=1)
    with torch.no_grad():
        before = model(ids).logits
    onpolicy.patch_model(model)
    onpolicy.patch_model(model)
    onpolicy.unpatch_model(model)
    assert onpolicy.is_patched(model)  # one level left
    with torch.no_grad():
        still = model(ids).logits
    assert not torch.equal(still, before)  # still on onpolicy's kernels
    onpolicy.unpatch_model(model)
    assert not onpolicy.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    onpolicy.patch_model(model)
    onpolicy.patch_model(model)
    onpolicy.unpatch_model(model, force=True)
    assert not onpolicy.is_patched(model)
    doc = patch.patch_model.__doc__ + patch.unpatch_model.__doc__ + patch.__doc__
    assert "no-op" not in doc and "once per `patch_model`" in doc


def test_the_trainer_names_config_or_kernels_as_the_likely_cause(model):
    pytest.importorskip("trl")
    from onpolicy.trl_grpo import make_trainer_class

    cls = make_trainer_class()
    me = types.SimpleNamespace(args=_cfg(repetition_penalty=1.1), model=model)
    assert "repetition_penalty=1.1" in cls._likely_cause(me, 1) and "configuration" in cls._likely_cause(me, 1)
    me = types.SimpleNamespace(args=_cfg(), model=model)
    hint = cls._likely_cause(me, 1)
    assert "likely the kernels" in hint and "--dtype bfloat16" in hint and "onpolicy check --model" in hint
    me._onpolicy_bitwise_steps = 2  # earlier steps were bitwise: the weights, not the kernels
    assert "weight sync" in cls._likely_cause(me, 3)
