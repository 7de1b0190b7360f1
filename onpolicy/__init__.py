"""onpolicy: truly on-policy RL for LLMs (bitwise-equal sampler and trainer logprobs)."""
__version__ = "0.1.0"
