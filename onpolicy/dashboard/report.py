"""`onpolicy report`: the dashboard as one self-contained HTML file, and a PNG.

The HTML is the live page with its stylesheets, uPlot and app.js inlined and
the runs' data embedded (``window.__ONPOLICY_STATIC__``): it opens from disk,
offline, with the same charts, alerts and drill-down (for a bounded set of
steps: the first, the last and the worst, at most ``MAX_TOKEN_STEPS`` per run).

The PNG is drawn with matplotlib (object API and the Agg canvas: no pyplot,
no global backend switch), for pasting into an issue or a chat.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

from .app import STATIC_DIR, dumps, state
from .data import Run

MAX_TOKEN_STEPS = 24
PALETTE = ["#2563eb", "#0d9488", "#7c3aed", "#d97706", "#0891b2", "#c026d3", "#4d7c0f", "#475467"]
RED, GREEN = "#dc2626", "#059669"
SPARSE = 0.2


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
    # safe inside <script>: no "</script>", no "<!--"
    return dumps(obj).decode().replace("</", "<\\/").replace("<!--", "<\\!--")


def render_html(runs: list[Run], generated: str | None = None) -> str:
    generated = generated or _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    st = state(runs)
    tokens: dict[int, dict] = {}
    for i, r in enumerate(runs):
        picked = _pick_token_steps(r)
        files = {s: f for s in picked if (f := r.token_file(s)) is not None}
        tokens[i] = files
        st["runs"][i]["token_steps"] = len(files)
    payload = {"generated": generated, "state": st, "data": {i: r.columns(0) for i, r in enumerate(runs)},
               "tokens": tokens}
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
    html = html.replace("<title>onpolicy · sampler/trainer mismatch</title>",
                        f"<title>onpolicy report · {', '.join(r.name for r in runs)}</title>")
    return html


def write_html(runs: list[Run], output: Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_html(runs), encoding="utf-8")
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


def write_png(runs: list[Run], output: Path, dpi: int = 110) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    from .metrics import step_mismatch

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(15, 9.2), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    fig.text(0.012, 0.975, "onpolicy · sampler ↔ trainer mismatch", fontsize=15, fontweight="bold", va="top")
    y = 0.945
    for i, r in enumerate(runs):
        s = r.summary()
        color = {"mismatch": RED, "equal": GREEN}.get(s.status, "#475467")
        if s.status == "mismatch":
            w = s.worst.get("logp_abs_diff_max")
            msg = (f"MISMATCH  {r.name}: {s.mismatch_steps} of {s.steps} steps differ (first at step "
                   f"{s.first_mismatch_step})" + (f"; max |Δlogp| {w['value']:.3g} at step {w['step']}" if w else ""))
        elif s.status == "equal":
            msg = f"BITWISE EQUAL  {r.name}: sampler and trainer logprobs equal at all {s.steps} steps (KL = 0)"
        elif s.status == "unknown":
            msg = f"NOT MEASURED  {r.name}: {s.steps} steps, no mismatch metric logged"
        else:
            msg = f"EMPTY  {r.name}: {r.message}"
        fig.text(0.012, y, "■", color=PALETTE[i % len(PALETTE)], fontsize=11, va="top")
        fig.text(0.03, y, msg, color=color, fontsize=10.5, va="top", fontweight="bold")
        y -= 0.026
    top = y - 0.03
    axes = fig.subplots(2, 3, gridspec_kw={"left": 0.05, "right": 0.985, "bottom": 0.06, "top": top,
                                           "hspace": 0.38, "wspace": 0.2})
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
            color = PALETTE[i % len(PALETTE)]
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
            ax.text(0.0, -0.2, "not logged by " + ", ".join(missing), transform=ax.transAxes, fontsize=8,
                    color="#98a2b3", va="top")
        if not plotted:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="#98a2b3")
        ax.set_xlabel("step", fontsize=8.5, color="#667085")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper right", bbox_to_anchor=(0.985, 0.985), frameon=False, fontsize=10,
                   ncol=min(3, len(labels)))
    fig.savefig(output, format="png", facecolor="white")
    return output
