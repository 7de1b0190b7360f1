"""onpolicy's tensor-parallel reduction vs vLLM's all-reduce, at decode and prefill sizes.

Launch one process per rank (the TP size is the world size):

    torchrun --standalone --nproc_per_node 4 benchmarks/bench_tp_reduce.py            # GPU: NCCL
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_tp_reduce.py --cpu --quick  # CPU: gloo

Both sides run through vLLM's own tensor-parallel group (`init_distributed_environment` +
`initialize_model_parallel`), so the baseline is exactly what a vLLM engine runs for a row-parallel
layer: `device_communicator.all_reduce` (on the GPU vLLM's pick among its custom all-reduce,
symmetric memory and NCCL; on the CPU its shared-memory all-reduce). onpolicy's is what the plugin's
communicator runs beyond two ranks (onpolicy/vllm_plugin/collectives.py): the communicator's own
all-gather of the [M, hidden] partials, then `onpolicy_kernels.rank_sum` (float32, rank order, one
rounding). At TP=2 the plugin keeps vLLM's all-reduce; the TP=2 rows show what the rank-order
reduction would cost there.

Timing (GPU): each reduction is called `--calls` times inside one CUDA graph captured under vLLM's
`graph_capture` (as in a vLLM decode step; the custom all-reduce registers its buffers that way), and
the median over `--reps` replays, divided by the calls, is reported; `--eager` times eager calls
instead. CPU: eager calls, median of reps. Rank 0 prints one table row per (hidden, M): the two times
in microseconds, their ratio, and the largest difference between the two results (rounding only) and
whether the onpolicy result is the same on every rank (it must be).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DECODE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL = (2048, 4096, 8192)
HIDDEN = (2048, 4096)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU tensors and gloo (checks the script; times mean little)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: hidden 64, M 1, 4, 32")
    ap.add_argument("--hidden", type=int, nargs="*", default=None)
    ap.add_argument("--m", type=int, nargs="*", default=None, help="token counts (default: decode and prefill)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--calls", type=int, default=20, help="calls per timed graph / timed loop")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="GPU: time eager calls, not a CUDA graph")
    return ap.parse_args()


def setup(cpu: bool):
    """vLLM's distributed state for this torchrun process: the world group and a TP group of all ranks."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not cpu:
        torch.cuda.set_device(local)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world, rank, "env://", local, backend="gloo" if cpu else "nccl")
        ps.initialize_model_parallel(tensor_model_parallel_size=world)
    return ps, rank, world, torch.device("cpu") if cpu else torch.device("cuda", local)


def time_gpu(fn, x, calls, reps, eager, ps, device):
    for _ in range(3):  # compile / warm up outside capture
        fn(x)
    torch.cuda.synchronize()
    if eager:
        samples = []
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn(x)
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - t) / calls)
        return statistics.median(samples) * 1e6
    graph = torch.cuda.CUDAGraph()
    with ps.graph_capture(device) as ctx:
        with torch.cuda.graph(graph, stream=ctx.stream):
            for _ in range(calls):
                fn(x)
    torch.cuda.synchronize()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(samples)


def time_cpu(fn, x, calls, reps):
    fn(x)
    samples = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples) * 1e6


def main():
    args = parse()
    ps, rank, world, device = setup(args.cpu)
    from onpolicy.vllm_plugin.collectives import rank_order_all_reduce

    comm = ps.get_tp_group().device_communicator
    dtype = getattr(torch, args.dtype)
    hidden = args.hidden or ((64,) if args.quick else HIDDEN)
    ms = args.m or ((1, 4, 32) if args.quick else DECODE + PREFILL)
    calls, reps = (3, 3) if args.quick else (args.calls, args.reps)

    def vllm_ar(x):
        return comm.all_reduce(x.clone() if args.cpu else x)  # the CPU communicator reduces in place

    def onpolicy_ar(x):
        return rank_order_all_reduce(comm, x)

    if rank == 0:
        kind = "CPU (gloo)" if args.cpu else torch.cuda.get_device_name(device)
        timing = "eager" if (args.cpu or args.eager) else f"CUDA graph of {calls} calls"
        print(f"TP={world} on {kind}, {args.dtype}, {timing}, median of {reps}; vLLM communicator "
              f"{type(comm).__name__}")
        print(f"{'hidden':>6} {'M':>5} {'MiB':>7} {'vLLM us':>9} {'onpolicy us':>11} {'ratio':>6} "
              f"{'max|diff|':>9} {'same on all ranks':>17}")
    for h in hidden:
        for m in ms:
            g = torch.Generator().manual_seed(1000 * rank + m)
            x = torch.randn(m, h, generator=g).to(dtype).to(device)
            ours = onpolicy_ar(x)
            theirs = vllm_ar(x)
            everyone = [torch.empty_like(ours) for _ in range(world)]
            dist.all_gather(everyone, ours.contiguous() if not args.cpu else ours)
            same = all(torch.equal(e, ours) for e in everyone)
            diff = float((ours.float() - theirs.float()).abs().max())
            if args.cpu:
                t_v, t_o = time_cpu(vllm_ar, x, calls, reps), time_cpu(onpolicy_ar, x, calls, reps)
            else:
                t_v = time_gpu(vllm_ar, x, calls, reps, args.eager, ps, device)
                t_o = time_gpu(onpolicy_ar, x, calls, reps, args.eager, ps, device)
            if rank == 0:
                mib = m * h * x.element_size() / 2 ** 20
                print(f"{h:>6} {m:>5} {mib:>7.3f} {t_v:>9.1f} {t_o:>11.1f} {t_o / t_v:>6.2f} {diff:>9.2g} "
                      f"{str(same):>17}", flush=True)
            if not same:
                raise SystemExit(f"rank {rank}: the rank-order reduction differs between ranks at M={m}")
    dist.barrier()
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()


if __name__ == "__main__":
    main()
