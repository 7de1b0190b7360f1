"""The check's report in the terminal (rich)."""
from __future__ import annotations

from .capture import describe_op
from .run import CheckResult


def render(res: CheckResult, console) -> None:
    from rich.table import Table

    m = res.metrics
    tp = f", TP={res.tensor_parallel_size}" if res.tensor_parallel_size > 1 else ""
    tp += ", CUDA graphs" if res.cuda_graphs else ""
    dt = (f"dtype {res.sampler_dtype}" if res.sampler_dtype == res.trainer_dtype
          else f"dtype: vLLM {res.sampler_dtype}, trainer {res.trainer_dtype}")
    t = Table(title=f"onpolicy check: {res.model} (plugin {'on' if res.plugin else 'off'}, T={res.temperature}{tp}"
                    + "".join(f", {k}={v}" for k, v in res.truncation.items()) + ")\n"
                    f"vLLM runs {res.sampler_dtype}, the trainer {res.trainer_dtype} ({dt})")
    for c in ("tokens compared", "bitwise equal", "mean |Δlogp|", "max |Δlogp|", "KL k3", "sequences with a mismatch"):
        t.add_column(c, justify="right")
    nbad = sum(f is not None for f in res.first_mismatch_per_sequence)
    colour = "green" if res.ok else "red"
    t.add_row(str(m["tokens"]), f"[{colour}]{100 * m['bitwise_equal_frac']:.2f}%[/{colour}]",
              f"{m['logp_abs_diff_mean']:.3e}", f"{m['logp_abs_diff_max']:.3e}", f"{m['kl_k3']:.3e}",
              f"{nbad} / {res.sequences}")
    console.print(t)
    if nbad:
        firsts = [f"#{i}@{f}" for i, f in enumerate(res.first_mismatch_per_sequence) if f is not None]
        console.print("first mismatching completion token per sequence: " + ", ".join(firsts[:24])
                      + (" ..." if len(firsts) > 24 else ""))
    d = res.divergence
    if d:
        diff = "n/a" if d["max_abs_diff"] is None else f"{d['max_abs_diff']:.3g}"
        console.print(f"[bold red]first divergence:[/] {describe_op(d['op'])} output: max |Δ| {diff}; "
                      f"everything before identical ({d['identical_before']} sub-op outputs)")
    for n in res.notes:
        console.print(f"note: {n}")
    if res.ok:
        console.print("[bold green]sampler and trainer agree bitwise on every sampled token.[/]")
