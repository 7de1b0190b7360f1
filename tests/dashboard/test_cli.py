"""`onpolicy dashboard`'s command line (issue 34 defect 12): port range, bad
host, the port bound before the runs are read, a warning for a non-loopback
host, and the Host check wired in. uvicorn's serve loop is replaced by a stub."""
from __future__ import annotations

import socket

import pytest
import typer
from typer.testing import CliRunner

from onpolicy.dashboard import cli as dcli

from .make_runs import write_onpolicy_run


@pytest.fixture()
def app():
    a = typer.Typer()
    a.command()(dcli.dashboard)
    a.command("other")(lambda: None)
    return a


@pytest.fixture()
def served(monkeypatch):
    """Stub uvicorn's Server.run: record the app and socket instead of serving."""
    import uvicorn

    got = {}

    def run(self, sockets=None):
        got["app"], got["sock"] = self.config.app, sockets[0]
        sockets[0].close()
    monkeypatch.setattr(uvicorn.Server, "run", run)
    return got


def one_line_error(res, code=2):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    return res.output.strip()


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_port_out_of_range(app, port, tmp_path):
    out = one_line_error(CliRunner().invoke(app, ["dashboard", str(tmp_path), "--port", port]))
    assert f"--port {port} is out of range: give a port from 1 to 65535, or 0 for any free port" in out


def test_bad_host_names_the_host_not_the_port(app, tmp_path):
    out = one_line_error(CliRunner().invoke(app, ["dashboard", str(tmp_path), "--host", "no-such-host.invalid",
                                                  "--port", "0"]))
    assert "--host 'no-such-host.invalid' is not an address of this machine" in out and "--port 0" not in out
    out = one_line_error(CliRunner().invoke(app, ["dashboard", str(tmp_path), "--host", "192.0.2.1", "--port", "0"]))
    assert "is --host '192.0.2.1' an address of this machine?" in out


def test_port_in_use_fails_before_reading_the_runs(app, tmp_path, monkeypatch):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]

    def must_not_read(specs):
        raise AssertionError("the runs were read before the port was bound")
    monkeypatch.setattr("onpolicy.dashboard.data.resolve_runs", must_not_read)
    try:
        out = one_line_error(CliRunner().invoke(app, ["dashboard", str(tmp_path), "--port", str(port)]))
    finally:
        busy.close()
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in out and "--port 0" in out


def test_loopback_serves_quietly_and_checks_the_host(app, tmp_path, served):
    from starlette.testclient import TestClient

    write_onpolicy_run(tmp_path / "on", steps=3, seed=1)
    res = CliRunner().invoke(app, ["dashboard", str(tmp_path / "on"), "--port", "0"])
    assert res.exit_code == 0, res.output
    assert "warning: --host" not in res.output and "serving http://127.0.0.1:" in res.output
    c = TestClient(served["app"])
    assert c.get("/api/state", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert c.get("/api/state", headers={"Host": "localhost:8765"}).status_code == 200
    assert c.get("/api/state", headers={"Host": "attacker.example:8765"}).status_code == 400


def test_all_interfaces_warn_and_allow_named_hosts(app, tmp_path, served):
    from starlette.testclient import TestClient

    write_onpolicy_run(tmp_path / "on", steps=3, seed=1)
    res = CliRunner().invoke(app, ["dashboard", str(tmp_path / "on"), "--host", "0.0.0.0", "--port", "0",
                                   "--allow-host", "dash.example.org"])
    assert res.exit_code == 0, res.output
    assert "warning: --host 0.0.0.0 serves the runs' metrics and token texts to anyone who can reach" in res.output
    c = TestClient(served["app"])
    for ok in ("10.1.2.3:8765", "dash.example.org:8765", f"{socket.gethostname()}:8765"):
        assert c.get("/api/state", headers={"Host": ok}).status_code == 200, ok
    assert c.get("/api/state", headers={"Host": "attacker.example"}).status_code == 400


def test_a_file_instead_of_a_run_dir(app, tmp_path, served):
    write_onpolicy_run(tmp_path / "on", steps=3, seed=1)
    res = CliRunner().invoke(app, ["dashboard", str(tmp_path / "on" / "metrics.jsonl"), "--port", "0"])
    assert res.exit_code == 0 and "on: bitwise equal at all 3 steps" in res.output
    (tmp_path / "x.txt").write_text("x")
    out = one_line_error(CliRunner().invoke(app, ["dashboard", str(tmp_path / "x.txt"), "--port", "0"]))
    assert "is a file, not a run directory: pass the directory that holds metrics.jsonl" in out
