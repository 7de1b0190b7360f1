"""`onpolicy report`: a self-contained HTML file and a PNG."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from onpolicy.dashboard.data import resolve_runs
from onpolicy.dashboard.report import MAX_TOKEN_STEPS, render_html, write_png

from .make_runs import write_onpolicy_run, write_trl_tensorboard_run


def embedded(html: str) -> dict:
    m = re.search(r"<script>window.__ONPOLICY_STATIC__ = (.*?);</script>", html, re.S)
    assert m
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_html_is_self_contained_and_carries_the_data(tmp_path):
    on = write_onpolicy_run(tmp_path / "on", steps=400, seed=1, token_every=5)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=50, seed=2)
    html = render_html(resolve_runs([tmp_path / "on", tmp_path / "trl"]), generated="test")
    # nothing is fetched: no src/href except data: URIs, every asset inlined
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert all(u.startswith("data:") for u in refs), refs
    assert "uPlot" in html and "renderDrill" in html and ".chart-card" in html
    data = embedded(html)
    assert [r["name"] for r in data["state"]["runs"]] == ["on", "trl"]
    assert data["data"]["0"]["cols"]["reward_mean"] == [on[s]["reward_mean"] for s in range(1, 401)]
    assert data["data"]["1"]["cols"]["is_ratio_max"] == [trl[s]["is_ratio_max"] for s in range(1, 51)]
    # bounded drill-down: at most MAX_TOKEN_STEPS token files per run, first and last among them
    tok = data["tokens"]["0"]
    assert len(tok) == MAX_TOKEN_STEPS and {"1", "400"} <= set(tok)
    assert data["state"]["runs"][0]["token_steps"] == MAX_TOKEN_STEPS and data["tokens"]["1"] == {}


def test_script_breakout_is_escaped(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "kl_k3": 0.0, "</script><b>x": 1.0}) + "\n")
    html = render_html(resolve_runs([d]), generated="test")
    assert html.count("</script>") == html.count("<script")     # every script closes once
    assert "</script><b>x" not in html
    assert embedded(html)["data"]["0"]["cols"]["</script><b>x"] == [1.0]


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    write_onpolicy_run(tmp_path / "on", steps=40, seed=1)
    write_onpolicy_run(tmp_path / "off", steps=40, seed=2, mismatch=True)
    out = write_png(resolve_runs([tmp_path / "on", tmp_path / "off"]), tmp_path / "r.png")
    im = Image.open(out)
    assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 600
    # the mismatch banner line is drawn in red, the equal one in green
    px = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 24)}
    assert (220, 38, 38) in px and (5, 150, 105) in px


def test_report_cli(tmp_path):
    import typer

    from onpolicy.dashboard.cli import report

    app = typer.Typer()                       # as onpolicy/cli.py wires it: a subcommand among others
    app.command()(report)
    app.command("other")(lambda: None)
    runner = CliRunner()
    write_onpolicy_run(tmp_path / "on", steps=10, seed=1)
    res = runner.invoke(app, ["report", str(tmp_path / "on"), "-o", str(tmp_path / "out" / "r.html"), "--no-png"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "r.html").stat().st_size > 50_000
    res = runner.invoke(app, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "does not exist" in res.output and not (tmp_path / "x.html").exists()
