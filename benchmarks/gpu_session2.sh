#!/usr/bin/env bash
# GPU session (after `source .gpu/b/setup.sh`): tiny families, the Qwen3-1.7B-shape acceptance, throughput.
#   CASES="qwen3 qwen2 llama qwen3_--tied" bash benchmarks/gpu_session2.sh          # families + acceptance
#   CASES="" ACCEPT="" THROUGHPUT="default batch_invariant onpolicy default" bash benchmarks/gpu_session2.sh
set -u
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/onpolicy_kernels
export PYTHONPATH="/tmp/shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
for c in ${CASES-qwen3}; do
  c=${c//_/ }; set -- $c; fam=$1; shift; echo "== family $c ($(date +%T))"
  timeout 240 python3 tests/vllm/family_check.py $fam /tmp/fam "$@" > "$OUT/fam_${c// /_}.log" 2>&1
  grep -E "^(PLUGIN|RESULT|MAXDIFF)|Error" "$OUT/fam_${c// /_}.log" | tail -4
done
if [ -n "${ACCEPT-1}" ]; then
  echo "== accept 1.7B ($(date +%T))"
  [ -d /tmp/q3 ] || python3 benchmarks/gpu_vllm.py make /tmp/q3 2>&1 | tail -1
  timeout 400 python3 benchmarks/gpu_vllm.py accept /tmp/q3 > "$OUT/accept.log" 2>&1
  grep -E "bitwise|identical|Error" "$OUT/accept.log" | tail -8
fi
if [ -n "${THROUGHPUT:-}" ]; then
  [ -d /tmp/q3 ] || python3 benchmarks/gpu_vllm.py make /tmp/q3 2>&1 | tail -1
  for c in $THROUGHPUT; do
    echo "== throughput $c ($(date +%T))"
    timeout 200 python3 benchmarks/gpu_vllm.py throughput /tmp/q3 $c >> "$OUT/throughput.log" 2>&1
    grep -E "THROUGHPUT $c|Error" "$OUT/throughput.log" | tail -2
  done
fi
echo "== done ($(date +%T))"
