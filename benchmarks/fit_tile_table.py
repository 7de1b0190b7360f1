"""Derive HOPPER_TABLE (kernels/onpolicy_kernels/ops/linear/__init__.py) from tune_linear.py results.

    python3 benchmarks/fit_tile_table.py tune1.json [tune2.json ...]

For every N class and M bucket it picks the candidate tile with the best
worst-case ratio (cuBLAS time / ours) over the measured shapes of that class and
the measured M values of that bucket (later files override earlier ones at the
same shape and M). Prints the table as a Python literal and the expected ratios.
"""
from __future__ import annotations

import collections
import json
import sys

N_CLASSES = (2048, 4096, 6144, 12288, 24576, 1 << 62)
M_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1 << 62)


def bucket(v, edges):
    return next(e for e in edges if v <= e)


def main(paths):
    points = {}
    for p in paths:
        for r in json.load(open(p))["results"]:
            points[(r["shape"], r["M"])] = r
    groups = collections.defaultdict(list)
    for (shape, M), r in points.items():
        groups[(bucket(r["N"], N_CLASSES), bucket(M, M_BUCKETS))].append(r)
    table = collections.defaultdict(list)
    report = []
    for (nc, mb) in sorted(groups):
        rs = groups[(nc, mb)]
        ratios = collections.defaultdict(dict)
        for r in rs:
            for t, c in r["timed"]:
                ratios[tuple(c[1:])][(r["shape"], r["M"])] = r["cublas_us"] / t
        full = {c: v for c, v in ratios.items() if len(v) == len(rs)}
        if not full:
            continue
        best, v = max(full.items(), key=lambda kv: (min(kv[1].values()), sum(kv[1].values())))
        table[nc].append((mb,) + best)
        oracle = min(r["cublas_us"] / r["timed"][0][0] for r in rs)
        report.append(f"N<={nc if nc < 1 << 62 else 'inf'} M<={mb if mb < 1 << 62 else 'inf'}: {best} "
                      f"min {min(v.values()):.2f} (per-point oracle {oracle:.2f})")
    print("\n".join(report))
    print("\nHOPPER_TABLE = (")
    for nc in sorted(table):
        rows = table[nc]
        # merge consecutive buckets that picked the same tile
        merged = []
        for row in rows:
            if merged and merged[-1][1:] == row[1:]:
                merged[-1] = row
            else:
                merged.append(row)
        merged[-1] = (1 << 62,) + merged[-1][1:]
        print(f"    ({'1 << 62' if nc >= 1 << 62 else nc}, (")
        for row in merged:
            head = "1 << 62" if row[0] >= 1 << 62 else str(row[0])
            print(f"        ({head}, {', '.join(repr(x) for x in row[1:])}),")
        print("    )),")
    print(")")


if __name__ == "__main__":
    main(sys.argv[1:])
