#!/usr/bin/env bash
# Two "nodes" on one host (localhost rendezvous), one trainer process each, the GRPO recipe on the CPU
# demo: the ranks meet across node boundaries as on two machines (torch.distributed's static
# rendezvous, what `accelerate launch --num_machines 2 --machine_rank r` runs), and vLLM's TP=2
# group (TRL colocate) spans both. Checks that every step is bitwise. Usage:
#   bash recipes/two_nodes_localhost.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-/tmp/two_nodes}; port=${PORT:-29517}
rm -rf "$run"
export VLLM_ENABLE_V1_MULTIPROCESSING=0
unset ONPOLICY_VLLM
pids=()
for r in 0 1; do
  VLLM_CPU_OMP_THREADS_BIND=$r python -m torch.distributed.run --nnodes 2 --node_rank $r --nproc_per_node 1 \
    --master_addr 127.0.0.1 --master_port $port recipes/grpo.py --config recipes/cpu_demo.yaml --max_steps 3 \
    --sft_warmup_steps 40 --warmup_steps 0 --per_device_train_batch_size 8 --vllm_tensor_parallel_size 2 \
    --vllm_gpu_memory_utilization 0.2 --control false --report_to none --run_dir "$run" > "$run.node$r.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
[ $rc = 0 ] || { tail -20 "$run.node0.log" "$run.node1.log"; exit 1; }
python - "$run" <<'PY'
import sys
from onpolicy.runlog import read_steps
rows = read_steps(f"{sys.argv[1]}/onpolicy/metrics.jsonl")
print("steps", [r["step"] for r in rows], "bitwise", [r["bitwise_equal_frac"] for r in rows],
      "tokens", [r["tokens"] for r in rows], "weights changed", len({r["weights"] for r in rows}) > 1)
assert [r["step"] for r in rows] == [1, 2, 3] and all(r["bitwise_equal_frac"] == 1.0 for r in rows)
PY
