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


# --- issue 34 ---------------------------------------------------------------------------

def test_versions_are_unique_across_server_processes(two_runs):
    """Defect 1: a page open across a restart must not take the new server's
    table for the one it holds: versions carry the server's id, and a ``since``
    of another server gets everything."""
    _, runs, on, trl = two_runs
    a, b = TestClient(create_app(runs)), TestClient(create_app(runs))
    va = a.get("/api/state").json()["runs"][0]["version"]
    vb = b.get("/api/state").json()["runs"][0]["version"]
    assert va != vb and va.split("-")[-1] == vb.split("-")[-1]     # same table, two servers
    assert a.get(f"/api/run/0/data?since={va}").status_code == 304
    full = b.get(f"/api/run/0/data?since={va}").json()               # the old server's version
    assert full["from_step"] is None and len(full["steps"]) == 30 and full["version"] == vb
    assert b.get("/api/run/0/data?since=3").json()["from_step"] is None   # a bare number: everything


def test_one_unreadable_run_does_not_take_the_page_down(tmp_path, monkeypatch):
    """Defect 2: a directory named metrics.jsonl, or any error reading one run,
    shows on that run; /api/state still answers for the others."""
    write_onpolicy_run(tmp_path / "good", steps=5, seed=1)
    (tmp_path / "bad" / "metrics.jsonl").mkdir(parents=True)
    write_onpolicy_run(tmp_path / "buggy", steps=5, seed=2)
    runs = resolve_runs([tmp_path / "good", tmp_path / "bad", tmp_path / "buggy"])
    for r in runs:
        r.min_refresh_s = 0.0

    def boom(force=False):
        raise RuntimeError("a reader bug")
    monkeypatch.setattr(runs[2], "refresh", boom)
    c = TestClient(create_app(runs))
    res = c.get("/api/state")
    assert res.status_code == 200
    good, bad, buggy = res.json()["runs"]
    assert good["summary"]["steps"] == 5 and not good["notes"]
    assert "cannot read" in bad["message"] and "Is a directory" in bad["message"]
    assert any("reading this run failed: RuntimeError: a reader bug" in n for n in buggy["notes"])
    assert buggy["summary"]["steps"] == 5                            # what it had read stays


def test_run_state_is_served(two_runs):
    _, runs, *_ = two_runs
    st = TestClient(create_app(runs, stale_s=1e9)).get("/api/state").json()
    assert [r["state"] for r in st["runs"]] == ["running", "running"]
    assert all(r["last_write"] > 0 and r["stale_s"] == 1e9 for r in st["runs"])
    st = TestClient(create_app(runs, stale_s=1e-9)).get("/api/state").json()
    assert [r["state"] for r in st["runs"]] == ["stopped", "stopped"]


def test_responses_are_gzip_compressed(tmp_path):
    write_onpolicy_run(tmp_path / "on", steps=2000, seed=1, token_every=0)
    c = TestClient(create_app(resolve_runs([tmp_path / "on"])))
    res = c.get("/api/run/0/data?since=0", headers={"Accept-Encoding": "gzip"})
    assert res.status_code == 200 and res.headers["content-encoding"] == "gzip"
    assert int(res.headers["content-length"]) < len(res.content) / 3          # compressed on the wire
    assert len(res.json()["steps"]) == 2000
    assert c.get("/static/app.js", headers={"Accept-Encoding": "gzip"}).headers["content-encoding"] == "gzip"
    plain = c.get("/api/run/0/data?since=0", headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.json() == res.json()


def test_host_header_is_checked(two_runs):
    """Defect 12: DNS rebinding (a page on evil.example whose name resolves to
    127.0.0.1) sends Host: evil.example; refused."""
    _, runs, *_ = two_runs
    c = TestClient(create_app(runs, allowed_hosts={"127.0.0.1", "localhost", "::1"}))
    for ok in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "LOCALHOST"):
        assert c.get("/api/state", headers={"Host": ok}).status_code == 200, ok
    for bad in ("evil.example:8765", "evil.example", "127.0.0.1.evil.example", "10.0.0.5:8765", ""):
        res = c.get("/api/state", headers={"Host": bad})
        assert res.status_code == 400 and "DNS rebinding" in res.text, bad
        assert c.get("/", headers={"Host": bad}).status_code == 400
    any_ip = TestClient(create_app(runs, allowed_hosts={"localhost", "gpu-node", "*ip"}))
    assert any_ip.get("/api/state", headers={"Host": "10.0.0.5:8765"}).status_code == 200
    assert any_ip.get("/api/state", headers={"Host": "gpu-node:8765"}).status_code == 200
    assert any_ip.get("/api/state", headers={"Host": "evil.example"}).status_code == 400
