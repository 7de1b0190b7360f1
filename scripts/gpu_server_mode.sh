#!/usr/bin/env bash
# TRL's server mode on two GPUs (issue 33), written for a 2-GPU machine and NOT RUN YET: the vLLM
# server with the onpolicy plugin on GPU 0 (`onpolicy serve`), the GRPO recipe in strict mode on GPU 1
# (`vllm_mode=server`: generation over HTTP, the weights pushed over NCCL before each step), bitwise
# at every step or the run fails. Then the control: the same with the plugin off on the server and
# `--onpolicy off` in the trainer.
#   bash scripts/gpu_server_mode.sh [MODEL]      (default: a Qwen3-1.7B-shaped model with random weights)
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/kernels:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
OUT=${OUT:-runs/server-mode}
PORT=${PORT:-8765}
mkdir -p "$OUT"
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL=$OUT/qwen3-1.7b-shape
  [ -f "$MODEL/config.json" ] || python3 -c "
import sys, torch
from onpolicy.tiny import make_tiny_model
make_tiny_model(sys.argv[1], 'qwen3', shape='qwen3-1.7b', dtype=torch.bfloat16)" "$MODEL"
fi

run() {  # $1: onpolicy | control
  local name=$1 plugin=1 mode=strict
  [ "$name" = control ] && plugin=0 && mode=off
  # the server: GPU 0. onpolicy serve adds ONPOLICY_VLLM=1, VLLM_SERVER_DEV_MODE=1, the NCCL weight
  # transfer, processed logprobs and --generation-config vllm; the control sets the same by hand, plugin off.
  if [ "$plugin" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 python3 -m onpolicy.cli serve "$MODEL" --host 127.0.0.1 --port "$PORT" \
      --dtype bfloat16 --max-model-len 1024 --gpu-memory-utilization 0.85 > "$OUT/server-$name.log" 2>&1 &
  else
    CUDA_VISIBLE_DEVICES=0 ONPOLICY_VLLM=0 VLLM_SERVER_DEV_MODE=1 python3 -m vllm.entrypoints.cli.main serve \
      "$MODEL" --host 127.0.0.1 --port "$PORT" --dtype bfloat16 --max-model-len 1024 \
      --gpu-memory-utilization 0.85 --weight-transfer-config '{"backend": "nccl"}' \
      --logprobs-mode processed_logprobs --generation-config vllm > "$OUT/server-$name.log" 2>&1 &
  fi
  local pid=$!
  trap "kill $pid 2>/dev/null || true" EXIT
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "server died; see $OUT/server-$name.log"; tail -30 "$OUT/server-$name.log"; exit 1; }
    sleep 1
  done
  # the trainer: GPU 1, the recipe's GPU config with the server instead of the colocated engine
  CUDA_VISIBLE_DEVICES=1 accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/grpo.py \
    --config recipes/gpu_qwen3_1p7b.yaml --model "$MODEL" --onpolicy $mode --control false \
    --vllm_mode server --vllm_server_base_url "http://127.0.0.1:$PORT" \
    --run_dir "$OUT" --overwrite_run_dir true 2>&1 | tee "$OUT/trainer-$name.log"
  kill $pid; wait $pid 2>/dev/null || true
  trap - EXIT
}

run onpolicy
run control
python3 -m onpolicy.cli report "$OUT/onpolicy" "$OUT/control" 2>/dev/null || true
echo "expect: onpolicy 100% bitwise at every step; control below 100%"
