"""The dashboard's HTTP API and assets (Starlette TestClient: no sockets)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from onpolicy.dashboard.app import STATIC_DIR, create_app
from onpolicy.dashboard.data import resolve_runs

from .make_runs import write_onpolicy_run, write_trl_tensorboard_run

EXTERNAL_LOAD = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//"""
                           r"""|fetch\(\s*["'`]https?:|XMLHttpRequest|WebSocket\(|importScripts""", re.I)


@pytest.fixture()
def two_runs(tmp_path):
    on = write_onpolicy_run(tmp_path / "on", steps=30, seed=1)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=30, seed=2)
    runs = resolve_runs([tmp_path / "on", tmp_path / "trl"])
    for r in runs:
        r.min_refresh_s = 0.0
    return tmp_path, runs, on, trl


def test_page_and_vendored_assets_are_served_locally(two_runs):
    _, runs, *_ = two_runs
    c = TestClient(create_app(runs))
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(not re.match(r"(?:https?:)?//", u) for u in refs), refs
    for u in refs:
        if u.startswith("static/"):
            res = c.get("/" + u)
            assert res.status_code == 200 and len(res.content) > 100, u
    assert "uPlot" in c.get("/static/vendor/uPlot.iife.min.js").text


def test_no_asset_loads_anything_from_the_network():
    """Offline: no asset may reference a remote script, style, font or endpoint
    (uPlot's banner comment names its home page; comments are not loads)."""
    files = [p for p in STATIC_DIR.rglob("*") if p.suffix in {".html", ".js", ".css"}]
    assert {p.name for p in files} >= {"index.html", "app.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"}
    for p in files:
        text = re.sub(r"/\*.*?\*/", "", p.read_text(encoding="utf-8"), flags=re.S)
        assert not EXTERNAL_LOAD.search(text), (p.name, EXTERNAL_LOAD.search(text).group(0))
    assert (STATIC_DIR / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")


def test_state_etag_and_live_refresh(two_runs):
    tmp, runs, on, trl = two_runs
    c = TestClient(create_app(runs))
    res = c.get("/api/state")
    assert res.status_code == 200
    st = res.json()
    names = [r["name"] for r in st["runs"]]
    assert names == ["on", "trl"]
    s_on, s_trl = (r["summary"] for r in st["runs"])
    assert (s_on["status"], s_on["steps"], s_on["mismatch_steps"]) == ("equal", 30, 0)
    assert (s_trl["status"], s_trl["mismatch_steps"]) == ("mismatch", 30)
    assert st["runs"][0]["onpolicy"] is True and st["runs"][0]["token_steps"] == 4
    assert st["metrics"]["kl_k3"]["known_as"] == "verl rollout_corr/k3_kl"
    etag = res.headers["etag"]
    again = c.get("/api/state", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    # the run writes a step with a mismatch and a corrupt line: the next poll shows both
    with open(tmp / "on" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 31, "bitwise_equal_frac": 0.5, "kl_k3": 1e-6}) + "\n{oops\n")
    res = c.get("/api/state", headers={"If-None-Match": etag})
    assert res.status_code == 200
    r0 = res.json()["runs"][0]
    assert r0["summary"]["status"] == "mismatch" and r0["summary"]["first_mismatch_step"] == 31
    assert any("line 32: not valid JSON" in w for w in r0["warnings"])


def test_data_is_incremental(two_runs):
    tmp, runs, on, trl = two_runs
    c = TestClient(create_app(runs))
    full = c.get("/api/run/1/data?since=0").json()
    assert full["from_step"] is None and full["steps"] == list(range(1, 31))
    assert full["cols"]["logp_abs_diff_max"] == [trl[s]["logp_abs_diff_max"] for s in range(1, 31)]
    assert full["mismatch"] == [1] * 30
    v = full["version"]
    assert c.get(f"/api/run/1/data?since={v}").status_code == 304
    d0 = c.get("/api/run/0/data?since=0").json()
    assert d0["cols"]["bitwise_equal_frac"] == [1.0] * 30 and d0["mismatch"] == [0] * 30
    with open(tmp / "on" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 31, "kl_k3": 0.0, "reward_mean": 0.5}) + "\n")
    c.get("/api/state")
    inc = c.get(f"/api/run/0/data?since={d0['version']}").json()
    assert inc["from_step"] == 31 and inc["steps"] == [31] and inc["cols"]["reward_mean"] == [0.5]
    assert inc["cols"]["bitwise_equal_frac"] == [None]
    assert c.get("/api/run/7/data").status_code == 404
    assert c.get("/api/run/x/data").status_code == 404


def test_token_endpoints(two_runs):
    _, runs, on, trl = two_runs
    c = TestClient(create_app(runs))
    assert c.get("/api/run/0/tokens").json()["steps"] == [1, 10, 20, 30]
    assert c.get("/api/run/1/tokens").json()["steps"] == []
    f = c.get("/api/run/0/tokens/10").json()
    assert len(f["samples"]) == 4 and not f["warnings"]
    s = f["samples"][0]
    assert s["sampler_logp"] == s["trainer_logp"] and len(s["text"]) == len(s["sampler_logp"])
    assert c.get("/api/run/0/tokens/11").status_code == 404
    assert c.get("/api/run/1/tokens/10").status_code == 404
    assert c.get("/api/run/0/tokens/..%2F..%2Fetc").status_code == 404


def test_empty_and_missing_runs_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    runs = resolve_runs([tmp_path / "missing", tmp_path / "empty"])
    c = TestClient(create_app(runs))
    st = c.get("/api/state").json()
    msgs = [r["message"] for r in st["runs"]]
    assert "does not exist" in msgs[0] and "No metrics" in msgs[1]
    d = c.get("/api/run/0/data?since=0").json()
    assert d["steps"] == [] and d["from_step"] is None


def test_static_files_ship_with_the_package():
    """pyproject's package-data must carry these (see docs/dashboard.md)."""
    import importlib.resources as ir

    root = ir.files("onpolicy.dashboard") / "static"
    for name in ("index.html", "app.js", "style.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
                 "vendor/uPlot.LICENSE"):
        assert (root / name).is_file(), name
    assert Path(STATIC_DIR).is_dir()
