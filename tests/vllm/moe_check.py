"""A tiny Qwen3-MoE on one onpolicy engine: sampler vs trainer bitwise, router choices counted (a script).

usage: python moe_check.py OUT_DIR [--prompts N] [--tokens N]
Builds a tiny Qwen3-MoE (8 experts, top-2, 4 layers; onpolicy.tiny), one vLLM engine with the
plugin (enable(), verify()), samples N prompts x N tokens at T=1.0 and 0.7, and recomputes every
sampled token's logprob with the patched trainer. Prints one JSON line each:
  "PLUGIN {...}"     the audit's layer counts (moe = the sparse layers on onpolicy's MoE op);
  "RESULT {T: [equal, total]}"   sampler == trainer bitwise (view as int32);
  "CONTROL {T: [equal, total]}"  the plain (unpatched) transformers forward: must not match;
  "ROUTER {...}"     every token of every sequence at every MoE layer: its router logits row found
                     among the engine's (bitwise) and the same expert ids chosen, counted;
  "DEGENERACY {...}" distinct completions over four seeds and the sampled logprobs.
Run in its own process by test_moe.py (one vLLM engine per process).
"""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["ONPOLICY_VLLM"] = "1"


class RouterLog:
    """Wraps onpolicy's `moe_route` (both the public name and the one the traced op's body calls) and
    records (MoE layer, logits row bits) -> expert ids of every routed token. Layers are numbered by
    call order within a forward (every forward routes all sparse layers, in order)."""

    def __init__(self, n_layers: int):
        import onpolicy_kernels
        import onpolicy_kernels.ops.moe as moe_mod

        self.n, self.calls, self.rows, self.on = n_layers, 0, {}, False
        self._orig = moe_mod.moe_route
        self._mods = (onpolicy_kernels, moe_mod)

        def route(logits, top_k, renormalize=True, check_finite=True):
            w, ids = self._orig(logits, top_k, renormalize, check_finite)
            if self.on:
                layer = self.calls % self.n
                keys = logits.float().contiguous().view(torch_int32()).tolist()
                for row, i in zip(keys, ids.tolist()):
                    self.rows.setdefault((layer, tuple(row)), []).append(tuple(i))
            self.calls += 1
            return w, ids

        for m in self._mods:
            m.moe_route = route

    def restore(self):
        for m in self._mods:
            m.moe_route = self._orig


def torch_int32():
    import torch

    return torch.int32


def main():
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    import onpolicy
    import onpolicy.vllm_plugin as plugin
    from onpolicy.tiny import make_tiny_model

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vllm_helpers import degeneracy_report, plain_logprobs, sample_seeds

    out = sys.argv[1]
    n_prompts = int(sys.argv[sys.argv.index("--prompts") + 1]) if "--prompts" in sys.argv else 64
    n_tokens = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 32
    plugin.enable()
    path = make_tiny_model(os.path.join(out, "qwen3-moe-tiny"), "qwen3_moe", dtype=torch.bfloat16,
                           max_position_embeddings=512)
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=512, seed=0, gpu_memory_utilization=0.3,
              logprobs_mode="processed_logprobs", max_num_batched_tokens=2048, max_num_seqs=64)
    print("PLUGIN " + json.dumps(plugin.verify(llm)), flush=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    n_moe = sum(1 for layer in hf.model.layers if hasattr(layer.mlp, "experts"))
    prompts = [[3] + [100 + (i * 37 + j * 13) % 900 for j in range(5 + i % 23)] for i in range(n_prompts)]

    engine_log = RouterLog(n_moe)
    result, control, sequences = {}, {}, []
    for temperature in (1.0, 0.7):
        params = SamplingParams(temperature=temperature, max_tokens=n_tokens, logprobs=0, seed=1, ignore_eos=True)
        engine_log.on = temperature == 1.0  # the T=1.0 run routes every token (prompts and completions) once
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        engine_log.on = False
        equal = equal_plain = total = 0
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            ids = torch.tensor([p + list(c.token_ids)])
            if temperature == 1.0:
                sequences.append(p + list(c.token_ids)[:-1])  # the last sampled token never entered the model
            with torch.no_grad():
                lp = onpolicy.token_logprobs(hf, ids, temperature=temperature, logits_to_keep=len(c.token_ids))[0]
            sampled = torch.tensor([c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)], dtype=torch.float32)
            equal += int((sampled.view(torch.int32) == lp.view(torch.int32)).sum())
            plain = plain_logprobs(hf, p, list(c.token_ids), temperature)
            equal_plain += int((sampled.view(torch.int32) == plain.view(torch.int32)).sum())
            total += len(c.token_ids)
        result[str(temperature)] = [equal, total]
        control[str(temperature)] = [equal_plain, total]
    engine_rows = engine_log.rows
    engine_log.restore()

    # The trainer routes the same sequences (one batch, padded): every token at every MoE layer.
    trainer_log = RouterLog(n_moe)
    trainer_log.on = True
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), 2)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad(), onpolicy.patched(hf):
        hf(input_ids=ids, attention_mask=mask)
    trainer_log.restore()
    routed = found = same = 0
    for key, choices in trainer_log.rows.items():
        for choice in choices:
            routed += 1
            theirs = engine_rows.get(key)
            if theirs is not None:
                found += 1
                same += int(all(t == choice for t in theirs))
    experts_used = sorted({e for choices in trainer_log.rows.values() for c in choices for e in c})
    print("ROUTER " + json.dumps({"tokens_x_layers": routed, "found_in_engine": found, "same_experts": same,
                                  "expected": sum(len(s) for s in sequences) * n_moe,
                                  "experts_used": experts_used}), flush=True)
    comps, lps = sample_seeds(llm, prompts[:16], 1.0)
    print("DEGENERACY " + json.dumps(degeneracy_report(comps, lps)), flush=True)
    print("CONTROL " + json.dumps(control), flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
