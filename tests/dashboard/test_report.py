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


# --- issue 34 / issue 28 ----------------------------------------------------------------

EVIL = "</title><script>window.__pwned = 1</script>"


def test_run_names_are_escaped_in_the_title(tmp_path):
    """Defect 4: a trackio run named </title><script>... must not run a script
    when the report is opened: everything the report embeds is escaped."""
    from .make_runs import write_trl_trackio_run

    write_trl_trackio_run(tmp_path / "p.db", EVIL, steps=3, seed=1)
    html = render_html(resolve_runs([tmp_path / "p.db"]), generated="test")
    assert EVIL not in html and "window.__pwned" in html                 # present, but only as data
    title = re.search(r"<title>(.*?)</title>", html, re.S).group(1)
    assert title == "onpolicy report · &lt;/title&gt;&lt;script&gt;window.__pwned = 1&lt;/script&gt;"
    assert html.count("</script>") == html.count("<script")
    assert embedded(html)["state"]["runs"][0]["name"] == EVIL


def test_png_shows_the_warnings_and_its_captions_do_not_overlap(tmp_path):
    """Defect 9: a partly written last line is reported in the PNG. Defect 13:
    the "not logged by" captions never overlap another text."""
    pytest.importorskip("matplotlib")
    from onpolicy.dashboard.report import build_figure, summary_lines

    write_onpolicy_run(tmp_path / "on", steps=30, seed=1, tail='{"step": 31, "kl_')
    write_trl_tensorboard_run(tmp_path / "trl", steps=30, seed=2)
    runs = resolve_runs([tmp_path / "on", tmp_path / "trl"])
    lines = [t for t, _ in summary_lines(runs)]
    assert any("on: metrics.jsonl line 31 is incomplete" in t for t in lines)
    fig = build_figure(runs)
    assert any("line 31 is incomplete" in t.get_text() for t in fig.texts)
    caps = [ax._right_title.get_text() for ax in fig.axes if ax._right_title.get_text()]
    assert caps and all(c == "not logged by trl" for c in caps)      # k1/k3 KL, bitwise: TRL logs none


def test_png_overlap_of_captions_and_next_row_titles(tmp_path):
    """Defect 13: no text of one chart (titles, "not logged by" caption, ticks,
    axis label) overlaps another's."""
    pytest.importorskip("matplotlib")
    from onpolicy.dashboard.report import build_figure

    write_onpolicy_run(tmp_path / "on", steps=30, seed=1)
    write_trl_tensorboard_run(tmp_path / "trl", steps=30, seed=2)
    fig = build_figure(resolve_runs([tmp_path / "on", tmp_path / "trl"]))
    fig.canvas.draw()
    rend = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in (ax._left_title, ax._right_title, ax.xaxis.label, *ax.get_xticklabels(),
                                            *ax.texts) if t.get_text()] + [t for t in fig.texts if t.get_text()]
    boxes = [(t.get_text(), t.get_window_extent(rend)) for t in texts]
    for i, (ta, a) in enumerate(boxes):
        for tb, b in boxes[i + 1:]:
            ox = min(a.x1, b.x1) - max(a.x0, b.x0)
            oy = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert ox <= 0 or oy <= 0, (ta, tb)


def test_report_refuses_to_overwrite_without_force(tmp_path, monkeypatch):
    """Issue 28 item 10: `onpolicy report` never overwrites report.html/.png
    silently: an existing output is an error naming --force."""
    pytest.importorskip("matplotlib")
    import typer

    from onpolicy.dashboard.cli import report

    app = typer.Typer()
    app.command()(report)
    app.command("other")(lambda: None)
    runner = CliRunner()
    write_onpolicy_run(tmp_path / "on", steps=10, seed=1)
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(app, ["report", "on"]).exit_code == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "report.png").exists()
    (tmp_path / "report.html").write_text("mine")
    res = runner.invoke(app, ["report", "on"])
    assert res.exit_code == 2 and "report.html and report.png already exist: pass --force" in res.output
    assert (tmp_path / "report.html").read_text() == "mine"
    (tmp_path / "report.html").unlink()
    res = runner.invoke(app, ["report", "on"])                 # only the PNG is there: still refused
    assert res.exit_code == 2 and "report.png already exists" in res.output and not (tmp_path / "report.html").exists()
    res = runner.invoke(app, ["report", "on", "--no-png"])     # the PNG is not written: fine
    assert res.exit_code == 0
    res = runner.invoke(app, ["report", "on", "--force"])
    assert res.exit_code == 0 and (tmp_path / "report.html").stat().st_size > 50_000


def test_report_cli_accepts_a_metrics_file_and_warns_in_the_terminal(tmp_path):
    """Defect 3: `onpolicy report runs/x/metrics.jsonl` reports run x; another file
    is a one-line error. Defect 9: the partly written last line is reported."""
    import typer

    from onpolicy.dashboard.cli import report

    app = typer.Typer()
    app.command()(report)
    app.command("other")(lambda: None)
    runner = CliRunner()
    write_onpolicy_run(tmp_path / "on", steps=10, seed=1, tail='{"step": 11, "kl')
    res = runner.invoke(app, ["report", str(tmp_path / "on" / "metrics.jsonl"), "-o", str(tmp_path / "r.html"),
                              "--no-png"])
    assert res.exit_code == 0, res.output
    assert "on: bitwise equal at all 10 steps" in res.output
    assert "warning: metrics.jsonl line 11 is incomplete" in res.output
    (tmp_path / "x.txt").write_text("x")
    res = runner.invoke(app, ["report", str(tmp_path / "x.txt"), "-o", str(tmp_path / "q.html")])
    assert res.exit_code == 2 and "is a file, not a run directory" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_run_colours_agree_between_page_and_png():
    """The page (app.js) and the PNG (report.py) give run i the same colour."""
    from onpolicy.dashboard.app import STATIC_DIR
    from onpolicy.dashboard.report import PALETTE, run_color

    js = (STATIC_DIR / "app.js").read_text()
    m = re.search(r"const PALETTE = \[(.*?)\];", js, re.S)
    assert re.findall(r"'(#[0-9a-f]{6})'", m.group(1)) == PALETTE
    colors = [run_color(i) for i in range(60)]
    assert len(set(colors)) == 60 and colors[:len(PALETTE)] == PALETTE
