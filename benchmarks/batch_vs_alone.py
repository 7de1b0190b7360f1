"""Does vLLM sample each sequence with the same logprob bits alone as in `onpolicy check`'s batch? (GPU or CPU)

    python benchmarks/batch_vs_alone.py MODEL [--prompts 64] [--max-tokens 8] [--prefix-caching on|off]
        [--cuda-graphs] [--temperature 1.0] [--trainer]

`onpolicy check` samples its prompts in one batch and scores each sequence alone in the trainer.
This runs the same prompts and sampling parameters (check's own `load_prompts` and `sample`) through
one engine twice: all in one batch, then each prompt alone (the prefix cache reset before each run),
and counts the tokens whose sampled logprob has the same bits both ways. With --trainer it also
scores each batched sequence in the patched trainer, so a mismatch is placed on one side:
batch != alone == trainer is the engine's batch; batch == alone != trainer is the two stacks.

Set ONPOLICY_MOE_CUDA=1 for an MoE model on CUDA.
"""
import argparse
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prefix-caching", default="on", choices=["on", "off"])
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--trainer", action="store_true", help="also score each batched sequence in the patched trainer")
    a = p.parse_args()
    from onpolicy.check.engines import engine_dtype, load_trainer, make_engine, sample, trainer_logprobs
    from onpolicy.check.inputs import load_prompts, validate_model
    from onpolicy.check.run import compare

    cfg = validate_model(a.model)
    prompts = load_prompts(None, a.prompts, cfg.vocab_size, 0)
    llm = make_engine(a.model, plugin=True, cuda_graphs=a.cuda_graphs,
                      enable_prefix_caching=a.prefix_caching == "on")
    print(f"engine: prefix caching {a.prefix_caching}, cuda graphs {a.cuda_graphs}, {engine_dtype(llm)}", flush=True)
    comps, batch = sample(llm, prompts, a.max_tokens, a.temperature, 0)
    llm.reset_prefix_cache()
    again_c, again = sample(llm, prompts, a.max_tokens, a.temperature, 0)
    alone, alone_c = [], []
    for i, pr in enumerate(prompts):
        llm.reset_prefix_cache()
        c, lp = sample(llm, [pr], a.max_tokens, a.temperature, i)  # seed + i, as in the batch
        alone_c.append(c[0])
        alone.append(lp[0])
    rows = [("batch vs the same batch again", batch, again, comps == again_c),
            ("batch vs each prompt alone", batch, alone, comps == alone_c)]
    if a.trainer:
        tr = load_trainer(a.model, patch=True, dtype=engine_dtype(llm))
        rows.append(("batch vs trainer", batch,
                     [trainer_logprobs(tr, pr, c, a.temperature, True) for pr, c in zip(prompts, comps)], True))
        rows.append(("alone vs trainer", alone,
                     [trainer_logprobs(tr, pr, c, a.temperature, True) for pr, c in zip(prompts, alone_c)], True))
    lps = [x for s in batch for x in s]
    print(f"sampling: {len({tuple(c) for c in comps})} distinct completions of {len(comps)}, "
          f"mean logprob {sum(lps) / len(lps):.2f}")
    for name, x, y, same_tokens in rows:
        # onpolicy check's own comparison (bits of each token's logprob)
        m, firsts = compare(x, [torch.as_tensor(v, dtype=torch.float32) for v in y])
        firsts = [f for f in firsts if f is not None]
        hist = {k: firsts.count(k) for k in sorted(set(firsts))}
        print(f"{name}: {round(m['bitwise_equal_frac'] * m['tokens'])}/{m['tokens']} tokens bitwise, {len(firsts)} "
              f"sequences differ; same tokens drawn: {same_tokens}; first differing position: count {hist}; "
              f"max |diff| {m['logp_abs_diff_max']:.3e}; first mismatch {m['first_mismatch']}", flush=True)

if __name__ == "__main__":
    main()
