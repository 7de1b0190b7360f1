"""End to end in a real headless browser (Debian's chromium + chromedriver,
driven by Selenium): the dashboard over recorded runs, as a user sees it.

Skipped where no browser is installed, except in CI (``CI`` set), where a
missing browser is a failure: .ci/run installs it.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest

from onpolicy.dashboard.app import create_app
from onpolicy.dashboard.data import resolve_runs

from .helpers import Chromium, ServerThread, browser_available
from .make_runs import write_onpolicy_run, write_trl_tensorboard_run

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "docs" / "dashboard.png"

_why = browser_available()
if _why and os.environ.get("CI"):
    raise RuntimeError(f"the browser test cannot run in CI: {_why}")
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


@pytest.fixture(scope="module")
def chrome():
    c = Chromium(width=1440, height=1000)
    yield c
    c.close()


def load(chrome: Chromium, url: str) -> float:
    """Navigate and wait until the charts are drawn; wall seconds."""
    chrome.driver.get("about:blank")
    chrome.requested_urls()                      # drop what earlier pages logged
    chrome.console_errors()
    t = time.perf_counter()
    chrome.driver.get(url)
    chrome.wait_for("window.__onpolicy && window.__onpolicy.ready", timeout=30)
    return time.perf_counter() - t


def chart(chrome, cid):
    return chrome.driver.execute_script(f"return window.__onpolicy.chartData('{cid}')")


def series(data, run, key, marker=False, smoothed=False):
    got = [s for s in data["series"] if s["run"] == run and s["key"] == key and s["marker"] == marker
           and s.get("smoothed", False) == smoothed]                 # smoothing on: the raw values are the unsmoothed series
    assert len(got) == 1, (run, key, [(s["run"], s["key"], s["marker"]) for s in data["series"]])
    return dict(zip(data["x"], got[0]["values"]))


def pixel(chrome, css, fx=0.5):
    return chrome.driver.execute_script(
        "const c = document.querySelector(arguments[0]);"
        "const x = Math.floor(c.width * arguments[1]);"
        "return Array.from(c.getContext('2d').getImageData(x, Math.floor(c.height / 2), 1, 1).data).slice(0, 3);",
        css, fx)


def assert_only_local_requests(chrome, port):
    for u in chrome.requested_urls():
        if u.startswith(("http:", "https:", "ws:", "wss:")):
            assert u.startswith(f"http://127.0.0.1:{port}/"), u


def test_two_recorded_runs(tmp_path, chrome):
    """One onpolicy run (bitwise, 0 mismatch) and one plain TRL run logging to
    TensorBoard (mismatch at every step): values, alert, drill-down, live refresh."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    on = write_onpolicy_run(tmp_path / "on", steps=120, seed=11, token_every=10)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=120, seed=12)
    runs = resolve_runs([tmp_path / "on", tmp_path / "trl"])
    for r in runs:
        r.min_refresh_s = 0.0
    d = chrome.driver
    with ServerThread(create_app(runs)) as srv:
        load(chrome, srv.url)
        assert chrome.console_errors() == []

        # the alert: the TRL run mismatches, the onpolicy run is bitwise equal
        alert = d.find_element(By.ID, "mismatch-alert").text
        worst = max(trl, key=lambda s: trl[s]["logp_abs_diff_max"])
        assert "mismatch in 1 of 2 runs" in alert and "trl: 120 of 120 steps differ (first at step 1)" in alert
        assert f"at step {worst}" in alert
        ok = d.find_element(By.ID, "equal-alert").text
        assert "on: sampler and trainer logprobs bitwise equal at every one of 120 steps" in ok
        cards = d.find_elements(By.CSS_SELECTOR, ".run")
        assert "ONPOLICY ON" in cards[0].text and "TENSORBOARD" in cards[1].text

        # mismatch map: red row for TRL, green for onpolicy
        assert pixel(chrome, '#timeline canvas[data-run="1"]') == [220, 38, 38]
        assert pixel(chrome, '#timeline canvas[data-run="0"]') == [52, 211, 153]

        # plotted values, exactly what the runs wrote (TensorBoard: float32)
        absmax = chart(chrome, "absmax")
        assert absmax["x"] == list(range(1, 121))
        assert series(absmax, 0, "logp_abs_diff_max") == {s: 0.0 for s in range(1, 121)}
        assert series(absmax, 1, "logp_abs_diff_max") == {s: trl[s]["logp_abs_diff_max"] for s in range(1, 121)}
        ratio = chart(chrome, "ratio")
        for k in ("is_ratio_min", "is_ratio_mean", "is_ratio_max"):
            assert series(ratio, 1, k) == {s: trl[s][k] for s in range(1, 121)}
            assert series(ratio, 0, k) == {s: 1.0 for s in range(1, 121)}
        k3 = chart(chrome, "k3")
        assert series(k3, 0, "kl_k3") == {s: 0.0 for s in range(1, 121)}
        assert not any(s["run"] == 1 for s in k3["series"])          # TRL logs no KL estimator
        assert "not logged by trl" in d.find_element(By.CSS_SELECTOR, "#chart-k3 .missing").text
        bitwise = chart(chrome, "bitwise")
        assert series(bitwise, 0, "bitwise_equal_frac") == {s: 1.0 for s in range(1, 121)}
        reward = chart(chrome, "reward")
        assert series(reward, 0, "reward_mean") == {s: on[s]["reward_mean"] for s in range(1, 121)}
        assert series(reward, 1, "reward_mean") == {s: trl[s]["reward_mean"] for s in range(1, 121)}

        # hover: the readout shows the values at the step under the pointer
        over = d.find_element(By.CSS_SELECTOR, "#chart-absmax .u-over")
        x = d.execute_script("return window.__onpolicy.state.charts.absmax.u.valToPos(60, 'x')")
        ActionChains(d).move_to_element_with_offset(over, int(x - over.size["width"] / 2), 0).perform()
        readout = d.find_element(By.CSS_SELECTOR, "#chart-absmax .readout").text
        v = trl[60]["logp_abs_diff_max"]
        assert v >= 1e-3 and "step 60" in readout and f"trl {v:.6g}" in readout and "on 0" in readout

        # log (asinh) y axis on a chart; the values stay the same
        before = chart(chrome, "absmax")
        d.find_element(By.CSS_SELECTOR, "#chart-absmax .tools .btn").click()
        chrome.wait_for("window.__onpolicy.state.charts.absmax.u.scales.y.distr === 4")
        assert chart(chrome, "absmax") == before
        # drag to zoom one chart: every chart follows
        over = d.find_element(By.CSS_SELECTOR, "#chart-reward .u-over")
        w = over.size["width"]
        ActionChains(d).move_to_element_with_offset(over, int(-w * 0.3), 0).click_and_hold() \
            .move_by_offset(int(w * 0.4), 0).release().perform()
        lo, hi = chrome.wait_for("(() => { const x = window.__onpolicy.state.charts.reward.u.scales.x;"
                                 " return x.max - x.min < 80 && [x.min, x.max]; })()")
        for cid in ("absmax", "k3", "bitwise", "ratio"):
            xs = d.execute_script(f"const x = window.__onpolicy.state.charts.{cid}.u.scales.x; return [x.min, x.max]")
            assert xs == [lo, hi], cid
        d.execute_script("const u = window.__onpolicy.state.charts.reward.u; u.setScale('x', {min: 1, max: 120})")

        # drill-down: click the onpolicy row of the map in its middle -> step 60
        d.find_element(By.CSS_SELECTOR, '#timeline canvas[data-run="0"]').click()
        chrome.wait_for("window.__onpolicy.drill && window.__onpolicy.drill.step === 60")
        dr = d.execute_script("return window.__onpolicy.drill")
        tokfile = json.loads((tmp_path / "on" / "tokens" / "step_000060.json").read_text())
        n = sum(len(s["sampler_logp"]) for s in tokfile["samples"])
        assert dr["run"] == 0 and dr["stats"]["n"] == n and dr["stats"]["eq"] == n and dr["stats"]["max"] == 0
        assert "Step 60 · on" in d.find_element(By.ID, "drill-title").text
        toks = d.find_elements(By.CSS_SELECTOR, "#drill-tokens .tok")
        assert len(toks) == len(tokfile["samples"][0]["text"])
        assert all(t.get_attribute("style") == "" for t in toks)      # bitwise equal: no colour
        hist = d.find_element(By.ID, "drill-hist")
        assert hist.get_attribute("data-zeros") == str(n) and hist.get_attribute("data-nonzero") == "0"
        assert f"All {len(toks)} tokens of seq 0 have bitwise-equal" in d.find_element(By.ID, "drill-body").text
        # another sequence of the step
        d.find_element(By.CSS_SELECTOR, '.tab[data-sample="2"]').click()
        chrome.wait_for("window.__onpolicy.drill.sample === 2")
        assert len(d.find_elements(By.CSS_SELECTOR, "#drill-tokens .tok")) == len(tokfile["samples"][2]["text"])

        # live: the run writes a step with a mismatch, a corrupt line and half a line
        with open(tmp_path / "on" / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": 121, "bitwise_equal_frac": 1.0, "logp_abs_diff_max": 0.0}) + "\n")
            fh.write(json.dumps({"step": 122, "bitwise_equal_frac": 0.75, "logp_abs_diff_max": 0.015625}) + "\n")
            fh.write('{"step": 123, "bitwise_eq\n{"step": 124, "bitwise_equal_frac": 1.0, "logp_abs_')
        chrome.wait_for("window.__onpolicy.state.tables[0].steps.length === 122", timeout=20)
        chrome.wait_for("document.getElementById('warnings').textContent.includes('line 123')", timeout=10)
        alert = d.find_element(By.ID, "mismatch-alert").text
        assert "mismatch in 2 of 2 runs" in alert and "on: 1 of 122 steps differ (first at step 122)" in alert
        warn = d.find_element(By.ID, "warnings").text
        assert "line 123: not valid JSON" in warn and "line 124 is incomplete" in warn
        absmax = chart(chrome, "absmax")
        assert series(absmax, 0, "logp_abs_diff_max")[122] == 0.015625
        marks = series(absmax, 0, "logp_abs_diff_max", marker=True)   # red dot on the one bad step
        assert {s: v for s, v in marks.items() if v is not None} == {122: 0.015625}
        assert chrome.console_errors() == []
        assert_only_local_requests(chrome, srv.port)


def test_readme_screenshot(tmp_path, chrome, monkeypatch):
    """The picture in the README: onpolicy on vs off (the recipe's control run,
    finished) vs a plain TRL run (stopped an hour ago), with the legend, EMA
    smoothing 0.6 (raw values faint behind), a log axis, a filtered "All
    scalars" section and the drill-down of a mismatched step open."""
    import os

    monkeypatch.chdir(tmp_path)                       # relative paths: the picture does not show tmp dirs
    write_onpolicy_run(Path("runs/qwen3-grpo-onpolicy"), steps=300, seed=0, token_every=10)
    write_onpolicy_run(Path("runs/qwen3-grpo-control"), steps=300, seed=3, mismatch=True, token_every=10)
    with open("runs/qwen3-grpo-control/metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "finished", "time": time.time()}) + "\n")
    write_trl_tensorboard_run(Path("runs/qwen3-grpo-trl"), steps=300, seed=1)
    old = time.time() - 3600
    for p in Path("runs/qwen3-grpo-trl").rglob("events.out.tfevents.*"):
        os.utime(p, (old, old))
    runs = resolve_runs([Path("runs/qwen3-grpo-onpolicy"), Path("runs/qwen3-grpo-control"),
                         Path("runs/qwen3-grpo-trl")])
    assert [r.state() for r in runs] == ["running", "finished", "stopped"]
    d = chrome.driver
    d.set_window_size(1440, 1000)
    with ServerThread(create_app(runs)) as srv:
        load(chrome, srv.url)
        from selenium.webdriver.common.by import By

        d.execute_script("const s = document.getElementById('smooth'); s.value = 0.6; s.dispatchEvent(new Event('input'))")
        d.find_element(By.CSS_SELECTOR, "#chart-absmax .tools .btn").click()
        d.find_element(By.ID, "filter").send_keys("loss|entropy|grad_norm")
        chrome.wait_for("document.querySelectorAll('#more .chart-card').length === 3")
        chrome.wait_for("window.__onpolicy.state.charts.absmax.u.scales.y.distr === 4")
        d.find_element(By.CSS_SELECTOR, '#timeline canvas[data-run="1"]').click()
        chrome.wait_for("window.__onpolicy.drill && window.__onpolicy.drill.run === 1")
        dr = d.execute_script("return window.__onpolicy.drill")
        assert dr["stats"]["eq"] < dr["stats"]["n"]               # a mismatched step, coloured tokens
        styled = [t.get_attribute("style") for t in d.find_elements(By.CSS_SELECTOR, "#drill-tokens .tok")]
        assert any("background" in s for s in styled)
        d.execute_script("document.activeElement && document.activeElement.blur()")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        chrome.screenshot_full(SCREENSHOT)
        assert chrome.console_errors() == []
        assert_only_local_requests(chrome, srv.port)
    d.set_window_size(1440, 1000)
    from PIL import Image

    with Image.open(SCREENSHOT) as im:
        assert im.size[0] == 1440 and im.size[1] > 1200
    print(f"\nsaved {SCREENSHOT.relative_to(REPO)}")


def test_open_time_of_10000_steps(tmp_path, chrome):
    """How long a 10,000-step run takes to open (printed; not asserted: speed is
    measured, correctness is tested): an onpolicy JSONL run and a TRL
    TensorBoard run of 10,000 steps each, in one page."""
    on = write_onpolicy_run(tmp_path / "on", steps=10_000, seed=1, token_every=100)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=10_000, seed=2)
    t = time.perf_counter()
    runs = resolve_runs([tmp_path / "on", tmp_path / "trl"])
    load_s = time.perf_counter() - t
    rows = []
    with ServerThread(create_app(runs)) as srv:
        for _ in range(3):
            wall = load(chrome, srv.url)
            js = chrome.driver.execute_script("return [window.__onpolicy.openMs, window.__onpolicy.timings]")
            rows.append((wall, js[0] / 1000, js[1]))
        absmax = chart(chrome, "absmax")
        assert len(absmax["x"]) == 10_000
        got = series(absmax, 1, "logp_abs_diff_max")
        assert all(got[s] == trl[s]["logp_abs_diff_max"] for s in (1, 2500, 5000, 9999, 10_000))
        assert series(chart(chrome, "reward"), 0, "reward_mean")[7777] == on[7777]["reward_mean"]
        assert chrome.console_errors() == []
    walls = [r[0] for r in rows]
    print("\n\ndashboard open time: 2 runs x 10,000 steps (onpolicy metrics.jsonl + TRL TensorBoard events)")
    print(f"  server start, reading both runs             {load_s:6.2f} s")
    for i, (wall, page, tm) in enumerate(rows):
        print(f"  open #{i + 1}: navigation -> charts drawn         {wall:6.2f} s   (in page {page:.2f} s: "
              f"state {tm['state'] / 1000:.2f} s, data {tm['data'] / 1000:.2f} s, render {tm['render'] / 1000:.2f} s)")
    print(f"  median open                                 {statistics.median(walls):6.2f} s")


def test_report_opens_offline(tmp_path, chrome):
    """The report is one file: from file://, with no request to any server, it
    shows the same alert, charts and drill-down (embedded token steps)."""
    from selenium.webdriver.common.by import By

    from onpolicy.dashboard.report import write_html

    from .make_runs import write_trl_trackio_run

    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=50, seed=4)
    write_onpolicy_run(tmp_path / "off", steps=50, seed=5, mismatch=True, token_every=10)
    evil = "</title><script>window.__pwned = 1</script><img src=x onerror=window.__pwned=2>"   # defect 4
    write_trl_trackio_run(tmp_path / "p.db", evil, steps=5, seed=6)
    out = write_html(resolve_runs([tmp_path / "off", tmp_path / "trl", tmp_path / "p.db"]), tmp_path / "report.html")
    d = chrome.driver
    load(chrome, out.as_uri())
    assert d.execute_script("return window.__pwned === undefined")
    assert d.title == f"onpolicy report · off, trl, {evil}"
    assert evil in d.find_element(By.ID, "runs").text                # shown as text, never run
    assert d.execute_script("return window.__pwned === undefined")
    assert "static report" in d.find_element(By.ID, "live-text").text
    assert "mismatch in 3 of 3 runs" in d.find_element(By.ID, "mismatch-alert").text
    assert series(chart(chrome, "absmax"), 1, "logp_abs_diff_max") == {s: trl[s]["logp_abs_diff_max"] for s in range(1, 51)}
    d.find_element(By.CSS_SELECTOR, '#timeline canvas[data-run="0"]').click()
    step = chrome.wait_for("window.__onpolicy.drill && window.__onpolicy.drill.step")
    assert step in (20, 30)                          # the recorded step nearest the middle of the run
    tokfile = json.loads((tmp_path / "off" / "tokens" / f"step_{step:06d}.json").read_text())
    pairs = [(a, b) for s in tokfile["samples"] for a, b in zip(s["sampler_logp"], s["trainer_logp"])]
    st = d.execute_script("return window.__onpolicy.drill.stats")
    assert st["n"] == len(pairs) and st["eq"] == sum(a == b for a, b in pairs)
    assert st["max"] == max(abs(b - a) for a, b in pairs)
    urls = chrome.requested_urls()
    assert not [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))], urls
    assert chrome.console_errors() == []


