#!/usr/bin/env bash
# Diagnose sampler != trainer on the GPU machine: eager vs compiled vs CUDA graphs, and `onpolicy check`.
set -u
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/onpolicy_kernels
export PYTHONPATH="/tmp/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
for mode in --eager --no-cudagraph ""; do
  echo "=== family_check qwen3 $mode"
  timeout 200 python3 tests/vllm/family_check.py qwen3 /tmp/fam $mode > "$OUT/fam${mode//-/_}.log" 2>&1
  grep -E "RESULT|MAXDIFF|Error" "$OUT/fam${mode//-/_}.log" | tail -4
done
echo "=== onpolicy check (eager, plugin on)"
timeout 200 python3 -m onpolicy.cli check --model /tmp/fam/qwen3 --prompts 8 --max-tokens 16 --json > "$OUT/check.json" 2> "$OUT/check.log"
python3 -c "import json;d=json.load(open('$OUT/check.json'));print(d['metrics'], d['divergence'], d['notes'])" || tail -20 "$OUT/check.log"
