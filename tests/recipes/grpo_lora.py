"""OnPolicyGRPOTrainer with a LoRA adapter (issue 32), 3 steps on the CPU.

usage: python grpo_lora.py MODEL_DIR OUTPUT_DIR [GRPOCONFIG_JSON]

peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), TRL's colocate vLLM, strict mode
(a step whose sampler and trainer logprobs differ fails), then the JSON's GRPOConfig settings on top.
Prints one line "RESULT {json}": TRL's per-step log, how many base-weight and adapter elements
changed over the run (the sync included), and, after training, the control: the engine's sampled
logprobs against the trainer's with the merged LoRA forward, and with a forward that ignores the
adapter (the patched forward before LoRA support).
"""
import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig

from onpolicy.trl_grpo import OnPolicyGRPOTrainer

path, output_dir = sys.argv[1], sys.argv[2]
EXTRA = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}


def reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})
trainer = OnPolicyGRPOTrainer(
    model=path, reward_funcs=reward, train_dataset=ds, onpolicy="strict",
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    args=GRPOConfig(use_vllm=True, vllm_mode="colocate", model_init_kwargs={"dtype": "bfloat16"}, use_cpu=True,
                    max_steps=3, output_dir=output_dir, max_completion_length=16, per_device_train_batch_size=8,
                    num_generations=4, learning_rate=1e-3, warmup_steps=0, logging_steps=1, report_to="none",
                    vllm_gpu_memory_utilization=0.3, vllm_max_model_length=128, **EXTRA))


def snapshot(adapter: bool) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ("lora_" in n) == adapter}


def changed(before: dict) -> int:
    now = dict(trainer.model.named_parameters())
    return sum(int((now[n].detach() != p).sum()) for n, p in before.items())


base0, adapter0 = snapshot(False), snapshot(True)
trainer.train()


def control() -> dict:
    from vllm import SamplingParams

    import onpolicy
    from onpolicy.trainer import lora

    trainer.vllm_generation.sync_weights()  # vLLM holds the weights of before the last optimizer step
    llm, tok = trainer.vllm_generation.llm, trainer.processing_class
    core = trainer.model.get_base_model()
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False).input_ids for a, b in ((1, 2), (3, 4), (0, 0))]
    params = [SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=s, ignore_eos=True)
              for _ in prompts for s in (1, 2)]
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts for _ in (1, 2)], params,
                                                 use_tqdm=False)]
    merged_weight_of = lora.weight_of
    equal = base_only_equal = total = 0
    logps = []
    for i, o in enumerate(outs):
        ids = torch.tensor([prompts[i // 2] + list(o.token_ids)])
        sampled = torch.tensor([o.logprobs[k][t].logprob for k, t in enumerate(o.token_ids)], dtype=torch.float32)
        with torch.no_grad():
            mine = onpolicy.token_logprobs(core, ids, logits_to_keep=len(o.token_ids))[0]
            lora.weight_of = lambda m: m.weight  # the control: a forward that reads the base weights only
            try:
                base_only = onpolicy.token_logprobs(core, ids, logits_to_keep=len(o.token_ids))[0]
            finally:
                lora.weight_of = merged_weight_of
        equal += int((sampled == mine).sum())
        base_only_equal += int((sampled == base_only).sum())
        total += sampled.numel()
        logps += sampled.tolist()
    return {"equal": equal, "base_only_equal": base_only_equal, "total": total,
            "distinct": len({tuple(o.token_ids) for o in outs}), "mean_logp": sum(logps) / len(logps)}


keys = ("sampling/sampling_logp_difference", "sampling/importance_sampling_ratio", "onpolicy/", "loss", "kl",
        "completions/", "num_tokens")
log = [{k: v for k, v in row.items() if k == "step" or k.startswith(keys)} for row in trainer.state.log_history]
c = control()
print("RESULT " + json.dumps({"log": log, "control": c, "base_changed": changed(base0), "base_total": sum(
    p.numel() for p in base0.values()), "adapter_changed": changed(adapter0), "adapter_total": sum(
    p.numel() for p in adapter0.values())}), flush=True)
