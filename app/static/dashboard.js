// The Squeeze dashboard: a small page over the same HTTP API, authenticated with the same API key.
// The key stays in this browser's localStorage and is sent as a Bearer header; images and downloads are
// fetched with it too (an <img src> could not carry the header).
"use strict";

const KEY = "squeeze_api_key";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const view = document.getElementById("view");
let timer = null;

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
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

function status(s) { return `<span class="status ${esc(s)}">${esc(s)}</span>`; }
function bar(p) { return `<span class="bar"><span style="width:${Math.round(100 * (p || 0))}%"></span></span>`; }

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
  view.innerHTML = `<form class="login"><h2>Sign in</h2>
    <p class="muted">Paste your team's API key (<code>squeeze keys create --team NAME</code>). It is kept in this
    browser only.</p><input name="key" placeholder="sqz_..." autocomplete="off" required>
    <button type="submit">Open the dashboard</button></form>`;
  view.querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY, e.target.key.value.trim());
    route();
  });
}

async function jobsView() {
  const page = await api("/v1/jobs?limit=100");
  const rows = page.data.map((j) => {
    const m = j.metrics || {};
    const s = speedup(m);
    return `<tr data-job="${esc(j.id)}" data-status="${esc(j.status)}">
      <td><a href="#/jobs/${esc(j.id)}">${esc(j.id)}</a></td>
      <td><a href="#/models/${esc(j.model_id)}">${esc(j.model_id)}</a></td>
      <td class="job-status">${status(j.status)}</td><td>${bar(j.progress)} ${Math.round(100 * j.progress)}%</td>
      <td>${esc(j.stage)}</td><td class="num">${fmt.ratio(sizeRatio(m))}</td>
      <td class="num">${s ? `${fmt.ratio(s.value)} <span class="muted">${esc(s.rt)} b${s.batch}</span>` : "–"}</td>
      <td class="num">${fmt.pct(m.original && m.original.accuracy)} → ${fmt.pct(m.compressed && m.compressed.accuracy)}</td>
      <td>${esc(j.error ? j.error.code : "")}</td><td>${fmt.time(j.created_at)}</td></tr>`;
  }).join("");
  view.innerHTML = `<h2>Jobs</h2><table id="jobs"><thead><tr><th>job</th><th>model</th><th>status</th>
    <th>progress</th><th>stage</th><th>smaller</th><th>faster</th><th>accuracy</th><th>error</th><th>created</th>
    </tr></thead><tbody>${rows || '<tr><td colspan="10" class="muted">No jobs yet.</td></tr>'}</tbody></table>`;
  schedule(jobsView, 1500);  // live: the table refreshes itself, no reload
}

function latencyRows(m) {
  const out = [];
  for (const [rt, byBatch] of Object.entries((m.original && m.original.latency_ms) || {})) {
    for (const [batch, t] of Object.entries(byBatch)) {
      const after = ((m.compressed.latency_ms || {})[rt] || {})[batch];
      const ratio = ((m.ratios.latency || {})[rt] || {})[batch];
      out.push(`<tr><td>${esc(rt)}</td><td class="num">${esc(batch)}</td><td class="num">${fmt.ms(t.median)}</td>
        <td class="num">${fmt.ms(after && after.median)}</td><td class="num">${fmt.ratio(ratio)}</td></tr>`);
    }
  }
  return out.join("");
}

