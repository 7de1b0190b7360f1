#!/usr/bin/env bash
# One GPU-machine session for the trainer and the vLLM adapter (after the bundle's two setup runs):
#   source .gpu/b/setup.sh && bash benchmarks/gpu_session.sh [steps...]
# Steps: tiny (plugin sanity, tiny Qwen3/Qwen2/Llama), accept (Qwen3-1.7B shape, 2 x 2048 tokens),
# trainer (issue 4 bitwise + step time/memory), throughput (default / VLLM_BATCH_INVARIANT / onpolicy).
set -u
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/onpolicy_kernels
export PYTHONPATH="/tmp/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-tiny accept trainer}
for s in $steps; do
  echo "=== $s ($(date +%T))"
  case $s in
    tiny) for f in qwen3 qwen2 llama; do
            timeout 240 python3 tests/vllm/family_check.py $f /tmp/fam 2>&1 | tee "$OUT/tiny_$f.log" | grep -E "RESULT|Error|error" | tail -5
          done ;;
    accept) [ -d /tmp/q3 ] || python3 benchmarks/gpu_vllm.py make /tmp/q3 2>&1 | tail -1
            timeout 420 python3 benchmarks/gpu_vllm.py accept /tmp/q3 2>&1 | tee "$OUT/accept.log" | grep -E "bitwise|identical|Error|error" | tail -12 ;;
    trainer) timeout 300 python3 benchmarks/gpu_trainer.py 2>&1 | tee "$OUT/trainer.log" | grep -vE "Warning|warn" | tail -12 ;;
    throughput) [ -d /tmp/q3 ] || python3 benchmarks/gpu_vllm.py make /tmp/q3 2>&1 | tail -1
            for c in default batch_invariant onpolicy default; do
              timeout 200 python3 benchmarks/gpu_vllm.py throughput /tmp/q3 $c 2>&1 | tee -a "$OUT/throughput.log" | grep -E "THROUGHPUT|Error" | tail -2
            done ;;
  esac
done
echo "=== done ($(date +%T))"
