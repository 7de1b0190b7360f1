#!/usr/bin/env bash
# The GPU benchmarks, by part (PARTS), logging under $OUT; vLLM must be importable (pip install, or a bundle's setup).
#   PARTS="check recipe determinism" bash benchmarks/run_gpu_benchmarks.sh        # one GPU
#   PARTS="tp2check tp2recipe" bash benchmarks/run_gpu_benchmarks.sh              # two GPUs
#   PARTS="tpreduce tp4check" bash benchmarks/run_gpu_benchmarks.sh                # four GPUs (tp8check: eight)
#   PARTS=throughput LOADS="256x512,8x2500" CONFS="default batch_invariant onpolicy default" bash benchmarks/run_gpu_benchmarks.sh
#     (MP=1: the engine core in its own process, vLLM's default, instead of in-process; TP_ROUNDS=N: the
#     CONFS sequence N times over, interleaved)
#   PARTS=pairs PAIRS="default:onpolicy onpolicy:default batch_invariant:default" bash benchmarks/run_gpu_benchmarks.sh
#     (two GPUs: each pair's two configurations at once, one process each, on its own GPU and half the CPUs)
#   PARTS=trainer ROUTES=triton,fa3 ROUNDS=15 bash benchmarks/run_gpu_benchmarks.sh      # the training step
#   PARTS="hostcost timeline" LOAD=8x512 CONFS="onpolicy default" bash benchmarks/run_gpu_benchmarks.sh  # host vs GPU time
#   PARTS="linear memory" REPEAT=2 bash benchmarks/run_gpu_benchmarks.sh   # kernel benchmarks
#   PARTS=starts CONFIGS=shipped:10,off bash benchmarks/run_gpu_benchmarks.sh  # bitwise across cold engine starts
#   PARTS=trunc bash benchmarks/run_gpu_benchmarks.sh      # onpolicy check with top-k / top-p / min-p, T=1.0 and 0.7
#   PARTS=lora LORA_R=16 bash benchmarks/run_gpu_benchmarks.sh   # the GRPO recipe with a LoRA adapter, strict
#   PARTS=sleep bash benchmarks/run_gpu_benchmarks.sh     # the GRPO recipe with vllm_enable_sleep_mode, strict
#   PARTS=startup ROUNDS=2 bash benchmarks/run_gpu_benchmarks.sh   # LLM(...) to the first token, default vs onpolicy
set -u
source benchmarks/gpu_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=/tmp/q3
[ -d $M ] || python3 benchmarks/bench_vllm.py make $M 2>&1 | tail -1
nvidia-smi --query-gpu=name --format=csv,noheader
for part in ${PARTS-check recipe}; do
  echo "== $part ($(date +%T))"
  case $part in
    check) timeout 900 python3 benchmarks/bitwise_check.py $M "$OUT" ;;
    tp2check) timeout 600 python3 benchmarks/bitwise_check.py $M "$OUT" --tp 2 ;;
    trunc)  # issue 32's GPU row: top-k / top-p / min-p, the trainer scoring the truncated distribution
      for t in 1.0 0.7; do
        timeout 300 python3 -m onpolicy.cli check --model $M --prompts 64 --max-tokens 32 --cuda-graphs --temperature $t \
          --top-k 20 --top-p 0.9 --min-p 0.02 --json > "$OUT/trunc_$t.log" 2>&1; echo "T=$t exit $?"
        grep -E '^\{' "$OUT/trunc_$t.log" | tail -1 | cut -c1-400
      done ;;
    tp4check|tp8check) timeout 900 python3 benchmarks/bitwise_check.py $M "$OUT" --tp ${part:2:1} ;;
    tpreduce)  # the TP reduction alone, vLLM's all-reduce vs onpolicy's rank-order sum, at each TP the GPUs allow
      g=$(nvidia-smi -L | wc -l)
      for n in 2 4 8; do
        [ $n -le $g ] || continue
        timeout 900 torchrun --standalone --nproc_per_node $n benchmarks/bench_tp_reduce.py > "$OUT/tpreduce_$n.log" 2>&1
        echo "exit $?"; grep -vE "Warning|warn|INFO" "$OUT/tpreduce_$n.log" | tail -25
      done ;;
    recipe|tp2recipe|lora|sleep)
      acc=single_gpu; extra=""; limit=1200
      case $part in
        tp2recipe) acc=fsdp2; extra="--vllm_tensor_parallel_size 2" ;;
        # issue 32's GPU rows, strict (a step not 100% bitwise stops the run), no control run: a LoRA adapter on
        # every projection (PEFT); TRL's vllm_enable_sleep_mode (level 2 after each generation, weights re-pushed)
        lora) extra="--lora_r ${LORA_R:-16} --control false"; limit=900 ;;
        sleep) extra="--vllm_enable_sleep_mode true --control false"; limit=900 ;;
      esac
      timeout $limit accelerate launch --config_file recipes/accelerate/$acc.yaml recipes/grpo.py \
        --config recipes/gpu_qwen3_1p7b.yaml --model $M --run_dir "$OUT/$part" $extra > "$OUT/$part.log" 2>&1
      echo "exit $?"
      if [ $part = tp2recipe ]; then  # several processes: the control is a launch of its own
        timeout 1200 accelerate launch --config_file recipes/accelerate/$acc.yaml recipes/grpo.py \
          --config recipes/gpu_qwen3_1p7b.yaml --model $M --run_dir "$OUT/$part" $extra --onpolicy off \
          --control false >> "$OUT/$part.log" 2>&1; echo "control exit $?"
      fi
      grep -E "│|step time|Error|error:" "$OUT/$part.log" | grep -v Warning | tail -30 ;;
    throughput)  # one process per configuration, timing each load in turn (LOADS, CONFS), TP_ROUNDS times
      l=${LOADS:-256x512,8x2500}
      # The host: these loads keep the GPU busy only 40-60% of the time (bench_vllm.py timeline), so the
      # CPU model and its load bear on every number.
      echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg)"
      for r in $(seq ${TP_ROUNDS:-1}); do
        for c in ${CONFS:-default batch_invariant onpolicy default}; do  # MP=1: engine core in a child process
          VLLM_ENABLE_V1_MULTIPROCESSING=${MP:-0} timeout 400 python3 benchmarks/bench_vllm.py throughput $M $c $l \
            > "$OUT/tp_$c.log" 2>&1
          grep -aE "THROUGHPUT|DECODE GRAPHS|CUDA graphs of the|Error|cudagraph_mode|CUDAGraphMode|Capturing CUDA graphs|warmed up" "$OUT/tp_$c.log" | grep -v Warning | tail -8
          mv "$OUT/tp_$c.log" "$OUT/tp_${c}_$(date +%H%M%S).log"
        done
      done ;;
    pairs)  # two GPUs: two configurations at once, one process each, GPU 0 on CPUs 0..n/2-1 and GPU 1 on
      # the rest; PAIRS="default:onpolicy onpolicy:default ..." (GPU0conf:GPU1conf), so both see the same
      # moment of the host and a swap of GPUs cancels a difference between them
      l=${LOADS:-256x512,8x2500}; h=$(( $(nproc) / 2 ))
      echo "host: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), load $(cut -d' ' -f1-3 /proc/loadavg)"
      for p in ${PAIRS:-default:onpolicy onpolicy:default}; do
        c0=${p%%:*}; c1=${p##*:}; t=$(date +%H%M%S)
        for g in 0 1; do
          c=$c0; [ $g = 1 ] && c=$c1
          pin=""; command -v taskset > /dev/null && pin="taskset -c $((g*h))-$((g*h+h-1))"
          # a compile cache per GPU: two processes never write one cache at once
          CUDA_VISIBLE_DEVICES=$g VLLM_CACHE_ROOT=/tmp/vllm-cache-gpu$g VLLM_ENABLE_V1_MULTIPROCESSING=${MP:-0} \
            $pin timeout 450 python3 benchmarks/bench_vllm.py throughput $M $c $l > "$OUT/pair_${t}_gpu${g}_$c.log" 2>&1 &
        done
        wait
        for g in 0 1; do
          f=$(ls "$OUT"/pair_${t}_gpu${g}_*.log)
          grep -aE "THROUGHPUT|DECODE GRAPHS|CUDA graphs of the|Error|warmed up" "$f" | grep -v Warning | sed "s/^/gpu$g /" | tail -8
        done
      done ;;
    timeline)  # where a decode step's time goes, per configuration (CONFS, LOAD)
      for c in ${CONFS:-onpolicy default}; do
        f="$OUT/timeline_${c}_${LOAD:-256x128}.log"  # the profiler sees this process: engine in-process
        VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 300 python3 benchmarks/bench_vllm.py timeline $M $c ${LOAD:-256x128} > "$f" 2>&1
        echo "$c exit $?"; grep -aE "Error|error:" "$f" | grep -v Warning | tail -3
        sed -n '/^TIMELINE/,/^  host ops over/p' "$f" | head -45
      done ;;
    startup)  # engine start-up, a process per start, the configurations alternately (the first also fills caches)
      for r in $(seq ${ROUNDS:-2}); do
        for c in default onpolicy; do
          timeout 300 python3 benchmarks/bench_vllm.py startup $M $c 2>&1 | grep -aE "^STARTUP|Error" | tail -2
        done
      done ;;
    hostcost)  # host time per call of the eager per-step ops, onpolicy's vs the default engine's
      timeout 200 python3 benchmarks/bench_host_overhead.py > "$OUT/hostcost.txt" 2>&1; echo "exit $?"
      cat "$OUT/hostcost.txt" ;;
    trainer)  # the training step, unpatched and each attention route interleaved
      timeout 400 python3 benchmarks/bench_trainer.py --rounds ${ROUNDS:-15} --routes ${ROUTES:-triton,fa3} \
        > "$OUT/trainer.log" 2>&1; echo "exit $?"; grep -E "^\||bitwise|device" "$OUT/trainer.log" ;;
    linear)  # invariant linear vs cuBLAS per shape and M, REPEAT times (the spread shows the noise)
      for r in $(seq ${REPEAT:-1}); do
        timeout 200 python3 benchmarks/bench_linear.py > "$OUT/bench_linear_$r.log" 2>&1; echo "bench_linear exit $?"
        sed -n '/^summary/,$p' "$OUT/bench_linear_$r.log"
      done ;;
    memory)  # memory-bound kernels: share of the copy bandwidth
      timeout 120 python3 benchmarks/bench_memory_ops.py > "$OUT/bench_mem.log" 2>&1; echo "exit $?"
      sed -n '/^summary/,$p' "$OUT/bench_mem.log" ;;
    starts)  # bitwise across cold engine starts (CONFIGS: name:starts,...), three model shapes
      for f in qwen3 qwen2 llama_tied; do
        [ -d /tmp/m_$f ] || python3 benchmarks/bitwise_starts.py make /tmp/m_$f --family $f --layers ${LAYERS:-4} 2>&1 | tail -1
      done
      timeout ${STARTS_S:-560} python3 benchmarks/bitwise_starts.py run --model qwen3=/tmp/m_qwen3 --model qwen2=/tmp/m_qwen2 \
        --model llama_tied=/tmp/m_llama_tied --configs ${CONFIGS:-shipped:10,cublaslt_off:3,graphs_off:3,off} \
        --parallel ${PARALLEL:-10} --budget-s ${BUDGET_S:-420} --out "$OUT/starts" | grep -v "^START" ;;
    determinism)
      c=${CONFIGS:-onpolicy,default,batch_invariant}; f="$OUT/determinism_${c//,/_}"
      timeout 560 python3 -m onpolicy.cli bench determinism --model $M --n ${N:-1000} --max-tokens 200 \
        --concurrency ${CONC:-256} --configs $c --log-dir "$OUT/detlogs" > "$f.txt" 2> "$f.log"
      echo "exit $?"; cat "$f.txt"; grep -E "Error|error" "$f.log" | tail -5 ;;
  esac
done
echo "== done ($(date +%T))"