# --- issue 34 ---------------------------------------------------------------------------

def test_a_restarted_server_shows_its_own_runs(tmp_path, chrome):
    """Defect 1: stop the server of run A, start one of run B on the same port:
    the open tab shows B's data (versions no longer collide across processes)."""
    a = write_onpolicy_run(tmp_path / "a" / "run", steps=30, seed=1, token_every=0)
    b = write_onpolicy_run(tmp_path / "b" / "run", steps=30, seed=2, mismatch=True, token_every=0)
    runs_a = resolve_runs([tmp_path / "a" / "run"])
    with ServerThread(create_app(runs_a)) as srv:
        port = srv.port
        load(chrome, srv.url)
        assert series(chart(chrome, "reward"), 0, "reward_mean") == {s: a[s]["reward_mean"] for s in range(1, 31)}
    runs_b = resolve_runs([tmp_path / "b" / "run"])
    assert runs_a[0].version == runs_b[0].version                 # the same table version in each process
    with ServerThread(create_app(runs_b), port=port):
        chrome.wait_for("document.getElementById('mismatch-alert') && "
                        "window.__onpolicy.state.tables[0].cols.reward_mean[0] === %r" % b[1]["reward_mean"], timeout=20)
        assert series(chart(chrome, "reward"), 0, "reward_mean") == {s: b[s]["reward_mean"] for s in range(1, 31)}
        assert series(chart(chrome, "absmax"), 0, "logp_abs_diff_max") == {s: b[s]["logp_abs_diff_max"] for s in range(1, 31)}
        assert pixel(chrome, '#timeline canvas[data-run="0"]') == [220, 38, 38]     # the map is B's: red
        assert chrome.console_errors() == []


