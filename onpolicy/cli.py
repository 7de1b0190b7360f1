"""The `onpolicy` command: check, dashboard, report, bench."""
from __future__ import annotations

import typer

app = typer.Typer(help="onpolicy: bitwise-equal sampler and trainer logprobs for RL of LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench = typer.Typer(help="Benchmarks and experiments.", no_args_is_help=True)
app.add_typer(bench, name="bench")


def _register():
    from .check import check
    from .dashboard.cli import dashboard, report

    app.command()(check)
    app.command()(dashboard)
    app.command()(report)
    from .bench.cli import determinism

    bench.command()(determinism)


def main():
    _register()
    app()


if __name__ == "__main__":
    main()
