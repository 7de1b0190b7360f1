"""`onpolicy bench ...`: benchmarks that run vLLM the way users run it.

- `determinism` (onpolicy.bench.cli): a vLLM OpenAI-compatible server per configuration
  (onpolicy plugin on, vLLM default, VLLM_BATCH_INVARIANT=1) under concurrent load and bad
  input: distinct completions of one prompt, throughput, latency, and sampled-token logprobs
  vs `onpolicy.token_logprobs`. See docs/determinism-bench.md.
"""
