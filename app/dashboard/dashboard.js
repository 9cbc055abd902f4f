// The Squeeze dashboard: a small page over the same HTTP API, authenticated with the same API key.
// The key stays in this browser's localStorage and is sent as a Bearer header; images and downloads are
// fetched with it too (an <img src> could not carry the header).
"use strict";

const KEY = "squeeze_api_key";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const view = document.getElementById("view");
let timer = null;

// Every value shown comes from the API, and much of it from the job's untrusted sandbox (metrics, stage, error and
// event messages, artifact names): markup is built only with html`...`, which escapes every interpolated value
// unless it is itself html`` output (arrays of those are joined), and only such markup reaches innerHTML (show).
class Markup {
  constructor(text) { this.text = text; }
}

const ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;", "`": "&#96;"};

function esc(value) {
  if (value instanceof Markup) return value.text;
  if (Array.isArray(value)) return value.map(esc).join("");
  return String(value ?? "").replace(/[&<>"'`]/g, (c) => ENTITIES[c]);
}

function html(strings, ...values) {
  return new Markup(strings.reduce((out, text, i) => out + esc(values[i - 1]) + text));
}

function show(markup) {
  if (!(markup instanceof Markup)) throw new TypeError("only html`` markup is shown");
  view.innerHTML = markup.text;
}

async function api(path, asBlob = false) {
  const res = await fetch(path, {headers: {Authorization: `Bearer ${localStorage.getItem(KEY)}`}});
  if (res.status === 401) { localStorage.removeItem(KEY); route(); throw new Error("unauthorized"); }
  if (!res.ok) {
    let message = res.statusText;
    try { message = (await res.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(`${res.status}: ${message}`);
  }
  return asBlob ? res.blob() : res.json();
}

const fmt = {
  ratio: (v) => (v == null ? "–" : `${Number(v).toFixed(2)}x`),
  pct: (v) => (v == null ? "–" : `${(100 * v).toFixed(2)}%`),
  bytes: (v) => (v == null ? "–" : v >= 1048576 ? `${(v / 1048576).toFixed(2)} MiB` : `${(v / 1024).toFixed(1)} KiB`),
  ms: (v) => (v == null ? "–" : `${Number(v).toFixed(3)} ms`),
  time: (v) => (v ? new Date(v).toLocaleString() : "–"),
};

function status(s) { return html`<span class="status ${s}">${s}</span>`; }
function bar(p) {
  return html`<span class="bar"><span style="width:${Math.round(100 * (Number(p) || 0))}%"></span></span>`;
}

// The headline speed-up: the first runtime measured on both sides, at its largest batch (as app/reports.py).
function speedup(metrics) {
  const lat = (metrics && metrics.ratios && metrics.ratios.latency) || {};
  for (const [rt, byBatch] of Object.entries(lat)) {
    const batches = Object.keys(byBatch).map(Number).sort((a, b) => b - a);
    if (batches.length && byBatch[batches[0]] != null) return {rt, batch: batches[0], value: byBatch[batches[0]]};
  }
  return null;
}

function sizeRatio(metrics) {
  const r = (metrics && metrics.ratios) || {};
  const values = [r.size, r.safetensors_size].filter((v) => v != null);
  return values.length ? Math.max(...values) : null;
}

// The smallest artifact (the compact safetensors, when written, is usually it), as the size ratio counts.
function smallest(metrics) {
  const sizes = [metrics.compressed.size_bytes, metrics.compressed.safetensors_size_bytes].filter((v) => v);
  return sizes.length ? Math.min(...sizes) : null;
}

function login() {
  show(html`<form class="login"><h2>Sign in</h2>
    <p class="muted">Paste your team's API key (<code>squeeze keys create --team NAME</code>). It is kept in this
    browser only.</p><input name="key" placeholder="sqz_..." autocomplete="off" required>
    <button type="submit">Open the dashboard</button></form>`);
  view.querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, e.target.key.value.trim());
    route();
  });
}

function jobRow(j) {
  const m = j.metrics || {};
  const s = speedup(m);
  return html`<tr data-job="${j.id}" data-status="${j.status}">
    <td><a href="#/jobs/${j.id}">${j.id}</a></td>
    <td><a href="#/models/${j.model_id}">${j.model_id}</a></td>
    <td class="job-status">${status(j.status)}</td><td>${bar(j.progress)} ${Math.round(100 * j.progress)}%</td>
    <td>${j.stage}</td><td class="num">${fmt.ratio(sizeRatio(m))}</td>
    <td class="num">${s ? html`${fmt.ratio(s.value)} <span class="muted">${s.rt} b${s.batch}</span>` : "–"}</td>
    <td class="num">${fmt.pct(m.original && m.original.accuracy)} → ${fmt.pct(m.compressed && m.compressed.accuracy)}</td>
    <td>${j.error ? j.error.code : ""}</td><td>${fmt.time(j.created_at)}</td></tr>`;
}

