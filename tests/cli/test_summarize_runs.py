"""benchmarks/summarize_runs.py: the tables the README's GPU rows come from, on synthetic outputs."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "summarize_runs.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_throughput_ratios_of_mean_and_median(tmp_path):
    logs = []
    for i, (conf, tok) in enumerate([("default", 100), ("onpolicy", 90), ("default", 300), ("onpolicy", 330),
                                     ("default", 200), ("onpolicy", 240)]):
        p = tmp_path / f"tp_{conf}_{i}.log"
        p.write_text(f"INFO noise\nTHROUGHPUT {conf} 8x2500: {tok} tok/s (20000 tokens in 6.0 s)\n")
        logs.append(p)
    r = run("throughput", *logs)
    assert r.returncode == 0, r.stderr
    row = next(ln for ln in r.stdout.splitlines() if "| onpolicy |" in ln)
    # onpolicy mean 220 vs 200, median 240 vs 200; coefficients of variation 0.551 and 0.5 over 3 runs
    # each: s.e. 1.1 * sqrt((0.551**2 + 0.5**2) / 3) = 0.473
    assert row == "| 8x2500 | onpolicy | 3 | 220 | 240 | 90 | 330 | 1.100x +- 0.473 | 1.200x |"
    base = next(ln for ln in r.stdout.splitlines() if "| default |" in ln)
    assert base.endswith("| 1.000x | 1.000x |")  # no error bar against itself


def test_linear_median_over_runs_and_worst_timing(tmp_path):
    def out(ratios):
        rows = ["shape               K       N     M  cuBLAS us    ours us  ratio  TFLOP/s  kernel"]
        for (shape, m), r in ratios.items():
            rows.append(f"{shape:16s} 2048    4096 {m:5d}       10.0       10.0   {r:.2f}    1.0  triton (16, 32)")
        return "\n".join(rows) + "\nsummary: ...\n  M=    1: min 1.00  geomean 1.00\n"
    runs = [{("1.7B qkv", 1): 0.99, ("lm_head", 1): 0.90}, {("1.7B qkv", 1): 1.01, ("lm_head", 1): 0.97},
            {("1.7B qkv", 1): 1.00, ("lm_head", 1): 0.98}]
    paths = []
    for i, r in enumerate(runs):
        p = tmp_path / f"linear{i}.txt"
        p.write_text(out(r))
        paths.append(p)
    r = run("linear", *paths)
    assert r.returncode == 0, r.stderr
    assert "3 runs, 2 (shape, M) points" in r.stdout
    assert "| 1 | 0.97 | lm_head | 0.90 |" in r.stdout  # lm_head's median 0.97 is the lower; 0.90 the worst


def test_no_rows_is_an_error(tmp_path):
    p = tmp_path / "empty.log"
    p.write_text("nothing here\n")
    r = run("throughput", p)
    assert r.returncode != 0 and "no THROUGHPUT lines" in r.stderr
