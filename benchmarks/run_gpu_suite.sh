#!/usr/bin/env bash
# One GPU-machine session: GPU tests, both benchmarks, then the tile search with the time left.
#   bash benchmarks/run_gpu_suite.sh [TOTAL_SECONDS]      (logs under $OUT, or ./.out/gpu)
# The repo need not be installed: kernels/ and the checkout go on PYTHONPATH.
set -u
TOTAL=${1:-560}
T0=$(date +%s)
OUT=${OUT:-$PWD/.out/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
if [ -f .out/triton_cache.tgz ]; then mkdir -p ~/.triton && tar xzf .out/triton_cache.tgz -C ~/.triton; fi
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
{ nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
SKIP_TESTS=${SKIP_TESTS:-0}
if [ "$SKIP_TESTS" != 1 ]; then
  timeout ${TESTS_S:-170} python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -n ${XDIST:-8} \
    --ignore=tests/gpu/test_attention_gpu.py -o addopts="" -ra > "$OUT/tests.log" 2>&1
  echo "tests rc=$?"; tail -25 "$OUT/tests.log"
fi
timeout ${BENCH_S:-110} python3 benchmarks/bench_linear.py > "$OUT/bench_linear.log" 2>&1; echo "bench_linear rc=$?"
if [ "${BENCH_REPEAT:-1}" -gt 1 ]; then  # a second run on the same machine shows the noise
  timeout ${BENCH_S:-110} python3 benchmarks/bench_linear.py > "$OUT/bench_linear2.log" 2>&1; echo "bench_linear (2) rc=$?"
fi
timeout ${MEM_S:-60} python3 benchmarks/bench_memory_ops.py > "$OUT/bench_mem.log" 2>&1; echo "bench_mem rc=$?"
B=$(( $(left) - 25 ))
if [ "$B" -gt 30 ] && [ "${SKIP_TUNE:-0}" != 1 ]; then
  timeout $(( B + 20 )) python3 benchmarks/tune_linear.py --budget-s $B --json "$OUT/tune.json" ${TUNE_ARGS:-} > "$OUT/tune.log" 2>&1
  echo "tune rc=$?"
fi
(cd ~/.triton && tar czf "$OUT/triton_cache.tgz" cache 2>/dev/null); ls -la "$OUT"
if [ "$(stat -c %s "$OUT/triton_cache.tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then rm -f "$OUT/triton_cache.tgz"; fi
echo "=== bench_linear summary"; sed -n '/^summary/,$p' "$OUT/bench_linear.log"
echo "=== memory ops"; sed -n '/^summary/,$p' "$OUT/bench_mem.log"
[ -f "$OUT/bench_linear2.log" ] && { echo "=== bench_linear, second run"; sed -n '/^summary/,$p' "$OUT/bench_linear2.log"; }
[ -f "$OUT/tune.log" ] && { echo "=== tune (last lines)"; tail -12 "$OUT/tune.log"; }
true
