"""The `onpolicy` command: check, dashboard, report, bench."""
from __future__ import annotations

import typer

app = typer.Typer(help="onpolicy: bitwise-equal sampler and trainer logprobs for RL of LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench = typer.Typer(help="Benchmarks and experiments.", no_args_is_help=True)
app.add_typer(bench, name="bench")


def _missing(name: str, error: ImportError):
    """A command whose dependencies are not installed: it says which and how to get them (exit 2)."""

    def command(ctx: typer.Context) -> None:
        typer.echo(f"error: `onpolicy {name}` needs torch, transformers and vLLM ({error}); install "
                   "onpolicy[vllm] (GPU) or onpolicy[cpu]", err=True)
        raise typer.Exit(2)

    command.__doc__ = f"(unavailable: {error.name or error} is not installed)"
    return command


def _register():
    from .dashboard.cli import dashboard, report

    app.command()(dashboard)
    app.command()(report)
    extra = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}
    try:  # torch and transformers: absent from a dashboard-only install
        from .check import check
    except ImportError as e:
        app.command("check", **extra)(_missing("check", e))
    else:
        app.command()(check)
    try:
        from .bench.cli import determinism
    except ImportError as e:
        bench.command("determinism", **extra)(_missing("bench determinism", e))
    else:
        bench.command()(determinism)


def main():
    _register()
    app()


if __name__ == "__main__":
    main()
