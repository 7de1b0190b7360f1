"""Test session set-up shared by every test.

On a machine without a GPU, Triton runs under its interpreter: the variable
must be set before triton (or onpolicy_kernels) is first imported. vLLM runs
in-process.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