async function jobView(id) {
  const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
  const m = job.metrics;
  let body = `<h2>Job ${esc(job.id)} ${status(job.status)}</h2>
    <p>Model <a href="#/models/${esc(job.model_id)}">${esc(job.model_id)}</a> · ${bar(job.progress)}
    ${Math.round(100 * job.progress)}% · stage ${esc(job.stage)} · queue ${esc(job.queue)} · attempts ${job.attempts}</p>`;
  if (job.error) body += `<p class="error"><b>${esc(job.error.code)}</b>: ${esc(job.error.message)}</p>`;
  if (m) {
    const s = speedup(m);
    body += `<div class="cards">
      <div class="card"><div class="k">size on disk</div><div class="v" id="size-ratio">${fmt.ratio(sizeRatio(m))}</div>
        <div class="muted">${fmt.bytes(m.original.size_bytes)} → ${fmt.bytes(smallest(m))}</div></div>
      <div class="card"><div class="k">speed-up</div><div class="v">${s ? fmt.ratio(s.value) : "–"}</div>
        <div class="muted">${s ? `${esc(s.rt)}, batch ${s.batch}` : "not timed on a common runtime"}</div></div>
      <div class="card"><div class="k">MACs</div><div class="v">${fmt.ratio(m.ratios.macs)}</div></div>
      <div class="card"><div class="k">accuracy</div><div class="v">${fmt.pct(m.compressed.accuracy)}</div>
        <div class="muted">before ${fmt.pct(m.original.accuracy)}</div></div>
      <div class="card"><div class="k">agreement with the original</div><div class="v">${fmt.pct(m.compressed.agreement)}</div>
        <div class="muted">cosine ${m.compressed.cosine ?? "–"}</div></div></div>`;
    if ((m.flags || []).length) body += `<p>${m.flags.map((f) => `<span class="flag">${esc(f)}</span>`).join("")}</p>`;
    if (m.guard) {
      body += `<h3>Guard: ${m.guard.passed ? "passed" : "missed"}</h3><table><tr><th>bound</th><th>limit</th>
        <th>measured</th><th>passed</th></tr>${m.guard.checks.map((c) => `<tr><td>${esc(c.bound)}</td>
        <td class="num">${esc(c.limit)}</td><td class="num">${esc(c.measured ?? "not measured")}</td>
        <td>${c.passed ? "yes" : "no"}</td></tr>`).join("")}</table>`;
    }
    body += `<h3>Latency (median)</h3><table><tr><th>runtime</th><th>batch</th><th>original</th><th>result</th>
      <th>speed-up</th></tr>${latencyRows(m)}</table>`;
  }
  body += `<h3>Artifacts</h3><ul id="artifacts">${job.artifacts.map((a) => `<li><a href="#" data-url="${esc(a.url)}"
    data-name="${esc(a.name)}">${esc(a.name)}</a> <span class="muted">${esc(a.format)}, ${fmt.bytes(a.size_bytes)}
    ${a.label ? `· ${esc(a.label)}` : ""}</span></li>`).join("") || '<li class="muted">none yet</li>'}</ul>`;
  const png = job.artifacts.find((a) => a.name === "report.png");
  if (png) body += `<h3>Report</h3><img class="plot" id="report-png" alt="original vs result, per-layer sparsity and bits">`;
  const events = await api(`/v1/jobs/${encodeURIComponent(id)}/events`);
  body += `<h3>Events</h3><table><tr><th>time</th><th>type</th><th>message</th></tr>${events.data.slice(-40).map((e) =>
    `<tr><td>${fmt.time(e.created_at)}</td><td>${esc(e.type)}</td><td>${esc(e.message)}</td></tr>`).join("")}</table>`;
  view.innerHTML = body;
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

async function modelView(id) {
  const model = await api(`/v1/models/${encodeURIComponent(id)}`);
  const cmp = await api(`/v1/models/${encodeURIComponent(id)}/jobs/compare`);
  const front = new Set([...cmp.pareto.size, ...cmp.pareto.latency]);
  const rows = cmp.data.map((r) => `<tr><td><a href="#/jobs/${esc(r.job_id)}">${esc(r.job_id)}</a>
    ${front.has(r.job_id) ? "★" : ""}</td><td>${status(r.status)} ${esc(r.error_code || "")}</td>
    <td>${esc(r.recipe.steps.map((s) => s.method ? `${s.type}:${s.method}` : s.type).join(" → "))}</td>
    <td class="num">${fmt.ratio(r.headline.size_ratio)}</td><td class="num">${fmt.ratio(r.headline.speedup)}</td>
    <td class="num">${fmt.pct(r.headline.accuracy_after)}</td><td class="num">${fmt.pct(r.headline.agreement)}</td></tr>`);
  view.innerHTML = `<h2>Model ${esc(model.name)} <span class="muted">${esc(model.format)}, ${fmt.bytes(model.size_bytes)}</span></h2>
    <p class="muted">${esc(model.id)} · sha256 ${esc(model.sha256.slice(0, 16))}… · ★ on a Pareto front</p>
    <table><tr><th>job</th><th>status</th><th>recipe</th><th>smaller</th><th>faster</th><th>accuracy</th>
    <th>agreement</th></tr>${rows.join("") || '<tr><td colspan="7" class="muted">No measured jobs yet.</td></tr>'}</table>
    ${cmp.data.length ? '<h3>Pareto fronts</h3><img class="plot" id="pareto-png" alt="size and latency vs accuracy">' : ""}`;
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
  if (err.message !== "unauthorized") view.innerHTML = `<p class="error">${esc(err.message)}</p>`;
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