def test_broken_inputs_and_four_runs(tmp_path, chrome):
    """Defects 2, 5, 6, 10, 11, 13 and the legend, on one page: a run whose
    metrics.jsonl is a directory, a run flagged for a NaN, a run that stopped
    an hour ago, an all-zero chart, a readout of four runs, tick labels."""
    import os

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    write_onpolicy_run(tmp_path / "good", steps=40, seed=1, token_every=0)
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "logp_abs_diff_max": float("nan") if s == 2 else 0.001 * s}) + "\n" for s in range(1, 41)))
    dead = write_onpolicy_run(tmp_path / "dead", steps=40, seed=3, mismatch=True, token_every=0)
    old = time.time() - 3600
    os.utime(tmp_path / "dead" / "metrics.jsonl", (old, old))
    (tmp_path / "broken" / "metrics.jsonl").mkdir(parents=True)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=40, seed=4)
    runs = resolve_runs([tmp_path / n for n in ("good", "nan", "dead", "broken", "trl")])
    d = chrome.driver
    with ServerThread(create_app(runs)) as srv:
        load(chrome, srv.url)
        assert "server unreachable" not in d.find_element(By.ID, "live-text").text
        cards = d.find_elements(By.CSS_SELECTOR, ".run")
        assert "cannot read" in cards[3].text and "Is a directory" in cards[3].text             # defect 2
        assert "max |Δlogp| NaN at step 2" in d.find_element(By.ID, "mismatch-alert").text      # defect 10
        assert "NaN" in cards[1].text
        assert "running · last write" in cards[0].text                                           # defect 11
        assert "stopped · no write for 60 min" in cards[2].text
        live = d.find_element(By.ID, "live-text").text
        assert "live · updated" not in live and "1 stopped" in live

        # legend: every run, its own colour
        chips = d.find_elements(By.CSS_SELECTOR, "#legend .chip")
        assert [c.text.split("\n")[0].split(" ")[0] for c in chips] == ["good", "nan", "dead", "broken", "trl"]
        colors = d.execute_script("return Array.from({length: 40}, (_, i) => window.__onpolicy.runColor(i))")
        assert len(set(colors)) == 40
        chips[4].click()                                                                         # hide trl
        chrome.wait_for("!window.__onpolicy.chartData('absmax').series.some(s => s.run === 4)")
        d.find_elements(By.CSS_SELECTOR, "#legend .chip")[4].click()
        chrome.wait_for("window.__onpolicy.chartData('absmax').series.some(s => s.run === 4)")

        # defect 5: the readout of four runs is not cut off
        over = d.find_element(By.CSS_SELECTOR, "#chart-absmax .u-over")
        x = d.execute_script("return window.__onpolicy.state.charts.absmax.u.valToPos(20, 'x')")
        ActionChains(d).move_to_element_with_offset(over, int(x - over.size["width"] / 2), 0).perform()
        readout = d.find_element(By.CSS_SELECTOR, "#chart-absmax .readout")
        text = readout.text
        for name, v in (("good", "0"), ("nan", "0.02"), ("dead", f"{dead[20]['logp_abs_diff_max']:.6g}"),
                        ("trl", f"{trl[20]['logp_abs_diff_max']:.6g}")):
            assert f"{name} {v}" in text, (name, text)
        clipped = d.execute_script("""
            const r = arguments[0], box = r.getBoundingClientRect();
            return Array.from(r.querySelectorAll('.ro')).filter(e => { const b = e.getBoundingClientRect();
              return b.right > box.right + 0.5 || b.bottom > box.bottom + 0.5; }).length
              + (r.scrollWidth > r.clientWidth + 1 ? 100 : 0);""", readout)
        assert clipped == 0

        # defect 6: ticks at 2.5 / 7.5 read 2.5 / 7.5 (one decimal on every tick, as d3 and matplotlib do);
        # zoomed to steps 1-9 the x ticks are whole steps
        assert d.execute_script("return window.__onpolicy.tickLabels([0, 2.5, 5, 7.5, 10], 2.5)") == \
            ["0.0", "2.5", "5.0", "7.5", "10.0"]
        assert d.execute_script("return window.__onpolicy.tickLabels([0, 0.2, 0.4], 0.2)") == ["0.0", "0.2", "0.4"]
        assert d.execute_script("return window.__onpolicy.tickLabels([-10, 0, 10], 10)") == ["-10", "0", "10"]
        assert d.execute_script("return window.__onpolicy.tickLabels([0.0001, 0.00015, 0.0002], 0.00005)") == \
            ["1.0e\u22124", "1.5e\u22124", "2.0e\u22124"]
        d.execute_script("window.__onpolicy.state.charts.reward.u.setScale('x', {min: 1, max: 9})")
        vals = d.execute_script("const a = window.__onpolicy.state.charts.absmax.u.axes[0]; return [a._splits, a._values]")
        assert vals[0] and all(float(s) == int(s) for s in vals[0]) and vals[1] == [str(int(s)) for s in vals[0]]
        d.execute_script("window.__onpolicy.state.charts.reward.u.setScale('x', {min: 1, max: 40})")

        # defect 13: an all-zero chart is not 0-100 (k1: only the equal run logs it... and dead)
        d.execute_script("window.__onpolicy.state.hidden.add(2); document.querySelector('#legend .chip').click();"
                         "document.querySelector('#legend .chip').click()")
        chrome.wait_for("!window.__onpolicy.chartData('k1').series.some(s => s.run === 2)")
        y = d.execute_script("const y = window.__onpolicy.state.charts.k1.u.scales.y; return [y.min, y.max]")
        assert y == [0, 1], y
        assert chrome.console_errors() == []