async function jobsView() {
  const page = await api("/v1/jobs?limit=100");
  const rows = page.data.length ? page.data.map(jobRow)
    : html`<tr><td colspan="10" class="muted">No jobs yet.</td></tr>`;
  show(html`<h2>Jobs</h2><table id="jobs"><thead><tr><th>job</th><th>model</th><th>status</th>
    <th>progress</th><th>stage</th><th>smaller</th><th>faster</th><th>accuracy</th><th>error</th><th>created</th>
    </tr></thead><tbody>${rows}</tbody></table>`);
  schedule(jobsView, 1500);  // live: the table refreshes itself, no reload
}

function latencyRows(m) {
  const out = [];
  for (const [rt, byBatch] of Object.entries((m.original && m.original.latency_ms) || {})) {
    for (const [batch, t] of Object.entries(byBatch)) {
      const after = ((m.compressed.latency_ms || {})[rt] || {})[batch];
      const ratio = ((m.ratios.latency || {})[rt] || {})[batch];
      out.push(html`<tr><td>${rt}</td><td class="num">${batch}</td><td class="num">${fmt.ms(t.median)}</td>
        <td class="num">${fmt.ms(after && after.median)}</td><td class="num">${fmt.ratio(ratio)}</td></tr>`);
    }
  }
  return out;
}

function metricsCards(m) {
  const s = speedup(m);
  return html`<div class="cards">
    <div class="card"><div class="k">size on disk</div><div class="v" id="size-ratio">${fmt.ratio(sizeRatio(m))}</div>
      <div class="muted">${fmt.bytes(m.original.size_bytes)} → ${fmt.bytes(smallest(m))}</div></div>
    <div class="card"><div class="k">speed-up</div><div class="v">${s ? fmt.ratio(s.value) : "–"}</div>
      <div class="muted">${s ? `${s.rt}, batch ${s.batch}` : "not timed on a common runtime"}</div></div>
    <div class="card"><div class="k">MACs</div><div class="v">${fmt.ratio(m.ratios.macs)}</div></div>
    <div class="card"><div class="k">accuracy</div><div class="v">${fmt.pct(m.compressed.accuracy)}</div>
      <div class="muted">before ${fmt.pct(m.original.accuracy)}</div></div>
    <div class="card"><div class="k">agreement with the original</div><div class="v">${fmt.pct(m.compressed.agreement)}</div>
      <div class="muted">cosine ${m.compressed.cosine ?? "–"}</div></div></div>`;
}

function metricsSection(m) {
  // Each flag with its one-line reason (report.json's flag_reasons; older jobs have none).
  const reasons = m.flag_reasons || {};
  const flags = (m.flags || []).length ? html`<ul class="flags">${m.flags.map((f) => html`<li><span class="flag">${f}</span>
    ${reasons[f] || ""}</li>`)}</ul>` : "";
  const guard = m.guard ? html`<h3>Guard: ${m.guard.passed ? "passed" : "missed"}</h3><table><tr><th>bound</th>
    <th>limit</th><th>measured</th><th>passed</th></tr>${(m.guard.checks || []).map((c) => html`<tr><td>${c.bound}</td>
    <td class="num">${c.limit}</td><td class="num">${c.measured ?? "not measured"}</td>
    <td>${c.passed ? "yes" : "no"}</td></tr>`)}</table>` : "";
  return html`${metricsCards(m)}${flags}${guard}<h3>Latency (median)</h3><table><tr><th>runtime</th><th>batch</th>
    <th>original</th><th>result</th><th>speed-up</th></tr>${latencyRows(m)}</table>`;
}

function artifactList(artifacts) {
  const items = artifacts.map((a) => html`<li><a href="#" data-url="${a.url}" data-name="${a.name}">${a.name}</a>
    <span class="muted">${a.format}, ${fmt.bytes(a.size_bytes)} ${a.label ? `· ${a.label}` : ""}</span></li>`);
  const none = html`<li class="muted">none yet</li>`;
  return html`<h3>Artifacts</h3><ul id="artifacts">${items.length ? items : none}</ul>`;
}

