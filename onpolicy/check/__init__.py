"""`onpolicy check`: prove sampler == trainer bitwise for a model, or name where they part.

1. vLLM (in-process, plugin on -- or off with --off) samples completions with
   logprobs (processed: temperature applied).
2. The trainer (transformers; patched with onpolicy unless --off) recomputes
   every sampled token's logprob.
3. If any token differs, both sides are run once more on the first mismatching
   sequence up to that token, recording each sub-op's output (vLLM through
   module hooks, the trainer through the same names), and the first sub-op
   whose outputs differ is reported ("layer 3 post_attention_layernorm: max |Δ|
   2e-3; everything before identical").

Both sides run one dtype: `--dtype` (default: what vLLM runs the checkpoint in, e.g. bfloat16
for a float32 checkpoint on the CPU) for the engine, and the trainer loads the model in the
dtype the engine reports; the report states each side's dtype.

Exit status: 0 bitwise (or --off), 1 not bitwise, 2 bad input (one line, checked before any
engine starts), 3 the check itself failed (the engine or the trainer raised).

The engine runs eagerly (enforce_eager) so module hooks can see activations; with
--cuda-graphs it runs as a production engine does (vLLM's CUDA graphs for the model,
onpolicy's for the LM head and sampler), and a mismatch is reported without locating it
(rerun without the flag for that).

Modules: inputs (command line, model directory, prompts), engines (the two sides), capture (per
sub-op outputs and the first divergence), run (`run_check`), report (the terminal table), cli.
"""
from .capture import capture_trainer, capture_vllm, first_divergence
from .cli import check
from .engines import engine_dtype, load_trainer, make_engine, sample, trainer_logprobs, vllm_model
from .inputs import CheckError, load_prompts, validate_inputs, validate_model
from .run import CheckResult, compare, run_check

__all__ = ["CheckError", "CheckResult", "capture_trainer", "capture_vllm", "check", "compare", "engine_dtype", "first_divergence",
           "load_prompts", "load_trainer", "make_engine", "run_check", "sample", "trainer_logprobs", "validate_inputs",
           "validate_model", "vllm_model"]
