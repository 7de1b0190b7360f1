"""The dashboard's ASGI app (Starlette; served by uvicorn).

Routes, all read-only:

- ``/``                               the page (static/index.html)
- ``/static/...``                     its assets, vendored (uPlot) — nothing from a CDN
- ``/api/state``                      runs, their summaries and warnings; ETag, 304 when unchanged
- ``/api/run/{i}/data?since=V``       rows changed after table version V (304 when none)
- ``/api/run/{i}/tokens``             steps that have per-token data
- ``/api/run/{i}/tokens/{step}``      one step's per-token data, checked

Every ``/api/state`` request re-reads what the runs appended (at most every
0.5 s per run), so the page stays live by polling it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
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


def run_state(i: int, r: Run) -> dict:
    return {"id": i, "name": r.name, "path": r.path, "kind": r.kind, "sources": r.sources_label(),
            "onpolicy": r.onpolicy, "version": r.version, "summary": r.summary().as_dict(),
            "warnings": r.warnings, "notes": r.notes, "message": r.message,
            "token_steps": len(r.token_steps())}


def state(runs: list[Run]) -> dict:
    return {"runs": [run_state(i, r) for i, r in enumerate(runs)], "metrics": schema()}


def _json(body: bytes, request: Request, etag: str | None = None) -> Response:
    etag = etag or '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def create_app(runs: list[Run]) -> Starlette:
    def get_run(request: Request) -> Run | None:
        try:
            i = int(request.path_params["i"])
        except ValueError:
            return None
        return runs[i] if 0 <= i < len(runs) else None

    async def index(request: Request):
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    def api_state(request: Request):
        for r in runs:
            r.refresh()
        return _json(dumps(state(runs)), request)

    def api_data(request: Request):
        r = get_run(request)
        if r is None:
            return Response(status_code=404)
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            since = 0
        etag = f'"{id(r):x}-{r.version}-{since}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        cols = r.columns(since)
        if cols is None:
            return Response(status_code=304, headers={"ETag": etag})
        return _json(dumps(cols), request, f'"{id(r):x}-{cols["version"]}-{since}"')

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
    app = Starlette(routes=routes)
    app.state.runs = runs
    return app
