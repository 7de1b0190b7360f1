"""The dashboard's ASGI app (Starlette; served by uvicorn).

Routes, all read-only:

- ``/``                               the page (static/index.html)
- ``/static/...``                     its assets, vendored (uPlot) — nothing from a CDN
- ``/api/state``                      runs, their summaries and warnings; ETag, 304 when unchanged
- ``/api/run/{i}/data?since=V``       rows changed after table version V (304 when none)
- ``/api/run/{i}/tokens``             steps that have per-token data
- ``/api/run/{i}/tokens/{step}``      one step's per-token data, checked

Every ``/api/state`` request re-reads what the runs appended (at most every
0.5 s per run), so the page stays live by polling it. One run that cannot be
read (an unexpected error) shows its error; the others go on.

Table versions are ``"<server id>-<n>"``: the server id is new in every server
process, so a page left open across a restart never takes the new server's
tables for the ones it holds (a ``since`` of another server means "send all").
Responses of 1 KB or more are gzip-compressed when the client accepts it.
With ``allowed_hosts``, a request whose ``Host`` header names another host is
refused (400): a web page cannot read the API through DNS rebinding.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
import time
import traceback
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .data import Run
from .metrics import METRICS

STATIC_DIR = Path(__file__).parent / "static"

try:
    import orjson

    def dumps(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover
    def dumps(obj) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def schema() -> dict:
    return {m.key: {"label": m.label, "known_as": m.known_as, "doc": m.doc} for m in METRICS}


def run_state(i: int, r: Run, server: str = "report", error: str | None = None) -> dict:
    notes = r.notes + ([error] if error else [])
    return {"id": i, "name": r.name, "path": r.path, "kind": r.kind, "sources": r.sources_label(),
            "onpolicy": r.onpolicy, "version": f"{server}-{r.version}", "summary": r.summary().as_dict(),
            "warnings": r.warnings, "notes": notes, "message": r.message or (error if not r.table.steps else None),
            "token_steps": len(r.token_steps()), "state": r.state(), "last_write": r.last_write(),
            "finished": r.finished(), "stale_s": r.stale_s}


def state(runs: list[Run], server: str = "report", errors: dict | None = None) -> dict:
    errors = errors or {}
    return {"server": server, "runs": [run_state(i, r, server, errors.get(i)) for i, r in enumerate(runs)],
            "metrics": schema()}


def parse_version(v: str, server: str) -> int:
    """The table version in a client's ``since``: 0 (send everything) unless it
    is one of this server's versions."""
    sid, _, n = (v or "").rpartition("-")
    if sid != server:
        return 0
    try:
        return int(n)
    except ValueError:
        return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: refuse requests whose Host header is not one of
    ``allowed`` (hostnames, lower case, no port), against DNS rebinding. ``"*ip"``
    in ``allowed`` lets any IP-literal Host through (a server bound to all
    interfaces is reached by its addresses; rebinding needs a name)."""

    def __init__(self, app, allowed: set[str]):
        self.app = app
        self.allowed = {h.lower().strip("[]") for h in allowed}

    def host_ok(self, host_header: str) -> bool:
        h = host_header.strip().lower()
        if h.startswith("["):
            h = h[1:h.find("]")] if "]" in h else h
        elif h.count(":") == 1:
            h = h.split(":")[0]
        if h in self.allowed:
            return True
        if "*ip" in self.allowed:
            try:
                ipaddress.ip_address(h)
                return True
            except ValueError:
                return False
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host", "")
            if not self.host_ok(host):
                res = PlainTextResponse(
                    f"Host {host!r} is not this dashboard's address; refused (DNS rebinding protection). "
                    "Open it by the address it printed, or start it with --allow-host NAME.\n", status_code=400)
                await res(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json(body: bytes, request: Request, etag: str | None = None) -> Response:
    etag = etag or '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def create_app(runs: list[Run], allowed_hosts: set[str] | None = None, stale_s: float | None = None) -> Starlette:
    """The app over ``runs``. ``allowed_hosts``: the hostnames a request's Host
    header may name (None: no check, as for tests); ``stale_s``: seconds without a
    write after which a run shows as stopped."""
    server = f"{int(time.time()):x}{secrets.token_hex(3)}"     # new in every server process
    errors: dict[int, str] = {}
    if stale_s is not None:
        for r in runs:
            r.stale_s = stale_s

    def get_run(request: Request) -> Run | None:
        try:
            i = int(request.path_params["i"])
        except ValueError:
            return None
        return runs[i] if 0 <= i < len(runs) else None

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    def api_state(request: Request):
        for i, r in enumerate(runs):
            try:
                r.refresh()
                errors.pop(i, None)
            except Exception as e:   # one run's bug or bad file must not take the page down
                errors[i] = f"reading this run failed: {type(e).__name__}: {e}"
                traceback.print_exc()
        return _json(dumps(state(runs, server, errors)), request)

    def api_data(request: Request):
        r = get_run(request)
        if r is None:
            return Response(status_code=404)
        since = parse_version(request.query_params.get("since", ""), server)
        etag = f'"{server}-{id(r):x}-{r.version}-{since}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        cols = r.columns(since)
        if cols is None:
            return Response(status_code=304, headers={"ETag": etag})
        etag = f'"{server}-{id(r):x}-{cols["version"]}-{since}"'
        cols["version"] = f"{server}-{cols['version']}"
        return _json(dumps(cols), request, etag)

    def api_token_steps(request: Request):
        r = get_run(request)
        if r is None:
            return Response(status_code=404)
        return _json(dumps({"steps": r.token_steps()}), request)

    def api_token_file(request: Request):
        r = get_run(request)
        if r is None:
            return Response(status_code=404)
        try:
            step = int(request.path_params["step"])
        except ValueError:
            return Response(status_code=404)
        f = r.token_file(step)
        if f is None:
            return Response(status_code=404)
        return _json(dumps(f), request)

    routes = [
        Route("/", index),
        Route("/api/state", api_state),
        Route("/api/run/{i}/data", api_data),
        Route("/api/run/{i}/tokens", api_token_steps),
        Route("/api/run/{i}/tokens/{step}", api_token_file),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    # level 1, not Starlette's default 9: two 10,000-step test runs' rows, 4.3 MB of JSON, gzip to
    # 1.7 MB in 35 ms at level 1 and to 1.5 MB in 550 ms at level 9 (this 2-core machine); on
    # 127.0.0.1 compression is pure cost, so it must be cheap
    middleware = [Middleware(GZipMiddleware, minimum_size=1024, compresslevel=1)]
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(HostCheck, allowed=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.runs = runs
    app.state.server = server
    return app
