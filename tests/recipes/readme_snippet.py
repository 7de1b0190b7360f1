"""The README's `OnPolicyGRPOTrainer` snippet, as a user copies it, with TRL's defaults (issue 28).

usage: python readme_snippet.py MODEL_DIR OUTPUT_DIR

Between the markers is the snippet exactly as README.md shows it (keep the two in step); above
it, what a user brings (a model path, a reward, a data set); the GRPOConfig sets only what the
snippet's `...` stands for here: use_cpu=True (this CPU machine: TRL's default bf16=True needs
it), max_steps=3, max_completion_length=32 (TRL's 256 tokens took the suite ~60 s more) and output_dir.
Everything else is TRL's default: bf16=True (autocast), gradient checkpointing, top_k/top_p/min_p off,
repetition_penalty 1.

After training, in the same process: the sampler's logprobs on fresh prompts against the
patched trainer (must be bitwise), the plain transformers forward (the control, must differ)
and how varied the sampling is (the non-degeneracy check); printed as "CHECK {json}".
"""
import json
import sys

from datasets import Dataset
from trl import GRPOConfig

path, output_dir = sys.argv[1], sys.argv[2]


def reward(completions, **kwargs):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(5) for b in range(5)]})

# --- the README snippet -----------------------------------------------------------------------------------------
from onpolicy.trl_grpo import OnPolicyGRPOTrainer
trainer = OnPolicyGRPOTrainer(model=path, reward_funcs=reward, train_dataset=ds, onpolicy="strict",
                              args=GRPOConfig(use_vllm=True, vllm_mode="colocate",
                                              model_init_kwargs={"dtype": "bfloat16"},
                                              use_cpu=True, max_steps=3, max_completion_length=32,
                                              output_dir=output_dir))
trainer.train()
# --- end of the README snippet -----------------------------------------------------------------------------------


def check(trainer) -> dict:
    import copy
    import os

    import torch
    from vllm import SamplingParams

    import onpolicy

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vllm"))
    from vllm_helpers import degeneracy_report

    trainer.vllm_generation.sync_weights()  # vLLM holds the weights of before the last optimizer step
    llm = trainer.vllm_generation.llm
    tok = trainer.processing_class
    prompts = [tok(f"{a}+{b}=", add_special_tokens=False).input_ids for a, b in ((1, 2), (3, 4), (0, 0), (4, 1))]
    seeds = (1, 2, 3, 4)
    reqs = [{"prompt_token_ids": p} for p in prompts for _ in seeds]
    params = [SamplingParams(temperature=1.0, max_tokens=12, logprobs=0, seed=s, ignore_eos=True)
              for _ in prompts for s in seeds]
    outs = [o.outputs[0] for o in llm.generate(reqs, params, use_tqdm=False)]
    policy = trainer.model
    plain = copy.deepcopy(policy)
    onpolicy.unpatch_model(plain, force=True)
    plain.__dict__.pop("forward", None)  # onpolicy's fused LM head for TRL
    equal = plain_equal = total = 0
    comps, lps = [], []
    for i, o in enumerate(outs):
        p = prompts[i // len(seeds)]
        ids = torch.tensor([p + list(o.token_ids)])
        sampled = torch.tensor([o.logprobs[k][t].logprob for k, t in enumerate(o.token_ids)], dtype=torch.float32)
        with torch.no_grad():
            mine = onpolicy.token_logprobs(policy, ids, logits_to_keep=len(o.token_ids))[0]
            logits = plain(ids).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, ids[0, len(p):, None])[:, 0]
        equal += int((sampled == mine).sum())
        plain_equal += int((sampled == ref).sum())
        total += sampled.numel()
        lps += sampled.tolist()
        if i % len(seeds) == 0:
            comps.append([])
        comps[-1].append(list(o.token_ids))
    return {"equal": equal, "plain_equal": plain_equal, "total": total, "degeneracy": degeneracy_report(comps, lps)}


print("CHECK " + json.dumps(check(trainer)), flush=True)
