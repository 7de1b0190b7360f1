"""`onpolicy report`: the dashboard as one self-contained HTML file, and a PNG.

The HTML is the live page with its stylesheets, uPlot and app.js inlined and
the runs' data embedded (``window.__ONPOLICY_STATIC__``): it opens from disk,
offline, with the same charts, alerts and drill-down (for a bounded set of
steps: the first, the last and the worst, at most ``MAX_TOKEN_STEPS`` per run).

The PNG is drawn with matplotlib (object API and the Agg canvas: no pyplot,
no global backend switch), for pasting into an issue or a chat.
"""
from __future__ import annotations

import colorsys
import datetime as _dt
import html as _html
import math
from pathlib import Path

from .app import STATIC_DIR, dumps, state
from .data import Run

MAX_TOKEN_STEPS = 24
# Run colours: the same list as static/app.js (a test checks), then hues spread by the
# golden angle, so no two runs share a colour however many there are.
PALETTE = ["#2563eb", "#0d9488", "#7c3aed", "#d97706", "#0891b2", "#c026d3", "#4d7c0f", "#475467",
           "#db2777", "#1e3a8a", "#ea580c", "#854d0e"]
RED, GREEN, AMBER = "#dc2626", "#059669", "#92400e"
SPARSE = 0.2


def run_color(i: int) -> str:
    if i < len(PALETTE):
        return PALETTE[i]
    j = i - len(PALETTE)
    h = (j * 137.508 + 20) % 360 / 360
    light = (38, 50, 30)[j % 3] / 100
    r, g, b = colorsys.hls_to_rgb(h, light, 0.7)
    return "#%02x%02x%02x" % (round(r * 255), round(g * 255), round(b * 255))


