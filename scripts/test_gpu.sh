#!/usr/bin/env bash
# The GPU tests (tests/gpu, marked `gpu`), on a machine with a CUDA GPU: compiled Triton, the repo
# importable without installing it (kernels/ and the checkout on PYTHONPATH). Extra arguments go to pytest.
#   bash scripts/test_gpu.sh [-k linear] [-n 8]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -o addopts="" -ra "$@"
