"""The `onpolicy dashboard` and `onpolicy report` commands (wired into
onpolicy/cli.py's typer app)."""
from __future__ import annotations

import errno
import ipaddress
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Annotated, Optional

import typer

RUNS_HELP = ("Run directories (metrics.jsonl, tokens/, TensorBoard event files, trackio *.db) or a run's "
             "metrics.jsonl / event file, trackio databases (PROJECT.db or PROJECT.db#RUN), or trackio:PROJECT "
             "(trackio:PROJECT#RUN for one run) for trackio's local store.")


def _fail(msg: str) -> typer.Exit:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _describe(runs) -> None:
    for r in runs:
        s = r.summary()
        if r.message:
            typer.secho(f"  {r.name}: {r.message}", fg=typer.colors.YELLOW, err=True)
            continue
        status = {"mismatch": f"MISMATCH at {s.mismatch_steps} of {s.steps} steps",
                  "equal": f"bitwise equal at all {s.steps} steps",
                  "unknown": f"{s.steps} steps, no mismatch metric logged"}[s.status]
        typer.echo(f"  {r.name}: {status}  [{', '.join(r.sources_label())}; {r.state()}]", err=True)
        notes = r.notes + r.warnings
        for w in notes[:6]:
            typer.secho(f"    warning: {w}", fg=typer.colors.YELLOW, err=True)
        if len(notes) > 6:
            typer.secho(f"    ... and {len(notes) - 6} more warnings (shown on the page)", fg=typer.colors.YELLOW,
                        err=True)


def _resolve(run_dirs):
    from .data import RunSpecError, resolve_runs

    try:
        return resolve_runs(run_dirs)
    except RunSpecError as e:
        raise _fail(str(e))


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a one-line error (exit 2)."""
    if not 0 <= port <= 65535:
        raise _fail(f"--port {port} is out of range: give a port from 1 to 65535, or 0 for any free port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise _fail(f"--host {host!r} is not an address of this machine ({e.strerror}): "
                    "use 127.0.0.1 (the default), or 0.0.0.0 to listen on every interface")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise _fail(f"cannot listen on {host}:{port}: the port is in use (another dashboard?); "
                        "pass another --port, or --port 0 for any free port")
        if e.errno in (errno.EACCES, errno.EPERM):
            raise _fail(f"cannot listen on {host}:{port}: {e.strerror} (ports below 1024 need root); "
                        "pass a --port above 1024, or --port 0 for any free port")
        raise _fail(f"cannot listen on {host}:{port}: {e.strerror}: is --host {host!r} an address of this "
                    "machine? use 127.0.0.1 (the default), or 0.0.0.0 for every interface")
    return sock


def _allowed_hosts(host: str, bound: str, extra: list[str]) -> set[str]:
    """Host header names a browser may use to reach the server."""
    allowed = {host.lower(), bound.lower(), "localhost", "127.0.0.1", "::1", *(h.lower() for h in extra)}
    try:
        wildcard = ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:   # every interface: its addresses (IP literals) and this machine's names
        allowed |= {"*ip", socket.gethostname().lower(), socket.getfqdn().lower()}
    return allowed


def dashboard(
    run_dirs: Annotated[list[Path], typer.Argument(help=RUNS_HELP, show_default=False)],
    port: Annotated[int, typer.Option("--port", "-p", help="Port, 1-65535 (0: any free port).")] = 8765,
    host: Annotated[str, typer.Option(help="Interface to listen on. Anything but a loopback address exposes the "
                                      "runs' metrics and token texts to the network, without authentication.")]
    = "127.0.0.1",
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", help="Also accept requests whose Host header names this (repeatable), e.g. a name "
        "this machine is reached by through a proxy. Others are refused (DNS rebinding protection).")] = None,
    stale_after: Annotated[float, typer.Option(
        "--stale-after", help="Minutes without a write after which a run shows as stopped.")] = 5.0,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a browser.")] = False,
) -> None:
    """Serve a live dashboard of sampler/trainer mismatch for one or more runs."""
    try:
        import uvicorn

        from .app import create_app, is_loopback
    except ImportError as e:
        typer.secho(f"the dashboard needs the Python module {e.name}, one of onpolicy's dependencies: reinstall "
                    "onpolicy (pip install -e . in its checkout) to get them", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if stale_after <= 0:
        raise _fail(f"--stale-after {stale_after} must be a positive number of minutes")
    sock = _listen(host, port)          # before reading the runs: a busy port fails at once
    bound, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if not is_loopback(bound):
        typer.secho(f"warning: --host {host} serves the runs' metrics and token texts to anyone who can reach "
                    f"this machine on port {port}, without authentication; the default 127.0.0.1 (with an SSH "
                    "tunnel for remote viewing) keeps them local", fg=typer.colors.YELLOW, err=True)
    runs = _resolve(run_dirs)
    app = create_app(runs, allowed_hosts=_allowed_hosts(host, bound, allow_host or []), stale_s=stale_after * 60)
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
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUTPUT / the PNG if they exist.")] = False,
) -> None:
    """Write a self-contained HTML report (no server, no network) and a PNG summary."""
    from .report import write_html, write_png

    png = None if no_png else (png or output.with_suffix(".png"))
    if not force:
        exist = [str(p) for p in (output, png) if p is not None and p.exists()]
        if exist:
            raise _fail(f"{' and '.join(exist)} already exist{'s' if len(exist) == 1 else ''}: pass --force to "
                        "overwrite, or -o/--png to write elsewhere")
    runs = _resolve(run_dirs)
    if not any(r.table.steps for r in runs):
        for r in runs:
            typer.secho(f"{r.name}: {r.message}", fg=typer.colors.RED, err=True)
        raise _fail("nothing to report: no run has a complete step")
    _describe(runs)
    try:
        write_html(runs, output, force=force)
    except FileExistsError:   # appeared meanwhile
        raise _fail(f"{output} already exists: pass --force to overwrite")
    typer.echo(f"wrote {output}", err=True)
    if png is not None:
        try:
            write_png(runs, png, force=force)
        except ImportError:
            typer.secho("PNG skipped: it needs matplotlib (pip install matplotlib)", fg=typer.colors.YELLOW, err=True)
        except FileExistsError:
            raise _fail(f"{png} already exists: pass --force to overwrite")
        else:
            typer.echo(f"wrote {png}", err=True)


def main() -> None:  # `python -m onpolicy.dashboard.cli` for trying it out without onpolicy/cli.py
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.command()(dashboard)
    app.command()(report)
    app()


if __name__ == "__main__":
    sys.exit(main())
