"""OnPolicyGRPOTrainer with nucleus / top-k / min-p sampling (issue 32), 3 steps on the CPU.

usage: python grpo_truncation.py MODEL_DIR OUTPUT_DIR [GRPOCONFIG_JSON]

GRPOConfig(top_k=20, top_p=0.9, min_p=0.02, temperature=0.7), everything else small and TRL's
default, then the JSON's settings on top. strict mode fails a step whose sampler and trainer logprobs differ. Prints one line
"RESULT {json}": TRL's own per-step log (`sampling/sampling_logp_difference/*`,
`sampling/importance_sampling_ratio/*`, `onpolicy/*`) and, after training, the control: the
engine's sampled logprobs with these settings against the trainer's *untruncated* logprobs (what
TRL compares them with), and against its truncated ones.
"""
import json
import sys

from datasets import Dataset
from trl import GRPOConfig

from onpolicy.trl_grpo import OnPolicyGRPOTrainer

path, output_dir = sys.argv[1], sys.argv[2]
EXTRA = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
TRUNC = dict(top_k=20, top_p=0.9, min_p=0.02)


def reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})
trainer = OnPolicyGRPOTrainer(
    model=path, reward_funcs=reward, train_dataset=ds, onpolicy="strict",
    args=GRPOConfig(use_vllm=True, vllm_mode="colocate", model_init_kwargs={"dtype": "bfloat16"}, use_cpu=True,
                    max_steps=3, output_dir=output_dir, temperature=0.7, **TRUNC, max_completion_length=16,
                    per_device_train_batch_size=8, num_generations=4, learning_rate=1e-4, warmup_steps=0,
                    logging_steps=1, report_to="none", vllm_gpu_memory_utilization=0.3, vllm_max_model_length=128,
                    **EXTRA))
KL = []  # beta > 0: TRL's KL to the reference, recomputed here from the loss's inputs at each step


def recompute_kl(inputs) -> float:
    """TRL's logged `kl` for one loss call, recomputed apart: per token exp(ref - pol) - (ref - pol) - 1 over
    the scored completion tokens, with the policy's truncated logprobs and the reference's full ones, each
    sequence scored alone through `onpolicy.token_logprobs` (no padding, no TRL code)."""
    import torch

    import onpolicy

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(inputs["completion_ids"].shape[0]):
            prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()]
            mask = inputs["completion_mask"][i].bool()
            n = int(mask.nonzero().max()) + 1 if mask.any() else 0
            if n == 0:
                continue
            ids = torch.cat([prompt, inputs["completion_ids"][i][:n]])[None]
            pol = onpolicy.token_logprobs(trainer.model, ids, temperature=0.7, logits_to_keep=n, **TRUNC)[0]
            ref = onpolicy.token_logprobs(trainer.ref_model, ids, temperature=0.7, logits_to_keep=n)[0]
            d = (ref - pol).double()
            kl = torch.exp(d) - d - 1
            total += float(kl[mask[:n]].sum())
            count += int(mask[:n].sum())
    return total / max(count, 1)


if trainer.beta != 0.0:
    loss_fn = trainer._compute_loss

    def compute_loss_and_recompute_kl(model, inputs):
        KL.append(recompute_kl(inputs))
        return loss_fn(model, inputs)

    trainer._compute_loss = compute_loss_and_recompute_kl
trainer.train()


def onpolicy_patched(model) -> bool:
    from onpolicy import is_patched

    return bool(is_patched(model))


def control(trainer) -> dict:
    import torch
    from vllm import SamplingParams

    import onpolicy

    trainer.vllm_generation.sync_weights()  # vLLM holds the weights of before the last optimizer step
    llm = trainer.vllm_generation.llm
    tok = trainer.processing_class
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False).input_ids for a, b in ((1, 2), (3, 4), (0, 0))]
    params = [SamplingParams(temperature=0.7, max_tokens=12, logprobs=0, seed=s, ignore_eos=True, **TRUNC)
              for _ in prompts for s in (1, 2)]
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts for _ in (1, 2)], params,
                                                 use_tqdm=False)]
    equal = untruncated_equal = total = 0
    for i, o in enumerate(outs):
        p = prompts[i // 2]
        ids = torch.tensor([p + list(o.token_ids)])
        sampled = torch.tensor([o.logprobs[k][t].logprob for k, t in enumerate(o.token_ids)], dtype=torch.float32)
        with torch.no_grad():
            mine = onpolicy.token_logprobs(trainer.model, ids, temperature=0.7, logits_to_keep=len(o.token_ids),
                                           **TRUNC)[0]
            full = onpolicy.token_logprobs(trainer.model, ids, temperature=0.7, logits_to_keep=len(o.token_ids))[0]
        equal += int((sampled == mine).sum())
        untruncated_equal += int((sampled == full).sum())
        total += sampled.numel()
    return {"equal": equal, "untruncated_equal": untruncated_equal, "total": total}


keys = ("sampling/sampling_logp_difference", "sampling/importance_sampling_ratio", "onpolicy/", "entropy", "loss", "kl")
log = [{k: v for k, v in row.items() if k == "step" or k.startswith(keys)} for row in trainer.state.log_history]
ref = getattr(trainer, "ref_model", None)
print("RESULT " + json.dumps({"log": log, "control": control(trainer), "kl_recomputed": KL,
                              "ref_model_patched": None if ref is None else onpolicy_patched(ref)}), flush=True)
