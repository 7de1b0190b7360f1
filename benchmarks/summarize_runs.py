"""Tables over repeated GPU benchmark runs, read back from their outputs (the machine is noisy run to run).

    python3 benchmarks/summarize_runs.py throughput LOG...   # bench_vllm.py throughput logs (THROUGHPUT lines)
    python3 benchmarks/summarize_runs.py linear OUT...       # bench_linear.py outputs, one per run

throughput: per load and configuration the runs' count, mean, median, min and max tok/s, and each
configuration's mean (with the standard error of that ratio, from both sides' run-to-run spread) and
median as a ratio of the default's.
linear: per (shape, M) the median over runs of cuBLAS time / ours, then per M the minimum over shapes of
that median, next to the minimum over shapes and runs (the single worst timing).
"""
from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict

THROUGHPUT = re.compile(r"THROUGHPUT (\S+) (\d+x\d+): (\d+) tok/s")
LINEAR_ROW = re.compile(r"^(\S+(?: [a-z_]+)?)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s")


def throughput(paths: list[str]) -> None:
    runs: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for p in paths:
        for ln in open(p, errors="replace"):
            m = THROUGHPUT.search(ln)
            if m:
                runs[m.group(2)][m.group(1)].append(int(m.group(3)))
    if not runs:
        raise SystemExit("no THROUGHPUT lines in the logs given (bench_vllm.py throughput writes them)")
    print("| load | configuration | runs | mean tok/s | median | min | max | mean / default (+- s.e.) "
          "| median / default |")
    print("|---|---|---|---|---|---|---|---|---|")
    for load, confs in runs.items():
        base = confs.get("default")
        for conf, v in sorted(confs.items()):
            mean, med = statistics.mean(v), statistics.median(v)
            rel = "- | -"
            if base:
                ratio = mean / statistics.mean(base)
                rel = f"{ratio:.3f}x{ratio_se(ratio, v, base)} | {med / statistics.median(base):.3f}x"
            print(f"| {load} | {conf} | {len(v)} | {mean:.0f} | {med:.0f} | {min(v)} | {max(v)} | {rel} |")


def ratio_se(ratio: float, a: list[int], b: list[int]) -> str:
    """' +- s' with s the standard error of the ratio of two means (first order, from both runs' spreads);
    '' where either side has a single run."""
    if len(a) < 2 or len(b) < 2 or a is b:
        return ""
    rel = sum((statistics.stdev(x) / statistics.mean(x)) ** 2 / len(x) for x in (a, b))
    return f" +- {ratio * rel ** 0.5:.3f}"


def linear(paths: list[str]) -> None:
    ratios: dict[tuple[str, int], list[float]] = defaultdict(list)
    for p in paths:
        for ln in open(p, errors="replace"):
            m = LINEAR_ROW.match(ln)
            if m:
                ratios[(m.group(1), int(m.group(4)))].append(float(m.group(7)))
    if not ratios:
        raise SystemExit("no rows in the outputs given (bench_linear.py prints them)")
    print(f"{len(paths)} runs, {len(ratios)} (shape, M) points")
    print("| M | min over shapes of the median over runs | its shape | min over shapes and runs |")
    print("|---|---|---|---|")
    for M in sorted({m for _, m in ratios}):
        pts = {s: v for (s, m), v in ratios.items() if m == M}
        shape, v = min(pts.items(), key=lambda kv: statistics.median(kv[1]))
        print(f"| {M} | {statistics.median(v):.2f} | {shape} | {min(min(r) for r in pts.values()):.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["throughput", "linear"])
    ap.add_argument("paths", nargs="+")
    args = ap.parse_args()
    (throughput if args.kind == "throughput" else linear)(args.paths)


if __name__ == "__main__":
    main()