async function jobView(id) {
  const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  const events = await api(`/v1/jobs/${encodeURIComponent(id)}/events`);
  const png = job.artifacts.find((a) => a.name === "report.png");
  const report = html`<h3>Report</h3>
    <img class="plot" id="report-png" alt="original vs result, per-layer sparsity and bits">`;
  show(html`<h2>Job ${job.id} ${status(job.status)}</h2>
    <p>Model <a href="#/models/${job.model_id}">${job.model_id}</a> · ${bar(job.progress)}
    ${Math.round(100 * job.progress)}% · stage ${job.stage} · queue ${job.queue} · attempts ${job.attempts}</p>
    ${job.error ? html`<p class="error"><b>${job.error.code}</b>: ${job.error.message}</p>` : ""}
    ${job.metrics ? metricsSection(job.metrics) : ""}${artifactList(job.artifacts)}
    ${png ? report : ""}
    <h3>Events</h3><table><tr><th>time</th><th>type</th><th>message</th></tr>${events.data.slice(-40).map((e) =>
      html`<tr><td>${fmt.time(e.created_at)}</td><td>${e.type}</td><td>${e.message}</td></tr>`)}</table>`);
  view.querySelectorAll("#artifacts a").forEach((a) => a.addEventListener("click", download));
  if (png) document.getElementById("report-png").src = URL.createObjectURL(await api(png.url, true));
  if (!TERMINAL.has(job.status)) schedule(() => jobView(id), 1500);
}

async function download(e) {
  e.preventDefault();
  const blob = await api(e.target.dataset.url, true);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = e.target.dataset.name;
  link.click();
}

function compareRow(r, front) {
  const recipe = r.recipe.steps.map((s) => (s.method ? `${s.type}:${s.method}` : s.type)).join(" → ");
  return html`<tr><td><a href="#/jobs/${r.job_id}">${r.job_id}</a> ${front.has(r.job_id) ? "★" : ""}</td>
    <td>${status(r.status)} ${r.error_code || ""}</td><td>${recipe}</td>
    <td class="num">${fmt.ratio(r.headline.size_ratio)}</td><td class="num">${fmt.ratio(r.headline.speedup)}</td>
    <td class="num">${fmt.pct(r.headline.accuracy_after)}</td><td class="num">${fmt.pct(r.headline.agreement)}</td></tr>`;
}

async function modelView(id) {
  const model = await api(`/v1/models/${encodeURIComponent(id)}`);
  const cmp = await api(`/v1/models/${encodeURIComponent(id)}/jobs/compare`);
  const front = new Set([...cmp.pareto.size, ...cmp.pareto.latency]);
  const rows = cmp.data.length ? cmp.data.map((r) => compareRow(r, front))
    : html`<tr><td colspan="7" class="muted">No measured jobs yet.</td></tr>`;
  show(html`<h2>Model ${model.name} <span class="muted">${model.format}, ${fmt.bytes(model.size_bytes)}</span></h2>
    <p class="muted">${model.id} · sha256 ${model.sha256.slice(0, 16)}… · ★ on a Pareto front</p>
    <table><tr><th>job</th><th>status</th><th>recipe</th><th>smaller</th><th>faster</th><th>accuracy</th>
    <th>agreement</th></tr>${rows}</table>
    ${cmp.data.length ? html`<h3>Pareto fronts</h3>
      <img class="plot" id="pareto-png" alt="size and latency vs accuracy">` : ""}`);
  if (cmp.data.length) {
    document.getElementById("pareto-png").src =
      URL.createObjectURL(await api(`/v1/models/${encodeURIComponent(id)}/jobs/compare.png`, true));
  }
}

function schedule(fn, ms) {
  clearTimeout(timer);
  const hash = location.hash;
  timer = setTimeout(() => { if (location.hash === hash) fn().catch(showError); }, ms);
}

function showError(err) {
  if (err.message !== "unauthorized") show(html`<p class="error">${err.message}</p>`);
}

function route() {
  clearTimeout(timer);
  const signedIn = !!localStorage.getItem(KEY);
  document.getElementById("logout").hidden = !signedIn;
  if (!signedIn) return login();
  const [, kind, id] = (location.hash || "#/jobs").split("/");
  const run = kind === "jobs" && id ? jobView(id) : kind === "models" && id ? modelView(id) : jobsView();
  run.catch(showError);
}

document.getElementById("logout").addEventListener("click", () => { localStorage.removeItem(KEY); route(); });
window.addEventListener("hashchange", route);
route();
