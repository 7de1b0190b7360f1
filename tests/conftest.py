"""Test session set-up shared by every test: vLLM runs in-process, nothing reaches a hub.

TRITON_INTERPRET is set only for the kernel tests (tests/kernels/conftest.py), which
test the Triton kernels on the CPU; everything else runs the CPU path without it.
"""
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