def _pick_token_steps(run: Run, limit: int = MAX_TOKEN_STEPS) -> list[int]:
    steps = run.token_steps()
    if len(steps) <= limit:
        return steps
    col = {s: run.table.rows.get(s, {}).get("logp_abs_diff_max") for s in steps}
    worst = sorted((s for s in steps if col[s] is not None), key=lambda s: -col[s])[: limit // 3]
    chosen = {steps[0], steps[-1], *worst}
    # fill up with steps spread evenly over the run (coarse grid first, then finer)
    n = len(steps)
    k = 2
    while len(chosen) < limit:
        for j in range(1, k, 2):
            chosen.add(steps[j * (n - 1) // k])
            if len(chosen) == limit:
                break
        k *= 2
    return sorted(chosen)


def _script_json(obj) -> str:
    # safe inside <script>: no "<" or ">" at all (JSON escapes in its strings, where alone they occur)
    return dumps(obj).decode().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(runs: list[Run], generated: str | None = None) -> str:
    generated = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    st = state(runs, "report")
    tokens: dict[int, dict] = {}
    for i, r in enumerate(runs):
        picked = _pick_token_steps(r)
        files = {s: f for s in picked if (f := r.token_file(s)) is not None}
        tokens[i] = files
        st["runs"][i]["token_steps"] = len(files)
    data = {}
    for i, r in enumerate(runs):
        d = r.columns(0)
        d["version"] = f"report-{d['version']}"
        data[i] = d
    payload = {"generated": generated, "state": st, "data": data, "tokens": tokens}
    html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    def inline_css(name: str) -> None:
        nonlocal html
        tag = f'<link rel="stylesheet" href="static/{name}">'
        assert tag in html, tag
        html = html.replace(tag, "<style>\n" + (STATIC_DIR / name).read_text(encoding="utf-8") + "\n</style>")

    def inline_js(name: str, before: str = "") -> None:
        nonlocal html
        tag = f'<script src="static/{name}"></script>'
        assert tag in html, tag
        js = (STATIC_DIR / name).read_text(encoding="utf-8").replace("</script", "<\\/script")
        html = html.replace(tag, before + "<script>\n" + js + "\n</script>")

    inline_css("vendor/uPlot.min.css")
    inline_css("style.css")
    inline_js("vendor/uPlot.iife.min.js")
    inline_js("app.js", before="<script>window.__ONPOLICY_STATIC__ = " + _script_json(payload) + ";</script>\n")
    title = _html.escape(f"onpolicy report · {', '.join(r.name for r in runs)}")   # run names are data
    html = html.replace("<title>onpolicy · sampler/trainer mismatch</title>", f"<title>{title}</title>")
    return html


def write_html(runs: list[Run], output: Path, force: bool = True) -> Path:
    """Write the report; with ``force=False`` an existing file is an error
    (FileExistsError), never overwritten."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(runs)
    with open(output, "w" if force else "x", encoding="utf-8") as fh:
        fh.write(text)
    return output


# --- PNG ---------------------------------------------------------------------------

PANELS = [
    ("Tokens bitwise equal", ["bitwise_equal_frac"], "pct"),
    ("Max |Δlogp|", ["logp_abs_diff_max"], None),
    ("Mean |Δlogp|", ["logp_abs_diff_mean"], None),
    ("KL(sampler ‖ trainer), k3", ["kl_k3"], None),
    ("Importance ratio min / max", ["is_ratio_min", "is_ratio_max"], None),
    ("Reward", ["reward_mean"], None),
]


def _series(run: Run, key: str):
    xs, ys = [], []
    for s in run.table.steps:
        row = run.table.rows[s]
        v = row.get(key)
        if v is None or not math.isfinite(v):
            continue
        xs.append(s)
        ys.append(v)
    return xs, ys


MAX_NOTE_LINES = 8


def summary_lines(runs: list[Run]) -> list[tuple[str, str]]:
    """(text, colour) of the PNG's header: one banner per run, then the runs'
    notes and warnings (a partly written last line, unreadable files, NaN...)."""
    from .metrics import fmt_value

    lines = []
    for r in runs:
        s = r.summary()
        if s.status == "mismatch":
            w = s.worst.get("logp_abs_diff_max")
            msg = (f"MISMATCH  {r.name}: {s.mismatch_steps} of {s.steps} steps differ (first at step "
                   f"{s.first_mismatch_step})" +
                   (f"; max |Δlogp| {fmt_value(w['value'])} at step {w['step']}" if w else ""))
            lines.append((msg, RED))
        elif s.status == "equal":
            lines.append((f"BITWISE EQUAL  {r.name}: sampler and trainer logprobs equal at all {s.steps} steps "
                          "(KL = 0)", GREEN))
        elif s.status == "unknown":
            lines.append((f"NOT MEASURED  {r.name}: {s.steps} steps, no mismatch metric logged", "#475467"))
        else:
            lines.append((f"EMPTY  {r.name}: {r.message}", "#475467"))
    notes = [f"⚠ {r.name}: {n}" for r in runs for n in r.notes + r.warnings]
    if len(notes) > MAX_NOTE_LINES:
        notes = notes[:MAX_NOTE_LINES - 1] + [f"⚠ ... and {len(notes) - MAX_NOTE_LINES + 1} more warnings "
                                             "(see the HTML report or the terminal)"]
    lines += [(n if len(n) <= 190 else n[:187] + "...", AMBER) for n in notes]
    return lines


def build_figure(runs: list[Run], dpi: int = 110):
    """The PNG's matplotlib Figure (object API on an Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    from .metrics import step_mismatch

    lines = summary_lines(runs)
    line_in = 0.29                                # inches per header line
    legend_rows = -(-len(runs) // 6)
    head_in = 0.62 + line_in * len(lines) + 0.3 * legend_rows + 0.15
    grid_in = 8.0
    height = head_in + grid_in
    fig = Figure(figsize=(15, height), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    fy = lambda inches: 1 - inches / height      # noqa: E731 - from the top, in figure fraction
    fig.text(0.012, fy(0.2), "onpolicy · sampler ↔ trainer mismatch", fontsize=15, fontweight="bold", va="top")
    y = 0.62
    nruns = len(runs)
    for k, (msg, color) in enumerate(lines):
        if k < nruns:
            fig.text(0.012, fy(y), "■", color=run_color(k), fontsize=11, va="top")
        fig.text(0.03, fy(y), msg, color=color, fontsize=10.5 if k < nruns else 9.5, va="top",
                 fontweight="bold" if k < nruns else "normal")
        y += line_in
    axes = fig.subplots(2, 3, gridspec_kw={"left": 0.05, "right": 0.985, "bottom": 0.6 / height,
                                           "top": fy(head_in + 0.3), "hspace": 0.42, "wspace": 0.2})
    for ax, (title, keys, kind) in zip(axes.flat, PANELS):
        ax.set_title(title, loc="left", fontsize=11, fontweight="bold")
        ax.grid(True, color="#eef0f3", linewidth=0.8)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_color("#d0d5dd")
        ax.tick_params(colors="#475467", labelsize=8.5)
        plotted = False
        for i, r in enumerate(runs):
            color = run_color(i)
            for k in keys:
                xs, ys = _series(r, k)
                if not xs:
                    continue
                plotted = True
                dashed = len(keys) > 1
                ax.plot(xs, ys, color=color, linewidth=0.9 if dashed else 1.3, linestyle="-",
                        label=r.name if k == keys[-1] else None, alpha=0.9)
                rows = r.table.rows
                bad = [(x, v) for x, v in zip(xs, ys) if step_mismatch(rows[x])]
                if bad and len(bad) <= SPARSE * len(r.table.steps):
                    ax.scatter([b[0] for b in bad], [b[1] for b in bad], s=9, color=RED, zorder=3, linewidths=0)
            if len(keys) == 2:
                lo, hi = _series(r, keys[0]), _series(r, keys[1])
                if lo[0] and lo[0] == hi[0]:
                    ax.fill_between(lo[0], lo[1], hi[1], color=color, alpha=0.12, linewidth=0)
        if kind == "pct":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
        missing = [r.name for r in runs if r.table.steps and not any(_series(r, k)[0] for k in keys)]
        if missing and plotted:
            # beside the title (never under the axes, where it ran into the next row's titles)
            cap = "not logged by " + ", ".join(missing)
            ax.set_title(cap if len(cap) <= 48 else cap[:45] + "...", loc="right", fontsize=8, color="#98a2b3")
        if not plotted:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="#98a2b3")
        ax.set_xlabel("step", fontsize=8.5, color="#667085")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:   # under the header lines, above the charts: it never covers a line
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.02, fy(y - 0.02)), frameon=False, fontsize=10,
                   ncol=min(6, len(labels)), handlelength=1.6, columnspacing=1.6)
    return fig


def write_png(runs: list[Run], output: Path, dpi: int = 110, force: bool = True) -> Path:
    """Write the PNG; with ``force=False`` an existing file is an error
    (FileExistsError), never overwritten."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig = build_figure(runs, dpi)
    with open(output, "wb" if force else "xb") as fh:
        fig.savefig(fh, format="png", facecolor="white")
    return output
