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


def series(data, run, key, marker=False):
    got = [s for s in data["series"] if s["run"] == run and s["key"] == key and s["marker"] == marker]
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
    """The picture in the README: onpolicy on vs off (the recipe's control run)
    vs a plain TRL run, with the drill-down of a mismatched step open."""
    monkeypatch.chdir(tmp_path)                       # relative paths: the picture does not show tmp dirs
    write_onpolicy_run(Path("runs/qwen3-grpo-onpolicy"), steps=300, seed=0, token_every=10)
    write_onpolicy_run(Path("runs/qwen3-grpo-control"), steps=300, seed=3, mismatch=True, token_every=10)
    write_trl_tensorboard_run(Path("runs/qwen3-grpo-trl"), steps=300, seed=1)
    runs = resolve_runs([Path("runs/qwen3-grpo-onpolicy"), Path("runs/qwen3-grpo-control"),
                         Path("runs/qwen3-grpo-trl")])
    d = chrome.driver
    d.set_window_size(1440, 1000)
    with ServerThread(create_app(runs)) as srv:
        load(chrome, srv.url)
        from selenium.webdriver.common.by import By

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

    trl = write_trl_tensorboard_run(tmp_path / "trl", steps=50, seed=4)
    write_onpolicy_run(tmp_path / "off", steps=50, seed=5, mismatch=True, token_every=10)
    out = write_html(resolve_runs([tmp_path / "off", tmp_path / "trl"]), tmp_path / "report.html")
    d = chrome.driver
    load(chrome, out.as_uri())
    assert "static report" in d.find_element(By.ID, "live-text").text
    assert "mismatch in 2 of 2 runs" in d.find_element(By.ID, "mismatch-alert").text
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
