# Issue 31 on the GPU machine: the MoE kernel's GPU tests, the op vs vLLM's fused MoE,
# `onpolicy check` on a Qwen3-30B-A3B-shaped model, and benchmarks/batch_diag.py and batch_vs_alone.py on it. From the repository root, after the vLLM
# bundle's setup and `source benchmarks/gpu_env.sh`:
#   source benchmarks/moe_gpu.sh        # logs under $OUT (default /tmp/moe_out); about 10 minutes
# MOE_LAYERS (default 4) sets the model's depth; MOE_MODEL where it is written.
_moe_gpu() {
    local out=${OUT:-/tmp/moe_out} layers=${MOE_LAYERS:-4}
    local model=${MOE_MODEL:-/tmp/qwen3-30b-a3b-l${layers}}
    mkdir -p "$out"
    local t0=$SECONDS make_pid=""
    # 1. the model, on the CPU in the background while the GPU runs 2 and 3
    if [ ! -f "$model/config.json" ]; then
        CUDA_VISIBLE_DEVICES= timeout 200 python benchmarks/bench_moe.py make "$model" --layers "$layers" \
            > "$out/make_model.log" 2>&1 &
        make_pid=$!
    fi
    # 2. GPU tests of the kernel (invariance 1..8192 tokens, expert load, CUDA graph replay, control)
    timeout ${MOE_TESTS_S:-100} python -m pytest -q -p no:cacheprovider -m gpu -o addopts="" tests/gpu/test_moe_gpu.py > "$out/moe_gpu_tests.log" 2>&1
    echo "== tests/gpu/test_moe_gpu.py (exit $?, $((SECONDS - t0)) s): $(tail -1 "$out/moe_gpu_tests.log")"
    # 3. the op vs vLLM's fused MoE
    timeout ${MOE_BENCH_S:-110} python benchmarks/bench_moe.py --reps ${MOE_REPS:-10} > "$out/bench_moe.txt" 2> "$out/bench_moe.err"
    echo "== bench_moe (exit $?, $((SECONDS - t0)) s)"
    cat "$out/bench_moe.txt"; tail -5 "$out/bench_moe.err"
    # 4. onpolicy check with CUDA graphs, 64 prompts x 32 tokens (goal 2048/2048 bitwise)
    [ -n "$make_pid" ] && wait "$make_pid"
    tail -2 "$out/make_model.log"
    timeout ${MOE_CHECK_S:-180} python -m onpolicy.cli check --model "$model" --prompts 64 --max-tokens 32 --cuda-graphs --json \
        > "$out/check_cuda_graphs.log" 2>&1
    echo "== onpolicy check --cuda-graphs (exit $?, $((SECONDS - t0)) s):"
    grep -E '^\{' "$out/check_cuda_graphs.log" | tail -1 | python -c "import json,sys; r=json.loads(sys.stdin.read() or '{}'); m=r.get('metrics',{}); print('tokens', m.get('tokens'), 'bitwise', m.get('bitwise_equal_frac'), 'divergence', r.get('divergence'))" 2>/dev/null \
        || tail -20 "$out/check_cuda_graphs.log"
    # 5. inside the engine: the first module whose rows for one prompt change when 63 others share the batch
    timeout ${MOE_DIAG_S:-200} python benchmarks/batch_diag.py "$model" --batch 64 > "$out/batch_diag.log" 2>&1
    echo "== batch_diag (exit $?, $((SECONDS - t0)) s):"
    grep -E "^linear|^DIFF|^no module|^op" "$out/batch_diag.log" | head -30
    # 6. onpolicy check's own prompts and sampling: batched vs each prompt alone vs the trainer, prefix caching off and on
    for pc in off on; do
        timeout ${MOE_BVA_S:-150} python benchmarks/batch_vs_alone.py "$model" --prompts 64 --max-tokens 8 \
            --prefix-caching $pc --trainer --logits > "$out/batch_vs_alone_$pc.log" 2>&1
        echo "== batch_vs_alone, prefix caching $pc (exit $?, $((SECONDS - t0)) s):"
        grep -aE "^engine|^sampling|^batch|^alone|^logits|^  prompt" "$out/batch_vs_alone_$pc.log"
    done
    echo "== total $((SECONDS - t0)) s; logs in $out"
}
_moe_gpu