def test_chart_features(tmp_path, chrome):
    """Smoothing, x axis by step / wall time / relative time, log scale and
    CSV / JSON export on every chart, "ignore outliers", every scalar a chart."""
    from selenium.webdriver.common.by import By

    on = write_onpolicy_run(tmp_path / "on", steps=60, seed=11, token_every=0)
    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=60, seed=12)
    spiky = tmp_path / "spiky"
    spiky.mkdir()
    (spiky / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "time": 1000.0 + s, "reward_mean": 1000.0 if s == 30 else 0.5 + 0.001 * s}) + "\n" for s in range(1, 61)))
    runs = resolve_runs([tmp_path / "on", tmp_path / "trl", spiky])
    d = chrome.driver
    js = d.execute_script
    with ServerThread(create_app(runs)) as srv:
        load(chrome, srv.url)
        # every chart has lin/log, CSV and JSON
        cards = d.find_elements(By.CSS_SELECTOR, ".chart-card")
        assert len(cards) > 15
        for c in cards:
            assert [b.text for b in c.find_elements(By.CSS_SELECTOR, ".tools .btn")] == ["lin", "CSV", "JSON"]
        # every scalar any run logged is a chart: the main ones plus "All scalars"
        keys = set(js("return [].concat(...Object.values(window.__onpolicy.state.tables).map(t => Object.keys(t.cols)))"))
        shown = {k for c in cards for k in c.get_attribute("data-key").split(" ")}
        assert keys - {"time"} <= shown and {"train/loss", "train/entropy", "reward_std"} <= shown
        box = d.find_element(By.ID, "filter")
        box.send_keys("loss|entropy")
        chrome.wait_for("document.querySelectorAll('#more .chart-card').length === 2")
        assert {c.get_attribute("data-key") for c in d.find_elements(By.CSS_SELECTOR, "#more .chart-card")} == \
            {"train/loss", "train/entropy"}
        loss = series(chart(chrome, "train/loss"), 1, "train/loss")
        assert len(loss) == 60
        js("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input'))")

        # log scale on a chart that had none before (reward), values unchanged
        before = chart(chrome, "reward")
        d.find_element(By.CSS_SELECTOR, "#chart-reward .tools .btn").click()
        chrome.wait_for("window.__onpolicy.state.charts.reward.u.scales.y.distr === 4")
        assert chart(chrome, "reward")["series"] == before["series"]
        d.find_element(By.CSS_SELECTOR, "#chart-reward .tools .btn").click()

        # ignore outliers: the spike at 1000 no longer sets the y range
        assert js("return window.__onpolicy.state.charts.reward.u.scales.y.max") > 1000
        d.find_element(By.ID, "robust").click()
        chrome.wait_for("window.__onpolicy.state.charts.reward.u.scales.y.max < 10")
        d.find_element(By.ID, "robust").click()
        chrome.wait_for("window.__onpolicy.state.charts.reward.u.scales.y.max > 1000")

        # smoothing: TensorBoard's debiased EMA over the raw values, which stay plotted
        js("const s = document.getElementById('smooth'); s.value = 0.6; s.dispatchEvent(new Event('input'))")
        chrome.wait_for("window.__onpolicy.chartData('reward').series.some(s => s.smoothed)")
        data = chart(chrome, "reward")
        raw = series(data, 0, "reward_mean")
        assert raw == {s: on[s]["reward_mean"] for s in range(1, 61)}
        last, want = 0.0, {}
        for n, s in enumerate(range(1, 61), 1):
            last = last * 0.6 + 0.4 * on[s]["reward_mean"]
            want[s] = last / (1 - 0.6 ** n)
        got = series(data, 0, "reward_mean", smoothed=True)
        assert all(abs(got[s] - want[s]) < 1e-12 for s in want)
        csv = js("return window.__onpolicy.exportChart('reward', 'csv')").splitlines()
        assert csv[0].split(",")[:3] == ["step", "on/reward_mean", "on/reward_mean (EMA 0.6)"]
        js("const s = document.getElementById('smooth'); s.value = 0; s.dispatchEvent(new Event('input'))")
        chrome.wait_for("!window.__onpolicy.chartData('reward').series.some(s => s.smoothed)")

        # export: what the chart shows, values exact
        d.find_element(By.CSS_SELECTOR, "#chart-absmax [data-export=csv]").click()
        exp = chrome.wait_for("window.__onpolicy.lastExport")
        assert exp["name"] == "absmax.csv" and exp["kind"] == "csv"
        rows = [r.split(",") for r in exp["text"].splitlines()]
        assert rows[0] == ["step", "on/logp_abs_diff_max", "trl/logp_abs_diff_max"]
        assert [int(r[0]) for r in rows[1:]] == list(range(1, 61))
        assert [float(r[2]) for r in rows[1:]] == [trl[s]["logp_abs_diff_max"] for s in range(1, 61)]
        d.find_element(By.CSS_SELECTOR, "#chart-absmax [data-export=json]").click()
        exp = chrome.wait_for("window.__onpolicy.lastExport.kind === 'json' && window.__onpolicy.lastExport")
        j = json.loads(exp["text"])
        assert j["x_axis"] == "step" and j["x"] == list(range(1, 61))
        assert [s["run"] for s in j["series"]] == ["on", "trl"] and j["series"][0]["values"] == [0.0] * 60
        js("window.__onpolicy.state.charts.absmax.u.setScale('x', {min: 10, max: 19})")        # zoomed: just that
        assert [int(r.split(",")[0]) for r in js("return window.__onpolicy.exportChart('absmax')").splitlines()[1:]] == \
            list(range(10, 20))
        js("window.__onpolicy.state.charts.absmax.u.setScale('x', {min: 1, max: 60})")

        # x axis: wall time, relative time
        sel = d.find_element(By.ID, "xmode")
        js("arguments[0].value = 'wall'; arguments[0].dispatchEvent(new Event('change'))", sel)
        chrome.wait_for("window.__onpolicy.state.charts.reward.u.scales.x.time === true")
        data = chart(chrome, "reward")
        own = lambda run: {x: v for x, v in series(data, run, "reward_mean").items() if v is not None}  # noqa: E731
        assert own(0) == {on[s]["time"]: on[s]["reward_mean"] for s in range(1, 61)}
        assert own(1) == {1_764_244_800.0 + 12.0 * s: trl[s]["reward_mean"] for s in range(1, 61)}
        js("arguments[0].value = 'rel'; arguments[0].dispatchEvent(new Event('change'))", sel)
        chrome.wait_for("window.__onpolicy.chartData('reward').x[0] === 0")
        data = chart(chrome, "reward")
        assert own(2) == {float(s - 1): (1000.0 if s == 30 else 0.5 + 0.001 * s) for s in range(1, 61)}
        # a click on the chart still opens the step under it (time -> step)
        d.find_element(By.CSS_SELECTOR, "#chart-absmax .u-over").click()
        js("arguments[0].value = 'step'; arguments[0].dispatchEvent(new Event('change'))", sel)
        chrome.wait_for("window.__onpolicy.chartData('reward').x[0] === 1")
        assert chrome.console_errors() == []
