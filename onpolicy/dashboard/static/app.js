/* onpolicy dashboard: per-step sampler/trainer mismatch of one or more runs.
 *
 * Live mode polls /api/state (ETag, 304 when nothing changed) and fetches only
 * the rows changed since the table version it holds (/api/run/<id>/data?since=v).
 * Static mode (a report) reads the same structures from window.__ONPOLICY_STATIC__.
 * Everything is local: uPlot is vendored, no request leaves the page's origin.
 *
 * Chart controls (toolbar): x axis by step / wall time / relative time, EMA
 * smoothing (TensorBoard's debiased EMA; the raw values stay drawn, faint),
 * "ignore outliers" (y range from the 5th-95th percentiles); per chart: lin/log
 * (asinh) y axis and CSV / JSON export of what it shows. Every scalar a run logs
 * has a chart (the main charts, then "All scalars", filterable).
 */
(function () {
  'use strict';

  const STATIC = window.__ONPOLICY_STATIC__ || null;
  const POLL_MS = 2000;
  // run colours: the same list as report.py's PALETTE (a test checks), then hues spread
  // by the golden angle, so no two runs share a colour however many there are
  const PALETTE = ['#2563eb', '#0d9488', '#7c3aed', '#d97706', '#0891b2', '#c026d3', '#4d7c0f', '#475467',
    '#db2777', '#1e3a8a', '#ea580c', '#854d0e'];
  const MAX_MORE = 24;     // "All scalars" charts drawn at once (the filter narrows the rest)
  const RED = '#dc2626';
  const SPARSE = 0.2;   // mark mismatched steps with dots when at most this fraction of steps mismatch

  const CHARTS = [
    { id: 'bitwise', title: 'Tokens bitwise equal', keys: ['bitwise_equal_frac'], pct: true,
      sub: 'tokens whose sampler and trainer logp are bitwise equal' },
    { id: 'absmax', title: 'Max |Δlogp|', keys: ['logp_abs_diff_max'], log: true,
      sub: 'largest |logp_sampler − logp_trainer| in the step' },
    { id: 'absmean', title: 'Mean |Δlogp|', keys: ['logp_abs_diff_mean'], log: true,
      sub: 'mean |logp_sampler − logp_trainer| over the step\u2019s tokens' },
    { id: 'k3', title: 'KL(sampler ‖ trainer), k3', keys: ['kl_k3'], log: true,
      sub: 'mean(r − 1 − log r), r = p_trainer / p_sampler' },
    { id: 'k1', title: 'KL(sampler ‖ trainer), k1', keys: ['kl_k1'], log: true,
      sub: 'mean(log p_sampler − log p_trainer)' },
    { id: 'ratio', title: 'Importance ratio range', keys: ['is_ratio_min', 'is_ratio_mean', 'is_ratio_max'],
      marker: 'is_ratio_max', band: true, sub: 'min · mean · max of r = p_trainer / p_sampler over tokens' },
    { id: 'reward', title: 'Reward', keys: ['reward_mean'], sub: 'mean reward of the step\u2019s completions' },
  ];
  const SHOWN = new Set(CHARTS.flatMap(c => c.keys).concat(['time']));

  const S = {
    runs: [], tables: {}, hidden: new Set(), charts: {}, zoom: null, etag: null, paused: false,
    schema: {}, lastOk: null, error: null, drill: null, tokCache: {}, opened: false,
    xmode: 'step', smooth: 0, robust: false, filter: '', more: {},
  };
  const API = { state: S, chartData, exportChart, tickLabels, runColor: id => runColor({ id }), ready: false, openMs: null, refreshes: 0 };
  window.__onpolicy = API;

  // ---------------------------------------------------------------- utils
  const $ = (sel, el = document) => el.querySelector(sel);
  const el = (tag, attrs = {}, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v == null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'style') e.style.cssText = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'html') e.innerHTML = v;
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const k of kids.flat()) if (k != null && k !== false) e.append(k.nodeType ? k : String(k));
    return e;
  };
  const esc = s => String(s).replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  function fmt(v, digits = 4) {
    if (typeof v === 'string') return v;     // "NaN", "inf", "-inf" as the server sends them
    if (v == null || Number.isNaN(v)) return '—';
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a < 1e-3 || a >= 1e6) return v.toExponential(2).replace('e-', 'e\u2212');
    return String(+v.toPrecision(digits));
  }
  const pct = v => typeof v === 'string' ? v : v == null ? '—' : v === 1 ? '100%' : v === 0 ? '0%' : (v * 100).toFixed(v > 0.999 ? 3 : 2) + '%';
  const int = v => v == null ? '—' : Math.round(v).toLocaleString('en-US');
  const lowerBound = (a, x) => { let lo = 0, hi = a.length; while (lo < hi) { const m = (lo + hi) >> 1; if (a[m] < x) lo = m + 1; else hi = m; } return lo; };
  function hslHex(h, s, l) {
    const a = s * Math.min(l, 1 - l);
    const f = n => { const k = (n + h / 30) % 12; return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1)))); };
    return '#' + [f(0), f(8), f(4)].map(x => x.toString(16).padStart(2, '0')).join('');
  }
  function runColor(r) {
    if (r.id < PALETTE.length) return PALETTE[r.id];
    const j = r.id - PALETTE.length;
    return hslHex((j * 137.508 + 20) % 360, 0.7, [0.38, 0.5, 0.3][j % 3]);
  }
  const bad = v => typeof v === 'string' || v > 0;     // a mismatch metric that is not 0 (NaN / inf included)
  const dur = s => s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : s < 172800 ? `${(s / 3600).toFixed(1)} h` : `${(s / 86400).toFixed(1)} days`;
  function runStateText(r) {
    const idle = r.last_write != null ? Math.max(0, Date.now() / 1000 - r.last_write) : null;
    if (r.state === 'finished') return 'finished';
    if (r.state === 'running') return `running · last write ${idle == null ? '?' : dur(idle)} ago`;
    if (r.state === 'stopped') return `stopped · no write for ${idle == null ? '?' : dur(idle)}`;
    return 'waiting for its files';
  }
  const visibleRuns = () => S.runs.filter(r => !S.hidden.has(r.id));
  const ago = t => { const s = Math.max(0, Math.round((Date.now() - t) / 1000)); return s < 60 ? `${s}s ago` : `${Math.round(s / 60)} min ago`; };

  // ---------------------------------------------------------------- data
  async function getJSON(url, etag) {
    const headers = etag ? { 'If-None-Match': etag } : {};
    const res = await fetch(url, { cache: 'no-store', headers });
    if (res.status === 304) return { notModified: true, etag };
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return { body: await res.json(), etag: res.headers.get('ETag') };
  }

  function mergeTable(id, d) {
    let t = S.tables[id];
    if (!t || d.from_step == null) t = S.tables[id] = { version: 0, steps: [], cols: {}, mismatch: [], fm: {} };
    const keep = d.from_step == null ? 0 : lowerBound(t.steps, d.from_step);
    const n = d.steps.length;
    t.steps = t.steps.slice(0, keep).concat(d.steps);
    const keys = new Set([...Object.keys(t.cols), ...Object.keys(d.cols)]);
    for (const k of keys) {
      let a = (t.cols[k] || []).slice(0, keep);
      while (a.length < keep) a.push(null);
      t.cols[k] = a.concat(d.cols[k] || new Array(n).fill(null));
    }
    t.mismatch = t.mismatch.slice(0, keep).concat(d.mismatch);
    for (const s of Object.keys(t.fm)) if (+s >= (d.from_step ?? -Infinity)) delete t.fm[s];
    Object.assign(t.fm, d.first_mismatch || {});
    t.version = d.version;
  }

  async function poll() {
    if (STATIC) return;
    try {
      const t0 = performance.now();
      const st = await getJSON('api/state', S.etag);
      if (!API.timings) API.timings = { state: performance.now() - t0 };
      if (!st.notModified) {
        S.etag = st.etag;
        const body = st.body;
        S.schema = body.metrics;
        const jobs = [];
        for (const r of body.runs) {
          const t = S.tables[r.id];
          if (!t || t.version !== r.version) {
            jobs.push(getJSON(`api/run/${r.id}/data?since=${t ? t.version : 0}`).then(x => { if (!x.notModified) mergeTable(r.id, x.body); }));
          }
        }
        const t1 = performance.now();
        await Promise.all(jobs);
        if (API.timings.data == null) API.timings.data = performance.now() - t1;
        S.runs = body.runs;
        API.refreshes++;
        const t2 = performance.now();
        render();
        if (API.timings.render == null) API.timings.render = performance.now() - t2;
      }
      S.lastOk = Date.now(); S.error = null;
    } catch (e) {
      S.error = String(e.message || e);
    }
    renderLive();
  }

  function loadStatic() {
    S.schema = STATIC.state.metrics;
    S.runs = STATIC.state.runs;
    for (const r of S.runs) mergeTable(r.id, STATIC.data[r.id]);
    S.lastOk = Date.now();
    render();
    renderLive();
  }

  // ---------------------------------------------------------------- header / alerts / cards
  function renderLive() {
    const live = $('#live'), txt = $('#live-text');
    if (STATIC) {
      live.className = 'live'; txt.textContent = `static report · ${STATIC.generated}`;
      $('#pause').hidden = true; return;
    }
    // the page's connection; each run's own state (running / stopped / finished) is on its card
    const counts = {};
    for (const r of S.runs) counts[r.state] = (counts[r.state] || 0) + 1;
    const runsTxt = ['running', 'stopped', 'finished', 'waiting'].filter(k => counts[k]).map(k => `${counts[k]} ${k}`).join(', ');
    live.className = 'live ' + (S.error ? 'err' : S.paused ? '' : counts.running ? 'on' : 'idle');
    txt.textContent = S.error ? `server unreachable (${S.error}); retrying` :
      S.paused ? 'paused' : `connected · polled ${S.lastOk ? ago(S.lastOk) : '…'}` + (runsTxt ? ` · runs: ${runsTxt}` : '');
  }

  function mismatchLine(r) {
    const s = r.summary, w = s.worst || {};
    const parts = [`<b>${int(s.mismatch_steps)}</b> of ${int(s.steps)} steps differ (first at step ${s.first_mismatch_step})`];
    if (w.logp_abs_diff_max) parts.push(`max |Δlogp| <b>${fmt(w.logp_abs_diff_max.value)}</b> at step ${w.logp_abs_diff_max.step}`);
    if (w.kl_k3) parts.push(`k3 KL up to ${fmt(w.kl_k3.value)}`);
    if (w.bitwise_equal_frac) parts.push(`as few as ${pct(w.bitwise_equal_frac.value)} of tokens bitwise equal`);
    return `<b class="rn">${esc(r.name)}</b>: ` + parts.join(' · ');
  }

  function renderAlerts() {
    const box = $('#alerts');
    box.innerHTML = '';
    const bad = S.runs.filter(r => r.summary.status === 'mismatch');
    const good = S.runs.filter(r => r.summary.status === 'equal');
    const unknown = S.runs.filter(r => r.summary.status === 'unknown');
    if (bad.length) {
      box.append(el('div', { class: 'alert alert-red', id: 'mismatch-alert', role: 'alert' },
        el('div', { class: 'icon' }, '⚠'),
        el('div', {}, el('h3', {}, `Sampler/trainer mismatch in ${bad.length} of ${S.runs.length} run${S.runs.length > 1 ? 's' : ''}`),
          el('ul', { html: bad.map(r => `<li>${mismatchLine(r)}</li>`).join('') }))));
    }
    if (good.length) {
      box.append(el('div', { class: 'alert alert-green', id: 'equal-alert' },
        el('div', { class: 'icon' }, '✓'),
        el('div', {}, el('h3', {}, 'Bitwise on-policy'),
          el('ul', { html: good.map(r => `<li><b class="rn">${esc(r.name)}</b>: sampler and trainer logprobs bitwise equal at every one of ${int(r.summary.steps)} steps (KL exactly 0)</li>`).join('') }))));
    }
    if (unknown.length) {
      box.append(el('div', { class: 'alert alert-grey' },
        el('div', { class: 'icon' }, '?'),
        el('div', {}, el('h3', {}, 'No mismatch metric logged'),
          el('ul', { html: unknown.map(r => `<li><b class="rn">${esc(r.name)}</b>: no sampler/trainer comparison in its ${int(r.summary.steps)} steps (TRL logs <code>sampling/*</code> only when it generates with vLLM and <code>vllm_importance_sampling_correction</code> is on)</li>`).join('') }))));
    }
    const ws = S.runs.flatMap(r => [...r.notes.map(n => [r, n]), ...r.warnings.map(w => [r, w])]);
    const wbox = $('#warnings');
    wbox.hidden = !ws.length;
    if (ws.length) {
      wbox.innerHTML = '';
      wbox.append(el('details', { open: ws.length <= 4 || null },
        el('summary', {}, `⚠ ${ws.length} warning${ws.length > 1 ? 's' : ''} while reading the runs`),
        el('ul', {}, ws.map(([r, w]) => el('li', {}, `${r.name}: ${w}`)))));
    }
    const empty = $('#empty');
    const withData = S.runs.filter(r => r.summary.steps > 0);
    empty.hidden = withData.length > 0;
    if (!withData.length) {
      empty.innerHTML = '';
      empty.append(el('h2', {}, S.runs.length ? 'Nothing to plot yet' : 'No runs given'),
        ...S.runs.map(r => el('p', {}, r.message || `${r.name}: no steps yet`)),
        el('p', {}, STATIC ? '' : 'The page refreshes by itself when the runs write their first steps.'));
    }
    $('#timeline-card').hidden = !withData.length;
    $('#charts').hidden = !withData.length;
    $('#toolbar').hidden = !withData.length;
  }

  function stat(k, v, cls) { return el('div', { class: 'stat' }, el('div', { class: 'k' }, k), el('div', { class: 'v ' + (cls || '') }, v)); }

  function renderRuns() {
    const box = $('#runs');
    box.innerHTML = '';
    for (const r of S.runs) {
      const s = r.summary, w = s.worst || {}, last = s.last || {};
      const badges = [];
      if (r.onpolicy === true) badges.push(el('span', { class: 'badge b-on' }, 'onpolicy on'));
      else if (r.onpolicy === false) badges.push(el('span', { class: 'badge b-off' }, 'onpolicy off'));
      for (const src of r.sources) if (!src.startsWith('metrics.jsonl')) badges.push(el('span', { class: 'badge b-src' }, src.startsWith('TensorBoard') ? 'TensorBoard' : 'trackio'));
      const card = el('div', { class: 'run' + (S.hidden.has(r.id) ? ' off' : ''), 'data-run': r.id, title: 'click to show / hide this run',
        onclick: () => { S.hidden.has(r.id) ? S.hidden.delete(r.id) : S.hidden.add(r.id); render(); } },
        el('div', { class: 'stripe', style: `background:${runColor(r)}` }),
        el('div', { class: 'name' }, r.name, ...badges),
        el('div', { class: 'path' }, r.path),
        el('div', { class: 'state st-' + r.state, title: r.state === 'stopped' ? `no write to its files for over ${dur(r.stale_s)}` : r.state === 'finished' ? 'the trainer wrote its end record' : '' },
          STATIC ? `${r.state} when the report was written` : runStateText(r)));
      if (!s.steps) {
        card.append(el('div', { class: 'msg' }, r.message || 'no steps yet'));
      } else {
        const mm = s.status === 'mismatch';
        card.append(el('div', { class: 'stats' },
          stat('steps', int(s.steps)),
          stat('mismatched', s.status === 'unknown' ? 'n/a' : `${int(s.mismatch_steps)}`, mm ? 'red' : s.status === 'equal' ? 'green' : ''),
          stat('min bitwise =', w.bitwise_equal_frac ? pct(w.bitwise_equal_frac.value) : '—', w.bitwise_equal_frac ? (w.bitwise_equal_frac.value !== 1 ? 'red' : 'green') : ''),
          stat('max |Δlogp|', w.logp_abs_diff_max ? fmt(w.logp_abs_diff_max.value) : '—', w.logp_abs_diff_max ? (bad(w.logp_abs_diff_max.value) ? 'red' : 'green') : ''),
          stat('max k3 KL', w.kl_k3 ? fmt(w.kl_k3.value) : '—', w.kl_k3 ? (w.kl_k3.value !== 0 ? 'red' : 'green') : ''),
          stat('reward (last)', last.reward_mean != null ? fmt(last.reward_mean, 3) : '—')));
      }
      box.append(card);
    }
  }

  // ---------------------------------------------------------------- mismatch map
  function xExtent() {
    let lo = Infinity, hi = -Infinity;
    for (const r of visibleRuns()) {
      const t = S.tables[r.id];
      if (t && t.steps.length) { lo = Math.min(lo, t.steps[0]); hi = Math.max(hi, t.steps[t.steps.length - 1]); }
    }
    return lo <= hi ? [lo, hi] : null;
  }

  function renderTimeline() {
    const box = $('#timeline');
    box.innerHTML = '';
    const ext = xExtent();
    if (!ext) return;
    for (const r of visibleRuns()) {
      const t = S.tables[r.id];
      if (!t || !t.steps.length) continue;
      const cv = el('canvas', { 'data-run': r.id });
      const s = r.summary;
      box.append(el('div', { class: 'tl-name' }, el('span', { class: 'dotc', style: `background:${runColor(r)}` }), r.name), cv,
        el('div', { class: 'tl-count', html: s.status === 'unknown' ? 'not measured' : s.mismatch_steps ? `<span style="color:${RED};font-weight:600">${int(s.mismatch_steps)}</span> / ${int(s.steps)} steps differ` : `0 / ${int(s.steps)} steps differ` }));
      requestAnimationFrame(() => drawTimeline(cv, t, ext));
      cv.addEventListener('click', ev => {
        const rect = cv.getBoundingClientRect();
        const step = ext[0] + (ev.clientX - rect.left) / rect.width * (ext[1] - ext[0] + 1);
        openDrill(r.id, Math.floor(step));
      });
    }
  }

  function drawTimeline(cv, t, ext) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, Math.round(cv.clientWidth * dpr)), h = Math.round(18 * dpr);
    cv.width = w; cv.height = h;
    const ctx = cv.getContext('2d');
    const span = ext[1] - ext[0] + 1;
    const bins = new Int8Array(w).fill(-2);   // -2 none, -1 unknown, 0 equal, 1 mismatch
    for (let i = 0; i < t.steps.length; i++) {
      const b = Math.min(w - 1, Math.floor((t.steps[i] - ext[0]) / span * w));
      const m = t.mismatch[i] == null ? -1 : t.mismatch[i];
      if (m > bins[b]) bins[b] = m;
    }
    const minW = Math.max(1, Math.ceil(w / span));  // few steps: draw each as a block
    const colors = { '-1': '#d0d5dd', '0': '#34d399', '1': RED };
    for (let x = 0; x < w; x++) {
      if (bins[x] === -2) continue;
      ctx.fillStyle = colors[bins[x]];
      ctx.fillRect(x, 0, minW > 1 ? minW - (minW > 3 ? 1 : 0) : 1, h);
    }
  }

  // ---------------------------------------------------------------- toolbar: legend and controls
  function renderLegend() {
    const box = $('#legend');
    box.innerHTML = '';
    for (const r of S.runs) {
      box.append(el('button', { class: 'chip' + (S.hidden.has(r.id) ? ' off' : ''), type: 'button', 'data-run': r.id,
        title: `${r.path}\nclick to show / hide`, onclick: () => { S.hidden.has(r.id) ? S.hidden.delete(r.id) : S.hidden.add(r.id); render(); } },
        el('span', { class: 'sw', style: `background:${runColor(r)}` }), r.name, el('span', { class: 'st st-' + r.state }, r.state)));
    }
  }

  function initToolbar() {
    $('#xmode').onchange = e => { S.xmode = e.target.value; S.zoom = null; renderCharts(); };
    const sm = $('#smooth');
    sm.oninput = () => { S.smooth = +sm.value; $('#smooth-val').textContent = S.smooth.toFixed(2); renderCharts(); };
    $('#robust').onchange = e => { S.robust = e.target.checked; for (const c of Object.values(S.charts)) c.sig = null; renderCharts(); };
    $('#filter').oninput = e => { S.filter = e.target.value; renderCharts(); };
  }

  // ---------------------------------------------------------------- charts
  function otherKeys() {
    const ks = new Set();
    for (const r of visibleRuns()) for (const k of Object.keys((S.tables[r.id] || {}).cols || {})) if (!SHOWN.has(k)) ks.add(k);
    const known = k => S.schema[k] ? 0 : k.startsWith('train/') ? 1 : k.startsWith('eval/') ? 3 : 2;
    return [...ks].sort((a, b) => (known(a) - known(b)) || a.localeCompare(b));
  }

  function filterKeys(keys) {
    const f = S.filter.trim();
    if (!f) return keys;
    let re = null;
    try { re = new RegExp(f, 'i'); } catch (e) { re = null; }
    return keys.filter(k => re ? re.test(k) || re.test(label(k)) : k.toLowerCase().includes(f.toLowerCase()));
  }
  const label = k => (S.schema[k] && S.schema[k].label) || k;

  // x values of a run's rows for the x mode: {x, idx} (idx: the rows kept, in x order), or null
  function xOf(t) {
    if (S.xmode === 'step') return { x: t.steps, idx: null };
    const tc = t.cols.time;
    if (!tc) return null;
    let ix = [];
    for (let i = 0; i < t.steps.length; i++) if (tc[i] != null) ix.push(i);
    if (!ix.length) return null;
    if (ix.some((i, j) => j && tc[i] < tc[ix[j - 1]])) ix.sort((a, b) => tc[a] - tc[b]);
    ix = ix.filter((i, j) => j === ix.length - 1 || tc[ix[j + 1]] !== tc[i]);   // one row per x (the later)
    const t0 = tc[ix[0]];
    return { x: ix.map(i => S.xmode === 'rel' ? tc[i] - t0 : tc[i]), idx: ix };
  }

  // TensorBoard's smoothing: an exponential moving average, debiased at the start
  function ema(vals, w) {
    const out = new Array(vals.length);
    let last = 0, n = 0;
    for (let i = 0; i < vals.length; i++) {
      const v = vals[i];
      if (v == null || !Number.isFinite(v)) { out[i] = v; continue; }
      last = last * w + (1 - w) * v; n++;
      out[i] = last / (1 - Math.pow(w, n));
    }
    return out;
  }

  function chartSeries(spec) {
    // -> {tables, series, bands, missing, stepOf}
    const keys = spec.keys;
    const tables = [], series = [{}], bands = [], missing = [], noTime = [], stepOf = {};
    for (const r of visibleRuns()) {
      const t = S.tables[r.id];
      if (!t || !t.steps.length) continue;
      const present = keys.filter(k => t.cols[k] && t.cols[k].some(v => v != null));
      if (!present.length) { if (r.summary.steps) missing.push(r); continue; }
      const xs = xOf(t);
      if (!xs) { noTime.push(r); continue; }
      const pick = col => xs.idx ? xs.idx.map(i => col[i]) : col;
      if (xs.idx) stepOf[r.id] = new Map(xs.x.map((x, j) => [x, t.steps[xs.idx[j]]]));
      const cols = [xs.x];
      const color = runColor(r);
      const idx = {};
      for (const k of present) {
        const raw = pick(t.cols[k]);
        const side = spec.band && k !== 'is_ratio_mean';
        const lbl = spec.band ? `${r.name} ${k.replace('is_ratio_', '')}` : r.name;
        const base = { _run: r.id, _key: k, spanGaps: false, points: { show: false } };
        if (S.smooth > 0) {
          cols.push(raw);
          series.push({ ...base, label: lbl + ' (raw)', _raw: true, stroke: color + '45', width: 1 });
          cols.push(ema(raw, S.smooth));
          series.push({ ...base, label: lbl, _smoothed: true, stroke: color, width: side ? 1 : 1.7, dash: side ? [4, 3] : undefined });
        } else {
          cols.push(raw);
          series.push({ ...base, label: lbl, stroke: color, width: side ? 1 : 1.7, dash: side ? [4, 3] : undefined });
        }
        idx[k] = series.length - 1;
      }
      if (spec.band && idx.is_ratio_min != null && idx.is_ratio_max != null)
        bands.push({ series: [idx.is_ratio_max, idx.is_ratio_min], fill: color + '1f' });
      const mk = spec.marker || keys[0];
      // red dots mark mismatched steps of runs that are mostly equal (a run that
      // mismatches everywhere is flagged by the banner, its card and the map)
      const nm = t.mismatch.reduce((a, m) => a + (m === 1), 0);
      if (!spec.other && t.cols[mk] && nm && nm <= SPARSE * t.steps.length) {
        const src = pick(t.cols[mk]), mm = pick(t.mismatch);
        cols.push(src.map((v, i) => mm[i] === 1 && v != null ? v : null));
        series.push({ label: `${r.name} mismatch`, _run: r.id, _key: mk, _marker: true, stroke: RED, width: 0,
          paths: () => null, points: { show: true, size: 4.5, width: 0, fill: RED, stroke: RED } });
      }
      tables.push(cols);
    }
    return { tables, series, bands, missing, noTime, keys, stepOf };
  }

  function chartData(id) {
    // for tests: {x, series: [{run, key, marker, smoothed, values}]}
    const c = S.charts[id] || S.charts[(S.more[id] || {}).id];
    if (!c || !c.u) return null;
    return { x: Array.from(c.u.data[0]), series: c.u.series.slice(1).map((s, i) => ({ run: s._run, key: s._key, marker: !!s._marker, smoothed: !!s._smoothed, raw: !!s._raw, label: s.label, values: Array.from(c.u.data[i + 1], v => v === undefined ? null : v) })) };
  }

  // tick labels with as many decimals as the ticks need (2.5 stays 2.5), exponents for tiny/huge
  function tickLabels(splits, incr) {
    const vs = splits.filter(v => v != null && Number.isFinite(v));
    const step = Math.abs(incr) || (vs.length > 1 ? Math.abs(vs[1] - vs[0]) : 1) || 1;
    const big = vs.reduce((a, v) => Math.max(a, Math.abs(v)), 0);
    const tol = step * 1e-6;
    if (big >= 1e6 || (big > 0 && step < 1e-4)) {
      for (let p = 0; p <= 12; p++) {
        if (vs.every(v => Math.abs(+v.toExponential(p) - v) <= tol))
          return splits.map(v => v == null ? '' : v === 0 ? '0' : v.toExponential(p).replace('e-', 'e\u2212').replace('e+', 'e'));
      }
    }
    let d = 0;
    while (d < 12 && !vs.every(v => Math.abs(+v.toFixed(d) - v) <= tol)) d++;
    return splits.map(v => v == null ? '' : Object.is(+v.toFixed(d), -0) ? (0).toFixed(d) : v.toFixed(d));
  }
  const fmtRel = s => { const a = Math.abs(s); const h = Math.floor(a / 3600), m = Math.floor(a % 3600 / 60), sec = Math.round(a % 60);
    return (s < 0 ? '-' : '') + (h ? `${h}h${m ? ` ${m}m` : ''}` : m ? `${m}m${sec ? ` ${sec}s` : ''}` : `${sec}s`); };
  const fmtWall = s => new Date(s * 1000).toLocaleString('en-GB', { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
  const fmtX = x => S.xmode === 'step' ? `step <b>${int(x)}</b>` : S.xmode === 'rel' ? `<b>${fmtRel(x)}</b> after the start` : `<b>${fmtWall(x)}</b>`;
  const INT_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500].concat(...[3, 4, 5, 6, 7, 8].map(e => [1, 2, 2.5, 5].map(f => f * 10 ** e)));
  const SEC_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 172800, 604800];

  function yAxisValues(spec, c) {
    return (u, splits, ai, space, incr) => {
      if (c.log) return splits.map(v => v == null ? '' : spec.pct ? fmt(v * 100, 3) + '%' : fmt(v, 3));
      if (spec.pct) return tickLabels(splits.map(v => v == null ? v : v * 100), incr * 100).map(s => s && s + '%');
      return tickLabels(splits, incr);
    };
  }

  function quantile(sorted, q) {
    const i = (sorted.length - 1) * q, lo = Math.floor(i), hi = Math.ceil(i);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (i - lo);
  }

  // y range: never 0-100 for a flat series; "ignore outliers": the 5th-95th percentile band, padded
  function yRange(spec, c, u, mn, mx) {
    if (mn == null || mx == null || !Number.isFinite(mn) || !Number.isFinite(mx)) return [0, 1];
    if (S.robust) {
      const vals = [];
      const x = u.data[0], x0 = u.scales.x.min, x1 = u.scales.x.max;
      u.series.forEach((s, si) => {
        if (!si || s._marker || s._raw) return;
        const d = u.data[si];
        for (let i = 0; i < d.length; i++) { const v = d[i]; if (v != null && Number.isFinite(v) && (x0 == null || (x[i] >= x0 && x[i] <= x1))) vals.push(v); }
      });
      if (vals.length >= 20) {
        vals.sort((a, b) => a - b);
        const q0 = quantile(vals, 0.05), q1 = quantile(vals, 0.95);
        const pad = (q1 - q0) * 0.25 || Math.abs(q1) * 0.1 || 1;
        mn = Math.max(mn, q0 - pad); mx = Math.min(mx, q1 + pad);
      }
    }
    if (spec.pct && !c.log) return [Math.min(mn, 0.98), 1.0005];
    if (mn === mx) {
      if (mn === 0) return c.log ? [0, 1] : [0, 1];
      const d = Math.abs(mn) * 0.1;
      return [mn - d, mx + d];
    }
    return c.log ? uPlot.rangeAsinh(mn, mx, 10, false) : uPlot.rangeNum(mn, mx, 0.1, true);
  }

  let syncing = false;
  function makeChart(spec, card, cs) {
    const box = $('.plot', card);
    box.innerHTML = '';
    const width = Math.max(300, box.clientWidth || card.clientWidth - 24);
    const c = S.charts[spec.id];
    c.stepOf = cs.stepOf;
    const axis = { stroke: '#667085', grid: { stroke: '#eef0f3', width: 1 }, ticks: { stroke: '#e4e7ec', size: 4 }, font: '11px system-ui, sans-serif' };
    const xAxis = { ...axis, size: 30 };
    if (S.xmode === 'step') { xAxis.incrs = INT_INCRS; xAxis.values = (u, sp, ai, space, incr) => tickLabels(sp, incr); }
    else if (S.xmode === 'rel') { xAxis.incrs = SEC_INCRS; xAxis.values = (u, sp) => sp.map(v => v == null ? '' : fmtRel(v)); xAxis.space = 60; }
    const opts = {
      width, height: 190, legend: { show: false }, series: cs.series, bands: cs.bands,
      cursor: { sync: { key: 'onpolicy', setSeries: false }, drag: { x: true, y: false, setScale: true }, points: { size: 6 } },
      scales: { x: { time: S.xmode === 'wall' },
        y: { distr: c.log ? 4 : 1, asinh: c.log ? logThreshold(cs) : undefined, range: (u, mn, mx) => yRange(spec, c, u, mn, mx) } },
      axes: [xAxis, { ...axis, size: 58, values: yAxisValues(spec, c) }],
      hooks: {
        setCursor: [u => renderReadout(spec, u)],
        setScale: [(u, key) => {
          if (key !== 'x' || syncing) return;
          const mn = u.scales.x.min, mx = u.scales.x.max;
          const d0 = u.data[0];
          S.zoom = !d0.length || (mn <= d0[0] && mx >= d0[d0.length - 1]) ? null : [mn, mx];
          syncing = true;
          for (const o of Object.values(S.charts)) if (o.u && o.u !== u) o.u.setScale('x', { min: mn, max: mx });
          syncing = false;
        }],
      },
    };
    const data = uPlot.join(cs.tables);
    const u = new uPlot(opts, data, box);
    let down = null;
    u.over.addEventListener('mousedown', e => { down = [e.clientX, e.clientY]; });
    u.over.addEventListener('click', e => {
      if (down && Math.abs(e.clientX - down[0]) > 3) return;
      const idx = u.cursor.idx;
      if (idx == null) return;
      const x = u.data[0][idx];
      // the run whose series is closest to the pointer
      let best = null, bestD = Infinity;
      const yPos = u.cursor.top;
      u.series.forEach((s, si) => {
        if (!si || s._marker || s._raw) return;
        const v = u.data[si][idx];
        if (v == null) return;
        const d = Math.abs(u.valToPos(v, 'y') - yPos);
        if (d < bestD) { bestD = d; best = s._run; }
      });
      const so = c.stepOf && c.stepOf[best];
      openDrill(best, so ? so.get(x) : x);
    });
    if (S.zoom) u.setScale('x', { min: S.zoom[0], max: S.zoom[1] });
    return u;
  }

  function logThreshold(cs) {
    // asinh scale: linear below the smallest positive |value| seen, log above
    let mn = Infinity;
    for (const t of cs.tables) for (let i = 1; i < t.length; i++) for (const v of t[i]) { const a = Math.abs(v); if (a > 0 && a < mn) mn = a; }
    return mn === Infinity ? 1e-6 : mn / 2;
  }

  const HINT = '<span>hover: values · drag: zoom · double-click: reset · click: inspect step</span>';
  function renderReadout(spec, u) {
    const c = S.charts[spec.id];
    if (!c) return;
    const idx = u.cursor.idx;
    if (idx == null) { c.readout.innerHTML = HINT; return; }
    const x = u.data[0][idx];
    const parts = [`<span class="ro">${fmtX(x)}</span>`];
    u.series.forEach((s, si) => {
      if (!si || s._marker || s._raw) return;
      const v = u.data[si][idx];
      if (v === undefined) return;
      const r = S.runs.find(q => q.id === s._run);
      const lbl = spec.band ? s.label.replace(r.name + ' ', '') : '';
      const show = w => spec.pct ? pct(w) : fmt(w, 6);
      let raw = '';
      if (s._smoothed) { const rv = u.data[si - 1][idx]; raw = ` <span class="rawv">(raw ${show(rv)})</span>`; }
      parts.push(`<span class="ro"><span class="dotc" style="background:${runColor(r)}"></span>${spec.band && lbl !== 'min' ? '' : esc(r.name) + ' '}${lbl ? lbl + ' ' : ''}<b>${show(v)}</b>${raw}</span>`);
    });
    c.readout.innerHTML = parts.join(' ');
  }

  // what a chart shows (visible runs, x mode, zoom, smoothing), as CSV or JSON
  function exportChart(id, kind = 'csv') {
    const c = S.charts[id] || S.charts[(S.more[id] || {}).id];
    if (!c || !c.u) return null;
    const u = c.u, xs = u.data[0];
    const x0 = u.scales.x.min, x1 = u.scales.x.max;
    const rows = [];
    for (let i = 0; i < xs.length; i++) if (x0 == null || (xs[i] >= x0 && xs[i] <= x1)) rows.push(i);
    const xname = { step: 'step', wall: 'time_unix_s', rel: 'seconds_since_start' }[S.xmode];
    const cols = [];
    u.series.forEach((s, si) => {
      if (!si || s._marker) return;
      const r = S.runs.find(q => q.id === s._run);
      cols.push({ run: r.name, key: s._key, smoothed: !!s._smoothed, name: `${r.name}/${s._key}${s._smoothed ? ` (EMA ${S.smooth})` : ''}`,
        values: rows.map(i => { const v = u.data[si][i]; return v == null ? null : v; }) });
    });
    const x = rows.map(i => xs[i]);
    if (kind === 'json')
      return JSON.stringify({ chart: c.title, x_axis: xname, smoothing: S.smooth, x, series: cols.map(({ name, ...rest }) => rest) });
    const q = s => /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
    const lines = [[xname, ...cols.map(cl => q(cl.name))].join(',')];
    for (let j = 0; j < rows.length; j++) lines.push([x[j], ...cols.map(cl => cl.values[j] == null ? '' : String(cl.values[j]))].join(','));
    return lines.join('\n') + '\n';
  }

  function download(id, kind) {
    const text = exportChart(id, kind);
    if (text == null) return;
    const name = `${id.replace(/[^A-Za-z0-9_.-]+/g, '_')}.${kind}`;
    const a = el('a', { href: URL.createObjectURL(new Blob([text], { type: kind === 'csv' ? 'text/csv' : 'application/json' })), download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    API.lastExport = { id, kind, name, text };
  }

  function ensureCard(spec, grid) {
    let c = S.charts[spec.id];
    if (c) return c;
    const card = el('div', { class: 'card chart-card', id: `chart-${spec.id}`, 'data-key': spec.keys.join(' ') });
    const tools = el('div', { class: 'tools' });
    const b = el('button', { class: 'btn', type: 'button', title: 'linear / log (asinh: keeps 0 and negative values) y axis',
      onclick: () => { c.log = !c.log; b.classList.toggle('active', c.log); b.textContent = c.log ? 'log' : 'lin'; c.sig = null; renderCharts(); } }, 'lin');
    tools.append(b,
      el('button', { class: 'btn', type: 'button', title: 'download what this chart shows as CSV', 'data-export': 'csv', onclick: () => download(spec.id, 'csv') }, 'CSV'),
      el('button', { class: 'btn', type: 'button', title: 'download what this chart shows as JSON', 'data-export': 'json', onclick: () => download(spec.id, 'json') }, 'JSON'));
    const m = S.schema[spec.keys[0]] || {};
    card.append(el('div', { class: 'card-head' },
      el('div', {}, el('h2', { title: spec.title }, spec.title), el('div', { class: 'sub', title: spec.sub }, spec.sub),
        el('div', { class: 'known', title: m.known_as || '' }, m.known_as ? 'also logged as ' + m.known_as : '\u00a0')),
      tools),
      el('div', { class: 'plot' }), el('div', { class: 'readout' }), el('div', { class: 'sub missing' }));
    grid.append(card);
    c = S.charts[spec.id] = { card, u: null, sig: null, log: false, title: spec.title, readout: $('.readout', card) };
    c.readout.innerHTML = HINT;
    return c;
  }

  function drawChart(spec, c) {
    const cs = chartSeries(spec);
    const miss = [];
    if (cs.missing.length) miss.push(`not logged by ${cs.missing.map(r => r.name).join(', ')}`);
    if (cs.noTime.length) miss.push(`no wall time logged by ${cs.noTime.map(r => r.name).join(', ')}`);
    $('.missing', c.card).textContent = miss.join(' · ');
    if (!cs.tables.length) {
      if (c.u) { c.u.destroy(); c.u = null; }
      c.sig = null;
      $('.plot', c.card).innerHTML = '<div class="chart-empty">no run logged this metric</div>';
      return;
    }
    const sig = JSON.stringify([cs.series.map(s => s.label), c.log, S.xmode, S.robust]);
    if (c.u && c.sig === sig) {
      c.stepOf = cs.stepOf;
      c.u.setData(uPlot.join(cs.tables), !S.zoom);
      if (S.zoom) { syncing = true; c.u.setScale('x', { min: S.zoom[0], max: S.zoom[1] }); syncing = false; }
    } else {
      if (c.u) c.u.destroy();
      c.u = makeChart(spec, c.card, cs);
      c.sig = sig;
    }
  }

  function renderCharts() {
    const grid = $('#charts');
    for (const spec of CHARTS) drawChart(spec, ensureCard(spec, grid));
    // every other scalar: one chart each, filterable
    const all = otherKeys();
    const keys = filterKeys(all);
    const shown = keys.slice(0, MAX_MORE);
    $('#more-card').hidden = !all.length;
    $('#more-count').textContent = `${all.length} scalar${all.length !== 1 ? 's' : ''}`;
    $('#more-note').textContent = keys.length > MAX_MORE ? `showing ${MAX_MORE} of ${keys.length} matching: narrow the filter to see the others` :
      S.filter && !keys.length ? 'no scalar matches the filter' : all.length ? `${keys.length} of ${all.length} shown` : '';
    const want = new Set(shown);
    for (const [k, spec] of Object.entries(S.more)) {
      if (want.has(k)) continue;
      const c = S.charts[spec.id];
      if (c) { if (c.u) c.u.destroy(); c.card.remove(); delete S.charts[spec.id]; }
    }
    const more = $('#more');
    let n = Object.keys(S.more).length;
    for (const k of shown) {
      let spec = S.more[k];
      if (!spec) spec = S.more[k] = { id: `m${n++}-` + k.replace(/[^A-Za-z0-9_-]+/g, '_'), title: label(k), keys: [k], other: true, sub: label(k) === k ? '' : k };
      const c = ensureCard(spec, more);
      more.append(c.card);                     // keep the filtered order
      drawChart(spec, c);
    }
  }

  // ---------------------------------------------------------------- drill-down
  const HEAT = [[0, [254, 240, 138]], [0.35, [251, 146, 60]], [0.7, [220, 38, 38]], [1, [127, 29, 29]]];
  function heat(t) {
    for (let i = 1; i < HEAT.length; i++) {
      if (t <= HEAT[i][0]) {
        const [t0, c0] = HEAT[i - 1], [t1, c1] = HEAT[i];
        const f = (t - t0) / (t1 - t0);
        return c0.map((c, j) => Math.round(c + (c1[j] - c) * f));
      }
    }
    return HEAT[HEAT.length - 1][1];
  }
  const heatT = ad => Math.max(0, Math.min(1, (Math.log10(ad) + 6) / 5));   // 1e-6 .. 1e-1
  function tokenStyle(ad) {
    if (ad === 0) return '';
    if (!(ad > 0)) return `background:${RED};color:#fff`;   // NaN / inf
    const t = heatT(ad), c = heat(t);
    return `background:rgb(${c.join(',')});color:${t > 0.62 ? '#fff' : '#1d2433'}`;
  }
  const num = v => typeof v === 'string' ? Number(v) : v;

  async function tokenSteps(runId) {
    const r = S.runs.find(x => x.id === runId);
    if (!r) return [];
    if (STATIC) return Object.keys(STATIC.tokens[runId] || {}).map(Number).sort((a, b) => a - b);
    const k = `steps:${runId}:${r.token_steps}`;
    if (!S.tokCache[k]) S.tokCache[k] = (await getJSON(`api/run/${runId}/tokens`)).body.steps;
    return S.tokCache[k];
  }
  async function tokenFile(runId, step) {
    if (STATIC) return (STATIC.tokens[runId] || {})[step] || null;
    const k = `file:${runId}:${step}`;
    if (!S.tokCache[k]) {
      const res = await fetch(`api/run/${runId}/tokens/${step}`, { cache: 'no-store' });
      if (res.status === 404) return null;
      S.tokCache[k] = await res.json();
    }
    return S.tokCache[k];
  }

  async function openDrill(runId, step) {
    const withTok = S.runs.filter(r => r.token_steps > 0);
    const card = $('#drill');
    card.hidden = false;
    let r = S.runs.find(x => x.id === runId);
    if (!r || !r.token_steps) r = withTok.find(x => !S.hidden.has(x.id)) || withTok[0] || r;
    const sel = $('#drill-run');
    sel.innerHTML = '';
    for (const x of S.runs) sel.append(el('option', { value: x.id, disabled: !x.token_steps || null }, x.name + (x.token_steps ? '' : ' (no per-token data)')));
    if (!r) return;
    sel.value = r.id;
    const steps = r.token_steps ? await tokenSteps(r.id) : [];
    const body = $('#drill-body');
    if (!steps.length) {
      S.drill = { run: r.id, step: null, steps: [] };
      $('#drill-title').textContent = `Step drill-down · ${r.name}`;
      body.innerHTML = '';
      body.append(el('p', { class: 'note' }, `${r.name} has no per-token data. A plain TRL run logs only per-step aggregates; the onpolicy recipe writes a bounded sample of sequences per step to tokens/step_NNNNNN.json.`));
      ['#drill-step', '#drill-prev', '#drill-next', '#drill-worst'].forEach(s => { $(s).disabled = true; });
      return;
    }
    ['#drill-step', '#drill-prev', '#drill-next', '#drill-worst'].forEach(s => { $(s).disabled = false; });
    // nearest recorded step
    let i = lowerBound(steps, step == null ? steps[0] : step);
    if (i >= steps.length) i = steps.length - 1;
    if (i > 0 && step != null && Math.abs(steps[i - 1] - step) <= Math.abs(steps[i] - step)) i--;
    const st = steps[i];
    const ss = $('#drill-step');
    if (ss.dataset.run !== String(r.id) || ss.options.length !== steps.length) {
      ss.innerHTML = '';
      for (const s of steps) ss.append(el('option', { value: s }, `step ${s}`));
      ss.dataset.run = r.id;
    }
    ss.value = st;
    S.drill = { run: r.id, step: st, steps, sample: S.drill && S.drill.run === r.id ? S.drill.sample : 0 };
    const f = await tokenFile(r.id, st);
    renderDrill(r, st, f);
    if (!API.drillOpened) API.drillOpened = 0;
    API.drillOpened++;
  }

  function drillStats(samples) {
    let n = 0, eq = 0, sum = 0, mx = -1, at = null, k1 = 0, k3 = 0, rmin = Infinity, rmax = -Infinity;
    const ds = [];
    for (const s of samples) {
      for (let j = 0; j < s.sampler_logp.length; j++) {
        const a = num(s.sampler_logp[j]), b = num(s.trainer_logp[j]);
        if (a == null || b == null) continue;
        const d = b - a;       // log r
        n++;
        if (a === b) eq++;
        const ad = Math.abs(d);
        sum += ad;
        if (ad > mx) { mx = ad; at = [s.seq, j]; }
        k1 += -d; const rr = Math.exp(d); k3 += rr - 1 - d;
        rmin = Math.min(rmin, rr); rmax = Math.max(rmax, rr);
        ds.push(a === b ? 0 : d);
      }
    }
    return { n, eq, mean: n ? sum / n : null, max: n ? mx : null, at, k1: n ? k1 / n : null, k3: n ? k3 / n : null, rmin, rmax, ds };
  }

  function renderDrill(r, step, f) {
    const body = $('#drill-body');
    body.innerHTML = '';
    $('#drill-title').textContent = `Step ${int(step)} · ${r.name}`;
    if (!f || !f.samples) { body.append(el('p', { class: 'note' }, `no token data for step ${step}`)); return; }
    for (const w of f.warnings || []) body.append(el('p', { class: 'note red' }, '⚠ ' + w));
    if (!f.samples.length) return;
    const samples = f.samples;
    let si = Math.min(S.drill.sample || 0, samples.length - 1);
    const all = drillStats(samples);
    const left = el('div', {}), right = el('div', {});
    const tabs = el('div', { class: 'tabs' });
    samples.forEach((s, k) => {
      const st = drillStats([s]);
      const nd = st.n - st.eq;
      tabs.append(el('button', { class: 'tab' + (k === si ? ' active' : ''), type: 'button', 'data-sample': k,
        onclick: () => { S.drill.sample = k; renderDrill(r, step, f); } },
        `seq ${s.seq}`, el('span', { class: 'n' + (nd ? ' red' : '') }, nd ? `${nd} ≠` : '= all'),
        s.reward != null ? el('span', { class: 'n' }, `r=${fmt(s.reward, 3)}`) : null));
    });
    const s = samples[si];
    const tokBox = el('div', { class: 'tokens', id: 'drill-tokens' });
    const frag = document.createDocumentFragment();
    for (let j = 0; j < s.text.length; j++) {
      const a = num(s.sampler_logp[j]), b = num(s.trainer_logp[j]);
      const ad = a === b ? 0 : Math.abs(b - a);
      const t = s.text[j];
      const span = el('span', { class: 'tok' + (t === '\n' ? ' nl' : ''), 'data-j': j, 'data-ad': ad, style: tokenStyle(ad) }, t === '\n' ? '' : t);
      frag.append(span);
      if (t === '\n' || t.endsWith('\n')) frag.append('\n');
    }
    tokBox.append(frag);
    tokBox.addEventListener('mousemove', e => {
      const sp = e.target.closest('.tok');
      const tip = $('#tip');
      if (!sp) { tip.hidden = true; return; }
      const j = +sp.dataset.j;
      const a = num(s.sampler_logp[j]), b = num(s.trainer_logp[j]);
      tip.innerHTML = `<table><tr><td>token</td><td>${esc(JSON.stringify(s.text[j]))}${s.token_ids ? ' · id ' + s.token_ids[j] : ''} · pos ${j}</td></tr>
        <tr><td>sampler logp</td><td>${a}</td></tr><tr><td>trainer logp</td><td>${b}</td></tr>
        <tr><td>log ratio</td><td>${a === b ? '0 (bitwise equal)' : fmt(b - a, 6)}</td></tr></table>`;
      tip.hidden = false;
      tip.style.left = Math.min(window.innerWidth - 370, e.clientX + 14) + 'px';
      tip.style.top = (e.clientY + 16) + 'px';
    });
    tokBox.addEventListener('mouseleave', () => { $('#tip').hidden = true; });
    const one = drillStats([s]);
    const seqTbl = el('table', { class: 'kv seqs', id: 'drill-seqs' },
      el('tr', { class: 'hdr' }, el('th', {}, 'sequence'), el('th', {}, 'tokens'), el('th', {}, 'differ'), el('th', {}, 'max |Δlogp|'), el('th', {}, 'k3 KL'), el('th', {}, 'reward')),
      samples.map((q, k) => {
        const st = drillStats([q]);
        return el('tr', { class: k === si ? 'sel' : '', onclick: () => { S.drill.sample = k; renderDrill(r, step, f); } },
          el('th', {}, `seq ${q.seq}`), el('td', { class: 'num' }, int(st.n)),
          el('td', { class: 'num' + (st.n - st.eq ? ' red' : ' green') }, `${int(st.n - st.eq)} (${pct(st.n ? (st.n - st.eq) / st.n : null)})`),
          el('td', { class: 'num' }, fmt(st.max, 4)), el('td', { class: 'num' }, fmt(st.k3, 3)),
          el('td', { class: 'num' }, q.reward == null ? '—' : fmt(q.reward, 3)));
      }));
    left.append(tabs, tokBox,
      el('div', { class: 'scale' }, el('span', {}, 'token colour = |Δlogp|:'), el('span', { class: 'eq' }), 'bitwise equal',
        el('span', { class: 'bar', style: `background:linear-gradient(90deg, ${[0, .2, .4, .6, .8, 1].map(t => `rgb(${heat(t).join(',')})`).join(',')})` }),
        el('span', { class: 'mono' }, '1e−6 … ≥ 0.1')),
      el('p', { class: 'note ' + (one.eq === one.n ? 'green' : 'red') }, one.eq === one.n ?
        `All ${one.n} tokens of seq ${s.seq} have bitwise-equal sampler and trainer logprobs.` :
        `${one.n - one.eq} of ${one.n} tokens of seq ${s.seq} differ; the largest |Δlogp| is ${fmt(one.max, 4)} at position ${one.at[1]} (${JSON.stringify(s.text[one.at[1]])}).`),
      seqTbl);

    // histogram + stats
    const hist = el('div', { class: 'hist', id: 'drill-hist' });
    right.append(el('div', { class: 'hist-title' }, `Per-token log-ratio log(p_trainer / p_sampler), all ${samples.length} sequences`), hist);
    const t = S.tables[r.id];
    const ix = t ? lowerBound(t.steps, step) : -1;
    const logged = t && t.steps[ix] === step ? k => (t.cols[k] || [])[ix] : () => undefined;
    const rows = [
      ['tokens', int(all.n), logged('tokens') != null ? int(logged('tokens')) : '—'],
      ['bitwise equal', `${int(all.eq)} (${pct(all.n ? all.eq / all.n : null)})`, logged('bitwise_equal_frac') != null ? pct(logged('bitwise_equal_frac')) : '—'],
      ['mean |Δlogp|', fmt(all.mean, 4), fmt(logged('logp_abs_diff_mean'), 4)],
      ['max |Δlogp|', fmt(all.max, 4), fmt(logged('logp_abs_diff_max'), 4)],
      ['KL k1', fmt(all.k1, 4), fmt(logged('kl_k1'), 4)],
      ['KL k3', fmt(all.k3, 4), fmt(logged('kl_k3'), 4)],
      ['IS ratio min / max', `${fmt(all.rmin, 5)} / ${fmt(all.rmax, 5)}`, `${fmt(logged('is_ratio_min'), 5)} / ${fmt(logged('is_ratio_max'), 5)}`],
    ];
    const tbl = el('table', { class: 'kv', id: 'drill-stats' },
      el('tr', { class: 'hdr' }, el('th', {}, ''), el('th', {}, 'these sequences'), el('th', {}, 'whole step (logged)')),
      rows.map(([k, a, b]) => el('tr', {}, el('th', {}, k), el('td', { class: 'num' }, a), el('td', { class: 'num' }, b))));
    right.append(tbl);
    const fm = t && t.fm[step];
    if (fm) right.append(el('p', { class: 'note red' }, `first differing token of the step: seq ${fm.seq}, position ${fm.pos}: sampler ${fm.sampler}, trainer ${fm.trainer}`));
    body.append(el('div', { class: 'drill-grid' }, left, right));
    requestAnimationFrame(() => drawHist(hist, all.ds));
    API.drill = { run: r.id, step, sample: si, stats: { n: all.n, eq: all.eq, max: all.max, mean: all.mean } };
  }

  function niceCeil(x) {
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const f of [1, 2, 2.5, 5, 10]) if (x <= f * p * (1 + 1e-12)) return f * p;
    return 10 * p;
  }

  function drawHist(box, ds) {
    const W = Math.max(280, box.clientWidth), H = 190, dpr = window.devicePixelRatio || 1;
    const cv = el('canvas', { style: `width:${W}px;height:${H}px` });
    cv.width = W * dpr; cv.height = H * dpr;
    box.innerHTML = '';
    box.append(cv);
    const ctx = cv.getContext('2d');
    ctx.scale(dpr, dpr);
    ctx.font = '11px system-ui, sans-serif';
    const zeros = ds.filter(d => d === 0).length;
    const nz = ds.filter(d => d !== 0 && Number.isFinite(d));
    let m = nz.reduce((a, d) => Math.max(a, Math.abs(d)), 0);
    const NB = 40;
    const half = m > 0 ? niceCeil(m) : 1e-3;     // x range [-half, half]
    const bins = new Array(NB).fill(0);
    for (const d of nz) bins[Math.min(NB - 1, Math.max(0, Math.floor((d + half) / (2 * half) * NB)))]++;
    const L = 44, R = 22, T = 22, B = 26, pw = W - L - R, ph = H - T - B;
    const ymax = Math.max(1, zeros, ...bins);
    const sy = c => T + ph - Math.sqrt(c / ymax) * ph;      // sqrt scale keeps the tails visible
    const sx = x => L + (x + half) / (2 * half) * pw;
    // grid + y ticks
    ctx.strokeStyle = '#eef0f3'; ctx.fillStyle = '#667085'; ctx.lineWidth = 1;
    const yt = [0, ...[0.25, 0.5, 1].map(f => Math.round(f * ymax))].filter((v, i, a) => a.indexOf(v) === i);
    ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
    for (const v of yt) { const y = Math.round(sy(v)) + .5; ctx.beginPath(); ctx.moveTo(L, y); ctx.lineTo(L + pw, y); ctx.stroke(); ctx.fillText(int(v), L - 6, y); }
    // bars
    const bw = pw / NB;
    bins.forEach((c, i) => {
      if (!c) return;
      const center = -half + (i + 0.5) * 2 * half / NB;
      ctx.fillStyle = `rgb(${heat(heatT(Math.abs(center))).join(',')})`;
      const y = sy(c);
      ctx.fillRect(L + i * bw + 0.5, y, Math.max(1, bw - 1), T + ph - y);
    });
    if (zeros) {
      const x = sx(0), y = sy(zeros);
      ctx.fillStyle = '#10b981';
      ctx.fillRect(x - Math.max(2, bw / 3), y, Math.max(4, bw * 2 / 3), T + ph - y);
    }
    // legend
    ctx.textBaseline = 'top'; ctx.textAlign = 'left';
    ctx.fillStyle = '#10b981'; ctx.fillRect(L, 3, 9, 9);
    ctx.fillStyle = '#344054'; ctx.fillText(`= 0, bitwise equal: ${int(zeros)}`, L + 13, 2);
    const lx = L + 26 + ctx.measureText(`= 0, bitwise equal: ${int(zeros)}`).width;
    ctx.fillStyle = RED; ctx.fillRect(lx, 3, 9, 9);
    ctx.fillStyle = '#344054'; ctx.fillText(`≠ 0: ${int(nz.length)}`, lx + 13, 2);
    // x axis
    ctx.strokeStyle = '#d0d5dd'; ctx.beginPath(); ctx.moveTo(L, T + ph + .5); ctx.lineTo(L + pw, T + ph + .5); ctx.stroke();
    ctx.fillStyle = '#667085'; ctx.textAlign = 'center'; ctx.textBaseline = 'top';
    for (const f of [-1, -0.5, 0, 0.5, 1]) { const v = f * half; ctx.fillText(m > 0 || f === 0 ? fmt(v, 2) : '', sx(v), T + ph + 6); }
    ctx.textAlign = 'right'; ctx.textBaseline = 'top'; ctx.fillStyle = '#98a2b3';
    ctx.fillText('tokens (√ scale)', L + pw, 2);
    if (!nz.length) {
      ctx.fillStyle = '#065f46'; ctx.textAlign = 'center'; ctx.textBaseline = 'middle';
      ctx.font = '600 12.5px system-ui, sans-serif';
      ctx.fillText(`all ${int(zeros)} log-ratios are exactly 0`, L + pw / 2, T + ph * 0.45);
    }
    box.dataset.zeros = zeros; box.dataset.nonzero = nz.length;
  }

  function initDrillNav() {
    $('#drill-close').onclick = () => { $('#drill').hidden = true; $('#tip').hidden = true; };
    $('#drill-run').onchange = e => openDrill(+e.target.value, S.drill ? S.drill.step : null);
    $('#drill-step').onchange = e => openDrill(S.drill.run, +e.target.value);
    $('#drill-prev').onclick = () => { const d = S.drill; const i = d.steps.indexOf(d.step); if (i > 0) openDrill(d.run, d.steps[i - 1]); };
    $('#drill-next').onclick = () => { const d = S.drill; const i = d.steps.indexOf(d.step); if (i >= 0 && i < d.steps.length - 1) openDrill(d.run, d.steps[i + 1]); };
    $('#drill-worst').onclick = () => {
      const d = S.drill; const t = S.tables[d.run];
      if (!t) return;
      const col = t.cols.logp_abs_diff_max || [];
      let best = d.steps[0], bv = -1;
      for (const s of d.steps) { const i = lowerBound(t.steps, s); const v = t.steps[i] === s ? col[i] : null; if (v != null && v > bv) { bv = v; best = s; } }
      openDrill(d.run, best);
    };
  }

  // ---------------------------------------------------------------- main
  function render() {
    renderAlerts();
    renderRuns();
    renderLegend();
    renderTimeline();
    renderCharts();
    const nSteps = S.runs.reduce((a, r) => a + r.summary.steps, 0);
    $('#foot-text').textContent = `${S.runs.length} run${S.runs.length !== 1 ? 's' : ''} · ${int(nSteps)} steps · ` +
      S.runs.map(r => `${r.name}: ${r.sources.join(', ') || 'no sources yet'}`).join(' · ');
    if (!API.readyQueued && S.runs.length) {
      // ready once the frame with the charts has been painted (two animation frames)
      API.readyQueued = true;
      requestAnimationFrame(() => requestAnimationFrame(() => {
        API.openMs = performance.now();
        API.ready = true;
        document.documentElement.dataset.ready = '1';
      }));
      if (!S.opened && S.runs.some(r => r.token_steps > 0) && window.location.hash.startsWith('#drill')) {
        S.opened = true;
        const [, run, step] = window.location.hash.split(/[=,]/);
        openDrill(+run, +step);
      }
    }
  }

  function loop() {
    if (!S.paused && document.visibilityState !== 'hidden') poll();
    else renderLive();
    setTimeout(loop, POLL_MS);
  }

  function init() {
    initDrillNav();
    initToolbar();
    $('#pause').onclick = () => { S.paused = !S.paused; $('#pause').textContent = S.paused ? 'Resume' : 'Pause'; renderLive(); };
    let rt = null;
    window.addEventListener('resize', () => {
      clearTimeout(rt);
      rt = setTimeout(() => {
        for (const c of Object.values(S.charts)) if (c.u) c.u.setSize({ width: Math.max(300, $('.plot', c.card).clientWidth), height: 190 });
        renderTimeline();
      }, 120);
    });
    if (STATIC) loadStatic();
    else poll().then(() => setTimeout(loop, POLL_MS));
  }
  init();
})();
