"""One onpolicy engine for one model family, sampler vs trainer bitwise (run as a script).

usage: python family_check.py FAMILY OUT_DIR [--tied] [--eager] [--no-cudagraph] [--tp N]
Prints "PLUGIN {json}" (layer counts of the audit) and one line "RESULT {json}"
with the equal/total counts per temperature; "CONTROL {json}": the same counts for
the plain (unpatched) transformers forward, which must not match; "DEGENERACY {json}":
distinct completions per prompt over four seeds and the sampled logprobs
(vllm_helpers.degeneracy_report), which must show a real distribution. With --tp N (2 or 4 on
the CPU) vLLM runs tensor parallel (one worker process per rank; on the CPU each bound to one
core, ranks sharing cores when there are more ranks than cores) and the trainer mirrors it
(token_logprobs(..., tensor_parallel_size=N)); "RESULT_TP1 {json}"
then gives the counts of a trainer that does not mirror it, and with N > 2 "RESULT_BF16SUM {json}"
those of a trainer with the same sharding but the partials summed in bf16 (rank order, a rounding
per addition) instead of onpolicy's float32 rank-order sum: it must not match either, so the test
can tell reductions apart. Run in its own process by
test_families.py (one vLLM engine per process), and as is on the GPU machine.

The plugin is switched on in-process with `enable()` (what TRL users do), so it
needs no entry points (the GPU machine runs the repo without installing it;
test_families.py runs one case with VLLM_PLUGINS set to exclude them), and
`verify(llm)` fails the script unless every layer and the sampler are onpolicy's.
"""
import contextlib
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ["ONPOLICY_VLLM"] = "1"


@contextlib.contextmanager
def bf16_rank_sum():
    """The trainer's rank-order sum replaced by one in the partials' dtype (a rounding per addition)."""
    import onpolicy_kernels

    def summed(parts):
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    saved = onpolicy_kernels.rank_sum
    onpolicy_kernels.rank_sum = summed
    try:
        yield
    finally:
        onpolicy_kernels.rank_sum = saved


def main():
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    import onpolicy
    import onpolicy.vllm_plugin as plugin
    from onpolicy.tiny import make_tiny_model

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vllm_helpers import degeneracy_report, plain_logprobs, sample_seeds

    plugin.enable()

    family, out = sys.argv[1], sys.argv[2]
    tied, eager = "--tied" in sys.argv, "--eager" in sys.argv
    extra = {"compilation_config": {"cudagraph_mode": "NONE"}} if "--no-cudagraph" in sys.argv else {}
    tp = int(sys.argv[sys.argv.index("--tp") + 1]) if "--tp" in sys.argv else 1
    if tp > 1:
        from onpolicy.vllm_plugin.config import tensor_parallel_engine_args

        extra.update(tensor_parallel_engine_args(tp))
        if not torch.cuda.is_available() and tp > 2:
            # four worker processes on one memory node: a fixed KV cache each instead of a share of the node
            extra["kv_cache_memory_bytes"] = 64 << 20
        elif not torch.cuda.is_available():
            extra["gpu_memory_utilization"] = 0.2  # a share of the host memory node per worker; the KV cache gets it less what the worker process already uses (0.7 GiB here), so 0.05 left none on a 12.8 GiB node
    path = make_tiny_model(os.path.join(out, family + ("-tied" if tied else "")), family, dtype=torch.bfloat16,
                           max_position_embeddings=512, overrides={"tie_word_embeddings": True} if tied else None)
    extra.setdefault("gpu_memory_utilization", 0.3)
    llm = LLM(model=str(path), dtype="bfloat16", max_model_len=512, seed=0,
              logprobs_mode="processed_logprobs", enforce_eager=eager, **extra)
    print("PLUGIN " + json.dumps(plugin.verify(llm)), flush=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the trainer runs where vLLM runs
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    prompts = [[3] + [100 + (i * 37 + j * 13) % 900 for j in range(5 + i % 9)] for i in range(16)]
    result, diffs, result_tp1, control, result_bf16 = {}, {}, {}, {}, {}
    for temperature in (1.0, 0.7):
        params = SamplingParams(temperature=temperature, max_tokens=16, logprobs=0, seed=1, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        equal = total = equal_tp1 = equal_plain = equal_bf16 = 0
        for p, o in zip(prompts, outs):
            c = o.outputs[0]
            ids = torch.tensor([p + list(c.token_ids)], device=dev)
            with torch.no_grad():
                lp = onpolicy.token_logprobs(hf, ids, temperature=temperature, logits_to_keep=len(c.token_ids),
                                             tensor_parallel_size=tp)[0].cpu()
                if tp > 1:
                    lp1 = onpolicy.token_logprobs(hf, ids, temperature=temperature,
                                                  logits_to_keep=len(c.token_ids))[0].cpu()
                if tp > 2:
                    with bf16_rank_sum():
                        lpb = onpolicy.token_logprobs(hf, ids, temperature=temperature, logits_to_keep=len(c.token_ids),
                                                      tensor_parallel_size=tp)[0].cpu()
            sampled = torch.tensor([c.logprobs[k][t].logprob for k, t in enumerate(c.token_ids)], dtype=torch.float32)
            equal += int((sampled.view(torch.int32) == lp.view(torch.int32)).sum())
            plain = plain_logprobs(hf, p, list(c.token_ids), temperature)  # the control: must not match
            equal_plain += int((sampled.view(torch.int32) == plain.view(torch.int32)).sum())
            if tp > 1:
                equal_tp1 += int((sampled.view(torch.int32) == lp1.view(torch.int32)).sum())
            if tp > 2:
                equal_bf16 += int((sampled.view(torch.int32) == lpb.view(torch.int32)).sum())
            diffs[str(temperature)] = max(diffs.get(str(temperature), 0.0), float((sampled - lp).abs().max()))
            total += len(c.token_ids)
        result[str(temperature)] = [equal, total]
        control[str(temperature)] = [equal_plain, total]
        result_tp1[str(temperature)] = [equal_tp1, total]
        result_bf16[str(temperature)] = [equal_bf16, total]
    if tp > 1:
        print("RESULT_TP1 " + json.dumps(result_tp1), flush=True)
    if tp > 2:
        print("RESULT_BF16SUM " + json.dumps(result_bf16), flush=True)
    comps, lps = sample_seeds(llm, prompts, 1.0)
    print("DEGENERACY " + json.dumps(degeneracy_report(comps, lps)), flush=True)
    print("CONTROL " + json.dumps(control), flush=True)
    print("MAXDIFF " + json.dumps(diffs), flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
