"""The `onpolicy dashboard` and `onpolicy report` commands (wired into
onpolicy/cli.py's typer app)."""
from __future__ import annotations

import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Annotated, Optional

import typer

RUNS_HELP = ("Run directories (metrics.jsonl, tokens/, TensorBoard event files, trackio *.db), trackio "
             "databases (PROJECT.db or PROJECT.db#RUN), or trackio:PROJECT (trackio:PROJECT#RUN for one run) for trackio's local store.")


def _describe(runs) -> None:
    for r in runs:
        s = r.summary()
        if r.message:
            typer.secho(f"  {r.name}: {r.message}", fg=typer.colors.YELLOW, err=True)
            continue
        status = {"mismatch": f"MISMATCH at {s.mismatch_steps} of {s.steps} steps",
                  "equal": f"bitwise equal at all {s.steps} steps",
                  "unknown": f"{s.steps} steps, no mismatch metric logged"}[s.status]
        typer.echo(f"  {r.name}: {status}  [{', '.join(r.sources_label())}]", err=True)
        for w in r.warnings[:5]:
            typer.secho(f"    warning: {w}", fg=typer.colors.YELLOW, err=True)


def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(help=RUNS_HELP, show_default=False)],
    port: Annotated[int, typer.Option("--port", "-p", help="Port (0: any free port).")] = 8765,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a browser.")] = False,
) -> None:
    """Serve a live dashboard of sampler/trainer mismatch for one or more runs."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        typer.secho(f"the dashboard needs {e.name}: pip install 'onpolicy[dashboard]'", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from .data import resolve_runs

    runs = resolve_runs(run_dirs)
    app = create_app(runs)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        typer.secho(f"cannot listen on {host}:{port}: {e.strerror}; try --port 0", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    port = sock.getsockname()[1]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    typer.echo(f"onpolicy dashboard: {len(runs)} run{'s' if len(runs) != 1 else ''}", err=True)
    _describe(runs)
    typer.secho(f"serving {url}  (Ctrl-C to stop)", bold=True, err=True)
    if open_browser:
        threading.Timer(0.5, lambda: webbrowser.open(url)).start()
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help=RUNS_HELP, show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path("report.html"),
    png: Annotated[Optional[Path], typer.Option(help="PNG to write (default: OUTPUT with .png).")] = None,
    no_png: Annotated[bool, typer.Option("--no-png", help="Write only the HTML.")] = False,
) -> None:
    """Write a self-contained HTML report (no server, no network) and a PNG summary."""
    from .data import resolve_runs
    from .report import write_html, write_png

    runs = resolve_runs(run_dirs)
    if not any(r.table.steps for r in runs):
        for r in runs:
            typer.secho(f"{r.name}: {r.message}", fg=typer.colors.RED, err=True)
        typer.secho("nothing to report: no run has a complete step", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    _describe(runs)
    write_html(runs, output)
    typer.echo(f"wrote {output}", err=True)
    if not no_png:
        png = png or output.with_suffix(".png")
        try:
            write_png(runs, png)
        except ImportError:
            typer.secho("PNG skipped: it needs matplotlib (pip install matplotlib)", fg=typer.colors.YELLOW, err=True)
        else:
            typer.echo(f"wrote {png}", err=True)


def main() -> None:  # `python -m onpolicy.dashboard.cli` for trying it out without onpolicy/cli.py
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.command()(dashboard)
    app.command()(report)
    app()


if __name__ == "__main__":
    sys.exit(main())
