"""The `onpolicy` command: check, serve, dashboard, report, bench."""
from __future__ import annotations

import typer

app = typer.Typer(help="onpolicy: bitwise-equal sampler and trainer logprobs for RL of LLMs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench = typer.Typer(help="Benchmarks and experiments.", no_args_is_help=True)
app.add_typer(bench, name="bench")


_NEEDS_ENGINE = "torch, transformers and vLLM", "onpolicy[vllm] (GPU) or onpolicy[cpu]"


def _missing(name: str, error: ImportError, needs: tuple[str, str] = _NEEDS_ENGINE):
    """A command whose dependencies are not installed: it says which and how to get them (exit 2)."""

    def command(ctx: typer.Context) -> None:
        typer.echo(f"error: `onpolicy {name}` needs {needs[0]} ({error}); install {needs[1]}", err=True)
        raise typer.Exit(2)

    command.__doc__ = f"(unavailable: {error.name or error} is not installed)"
    return command


def _register():
    extra = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True}}
    try:  # the dashboard's own dependencies (a checkout run without installing may lack them)
        from .dashboard.cli import dashboard, report
    except ImportError as e:
        for name in ("dashboard", "report"):
            app.command(name, **extra)(_missing(name, e, ("the dashboard's dependencies", "onpolicy (pip install)")))
    else:
        app.command()(dashboard)
        app.command()(report)
    try:  # torch and transformers: absent from a dashboard-only install
        from .check import check
    except ImportError as e:
        app.command("check", **extra)(_missing("check", e))
    else:
        app.command()(check)
    from .serve import serve

    app.command("serve", **extra)(serve)
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
