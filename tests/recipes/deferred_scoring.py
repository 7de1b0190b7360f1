"""Strict mode compares in the loss forward and skips TRL's scoring forward (issue 30).

usage: python deferred_scoring.py MODEL_DIR OUTPUT_DIR

Two chunks per generation (gradient_accumulation_steps = steps_per_generation = 2). Steps 1-2:
bitwise, and the policy never ran a no-grad forward (TRL's `old_per_token_logps` was skipped).
Then the weight sync is cut, so step 3 samples with step 2's weights: its first chunk's loss
forward must raise MismatchError before any backward or optimizer step. Prints "RESULT {json}".
"""
import json
import sys

import torch
from datasets import Dataset
from trl import GRPOConfig

from onpolicy.metrics import MismatchError
from onpolicy.trl_grpo import OnPolicyGRPOTrainer

path, output_dir = sys.argv[1], sys.argv[2]


def reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) + 0.1 * len(c) for c in completions]


ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})
cfg = GRPOConfig(use_vllm=True, vllm_mode="colocate", model_init_kwargs={"dtype": "bfloat16"}, use_cpu=True,
                 bf16=False, per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2,
                 steps_per_generation=2, max_completion_length=8, learning_rate=1e-3, max_steps=3,
                 output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1)
trainer = OnPolicyGRPOTrainer(model=path, reward_funcs=reward, train_dataset=ds, onpolicy="strict", args=cfg)
forwards = {"no_grad": 0, "grad": 0}
inner = trainer._get_per_token_logps_and_entropies
backwards = []


def counted(model, *a, **k):
    out = inner(model, *a, **k)
    if model is trainer.model and not torch.isnan(out[0]).any():
        forwards["grad" if torch.is_grad_enabled() else "no_grad"] += 1
    return out


trainer._get_per_token_logps_and_entropies = counted
backward = trainer.accelerator.backward
trainer.accelerator.backward = lambda loss, **k: (backwards.append(trainer.state.global_step), backward(loss, **k))[1]


class CutSync:
    def __init__(self):
        self.cut = False


cut = CutSync()
sync = trainer.vllm_generation.sync_weights
trainer.vllm_generation.sync_weights = lambda: None if cut.cut else sync()
from transformers import TrainerCallback  # noqa: E402


class Cut(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            cut.cut = True  # step 3's generation samples with step 2's weights


trainer.add_callback(Cut())
error = None
try:
    trainer.train()
except MismatchError as e:
    error = str(e)
print("RESULT " + json.dumps({"forwards": forwards, "error": error, "global_step": trainer.state.global_step,
                              "backwards": backwards}), flush=True)
