// pypelinin dashboard: one page, hash routes (#/, #/pipelines, #/pipeline/ID, #/peer/ID),
// fed by the server's event stream (the overview, once a second) and its JSON API.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const STATES = ["queued", "running", "finished", "failed", "cancelled"];

let overview = null; // the latest overview: {status, throughput, router, "token required"}
let view = null; // {name, id, ...}: what the page shows
let busy = false; // a view's fetch under way (the next tick skips it)

function secsText(s) {
  if (s == null) return "—";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
const num = (n) => (n ?? 0).toLocaleString("en-US");
const badge = (state) => `<span class="badge ${esc(state)}">${esc(state)}</span>`;
const short = (id) => esc(String(id ?? "").slice(0, 12));

async function getJson(url, options) {
  const reply = await fetch(url, options);
  let body = {};
  try { body = await reply.json(); } catch (_) { /* not JSON */ }
  if (!reply.ok) throw new Error(body.error || `${reply.status} ${reply.statusText}`);
  return body;
}

// A line chart of `series` ([{cls, points: [[x, y], ...]}]) as SVG text.
// Drawn at the width of the main column (or `width`), so its text keeps its size.
function lineChart(series, { width = null, height = 160, unit = "" } = {}) {
  width = width || Math.max(260, Math.min(1240, $("#main").clientWidth - 60));
  const all = series.flatMap((s) => s.points);
  if (all.length < 2) return `<p class="muted">Collecting samples…</p>`;
  const xs = all.map((p) => p[0]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const ymax = Math.max(1, ...all.map((p) => p[1])) * 1.1;
  const L = 46, B = 18, W = width - L - 6, H = height - B - 6;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * W;
  const py = (y) => 6 + H - (y / ymax) * H;
  const lines = series.map((s) => `<polyline class="${s.cls}" points="${
    s.points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(" ")}"/>`).join("");
  const label = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + unit;
  return `<svg class="chart" viewBox="0 0 ${width} ${height}" role="img">
    <line class="axis" x1="${L}" y1="${6 + H}" x2="${L + W}" y2="${6 + H}"/>
    <line class="axis" x1="${L}" y1="6" x2="${L}" y2="${6 + H}"/>
    <text x="${L - 4}" y="14" text-anchor="end">${label(ymax)}</text>
    <text x="${L - 4}" y="${6 + H}" text-anchor="end">0</text>
    <text x="${L}" y="${height - 3}">${secsText(x1 - x0)} ago</text>
    <text x="${L + W}" y="${height - 3}" text-anchor="end">now</text>${lines}</svg>`;
}

function setBanner() {
  const banner = $("#banner");
  const live = $("#live");
  if (!overview) return;
  if (overview.error) {
    banner.className = "banner error";
    banner.textContent = overview.error;
    banner.hidden = false;
    live.className = "live down";
    live.textContent = overview.router;
    return;
  }
  live.className = "live ok";
  live.textContent = overview.router;
  const unserved = overview.status.unserved || [];
  if (unserved.length) {
    banner.className = "banner";
    banner.innerHTML = unserved.map((u) =>
      `No broker runs worker <b>${esc(u.worker)}</b>: ${num(u.jobs)} job(s) waiting for ${secsText(u["waiting secs"])}.`).join("<br>");
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
}

// ---- Overview -------------------------------------------------------------------------------

function renderOverview() {
  const main = $("#main");
  if (!overview || !overview.status) {
    main.innerHTML = `<p class="muted">${overview ? "The router cannot be reached." : "Waiting for the router…"}</p>`;
    return;
  }
  const s = overview.status;
  const p = s.pipelines;
  const m = s["last minute"];
  const cards = STATES.map((k) =>
    `<a class="card" href="#/pipelines?state=${k}"><span class="count" id="count-${k}">${num(p[k])}</span><span class="label">${k}</span></a>`).join("");
  const tp = overview.throughput || [];
  const chart = lineChart([
    { cls: "jobs", points: tp.map((t) => [t[0], t[1]]) },
    { cls: "pipes", points: tp.map((t) => [t[0], t[2]]) },
  ], { unit: "/s" });
  const workers = Object.entries(s.workers);
  const most = Math.max(1, ...workers.map(([, w]) => w.queued + w.running + w.delayed));
  const bars = workers.map(([name, w]) => {
    const pc = (n) => (100 * n / most).toFixed(2);
    return `<tr><td>${esc(name)}</td>
      <td><div class="bar" title="${w.queued} queued, ${w.running} running, ${w.delayed} retrying">
        <span class="running" style="width:${pc(w.running)}%"></span>
        <span class="queued" style="width:${pc(w.queued)}%"></span>
        <span class="delayed" style="width:${pc(w.delayed)}%"></span></div></td>
      <td class="num">${num(w.queued)}</td><td class="num">${num(w.running)}</td><td class="num">${num(w.delayed)}</td>
      <td class="num hide-narrow">${num(w.finished)}</td><td class="num hide-narrow">${num(w.failed)}</td>
      <td class="num">${num(w.brokers)}</td></tr>`;
  }).join("");
  const peers = (role) => s.peers.filter((x) => x.role === role).map((x) => {
    const load = x.load || {};
    return `<tr><td><a href="#/peer/${encodeURIComponent(x.id)}">${esc(x.host)}</a> <span class="muted">pid ${esc(x.pid)}</span>${x.gone ? ' <span class="badge failed">gone</span>' : ""}</td>
      ${role === "broker" ? `<td>${esc((x.workers || []).join(", "))}</td><td class="num">${num(x.running)} / ${num(x.slots)}</td>` : `<td class="num">${num(x.running)}</td>`}
      <td class="num">${(load["cpu percent"] ?? 0).toFixed(0)}%</td>
      <td class="num">${((load["resident memory"] ?? 0) / 1e6).toFixed(0)} MB</td></tr>`;
  }).join("") || `<tr><td colspan="5" class="muted">none</td></tr>`;
  const failures = (s["recent failures"] || []).map((f) => `<tr>
      <td class="muted">${secsText(f["secs ago"])} ago</td>
      <td>${f["pipeline id"] ? `<a class="id" href="#/pipeline/${esc(f["pipeline id"])}">${short(f["pipeline id"])}</a>` : "—"}</td>
      <td class="id">${short(f["job id"])}</td><td>${esc(f.worker)}</td><td class="error">${esc(f.error)}</td></tr>`).join("")
    || `<tr><td colspan="5" class="muted">none</td></tr>`;
  main.innerHTML = `
  <div class="grid">
    <section class="panel"><h2>Pipelines</h2><div class="cards">${cards}</div></section>
    <section class="panel"><h2>Last minute</h2><div class="cards">
      <div class="card"><span class="count" id="minute-jobs">${num(m["jobs finished"])}</span><span class="label">jobs finished</span></div>
      <div class="card"><span class="count">${num(m["jobs failed"])}</span><span class="label">jobs failed</span></div>
      <div class="card"><span class="count">${num(m["pipelines finished"])}</span><span class="label">pipelines finished</span></div>
      <div class="card"><span class="count">${num(m["pipelines failed"])}</span><span class="label">pipelines failed</span></div>
    </div></section>
    <section class="panel wide"><h2>Throughput</h2>${chart}
      <div class="legend"><span><i style="background:var(--jobs)"></i>jobs/s</span><span><i style="background:var(--pipes)"></i>pipelines/s</span>
      <span>up ${secsText(s["uptime secs"])}</span><span>${num(s["waiting requests"])} waiting requests</span></div></section>
    <section class="panel wide"><h2>Jobs by worker</h2><div class="scroll"><table id="workers">
      <thead><tr><th>worker</th><th></th><th>queued</th><th>running</th><th>retrying</th><th class="hide-narrow">finished</th><th class="hide-narrow">failed</th><th>brokers</th></tr></thead>
      <tbody>${bars || '<tr><td colspan="8" class="muted">no jobs yet</td></tr>'}</tbody></table></div>
      <div class="legend"><span><i style="background:var(--running)"></i>running</span><span><i style="background:var(--queued)"></i>queued</span><span><i style="background:var(--failed)"></i>retrying</span></div></section>
    <section class="panel"><h2>Brokers</h2><div class="scroll"><table id="brokers">
      <thead><tr><th>host</th><th>workers</th><th>jobs</th><th>CPU</th><th>memory</th></tr></thead><tbody>${peers("broker")}</tbody></table></div></section>
    <section class="panel"><h2>Pipeliners</h2><div class="scroll"><table id="pipeliners">
      <thead><tr><th>host</th><th>pipelines</th><th>CPU</th><th>memory</th></tr></thead><tbody>${peers("pipeliner")}</tbody></table></div></section>
    <section class="panel wide"><h2>Latest failures</h2><div class="scroll"><table id="failures">
      <thead><tr><th>when</th><th>pipeline</th><th>job</th><th>worker</th><th>error</th></tr></thead><tbody>${failures}</tbody></table></div></section>
  </div>`;
}

// ---- Pipelines ------------------------------------------------------------------------------

function renderPipelinesFrame() {
  const state = view.state || "";
  $("#main").innerHTML = `<h1>Pipelines</h1>
    <div class="filters">
      <select id="state-filter" aria-label="state">${["", ...STATES].map((s) =>
        `<option value="${s}"${s === state ? " selected" : ""}>${s || "every state"}</option>`).join("")}</select>
      <input id="search" type="search" placeholder="search by id" value="${esc(view.q || "")}" aria-label="search by id">
    </div>
    <div class="panel scroll"><table id="pipelines"><thead><tr><th>pipeline</th><th>state</th><th>duration</th><th class="hide-narrow">jobs</th><th>failing job</th></tr></thead>
    <tbody><tr><td colspan="5" class="muted">Loading…</td></tr></tbody></table><p id="more" class="muted"></p></div>`;
  $("#state-filter").addEventListener("change", (e) => { view.state = e.target.value; loadPipelines(); });
  $("#search").addEventListener("input", (e) => { view.q = e.target.value; loadPipelines(); });
}

async function loadPipelines() {
  const params = new URLSearchParams({ state: view.state || "", q: view.q || "", limit: "100" });
  const shown = view;
  try {
    const list = await getJson(`/api/pipelines?${params}`);
    if (view !== shown) return;
    const rows = list.pipelines.map((p) => `<tr data-id="${esc(p["pipeline id"])}">
      <td><a class="id" href="#/pipeline/${esc(p["pipeline id"])}">${esc(p["pipeline id"])}</a></td>
      <td>${badge(p.state)}</td>
      <td class="num">${p.duration != null ? secsText(p.duration) : (p["ended secs ago"] != null ? "—" : "…")}</td>
      <td class="num hide-narrow">${p.jobs ?? ""}</td>
      <td>${p.worker ? `${esc(p.worker)}: <span class="error-text">${esc(p.error)}</span>` : ""}</td></tr>`).join("");
    $("#pipelines tbody").innerHTML = rows || `<tr><td colspan="5" class="muted">no pipeline matches</td></tr>`;
    $("#more").textContent = list.more ? "Showing the newest 100; narrow the search for others." : "";
  } catch (e) {
    $("#pipelines tbody").innerHTML = `<tr><td colspan="5" class="error">${esc(e.message)}</td></tr>`;
  }
}

// ---- One pipeline ---------------------------------------------------------------------------

async function loadPipeline() {
  const shown = view;
  let p;
  try {
    p = await getJson(`/api/pipelines/${encodeURIComponent(view.id)}`);
  } catch (e) {
    if (view === shown) $("#main").innerHTML = `<h1 class="id">${esc(view.id)}</h1><p class="error-text">${esc(e.message)}</p>`;
    return;
  }
  if (view !== shown) return;
  view.data = p;
  const st = p.status;
  if (!$("#dag")) {
    $("#main").innerHTML = `<h1 class="id">${esc(p["pipeline id"])}</h1>
      <div class="grid">
        <section class="panel wide"><div class="filters"><span id="pipeline-state"></span><span id="pipeline-facts" class="muted"></span>
          <button id="cancel" class="danger">Cancel</button></div>
          <div id="cancel-message" class="message"></div>
          <div id="dag" class="dag-box"></div>
          <div class="legend">${STATES.map((s) => `<span><i style="background:var(--${s})"></i>${s}</span>`).join("")}<span><i style="background:var(--waiting)"></i>waiting for its parents</span><span>(cancelled: dropped when its pipeline failed or was cancelled)</span></div></section>
        <section class="panel"><h2>Job</h2><div id="job-detail" class="muted">Click a job.</div></section>
        <section class="panel"><h2>Jobs</h2><div class="scroll"><table id="jobs"><thead><tr><th>worker</th><th>state</th><th>attempts</th><th>duration</th></tr></thead><tbody></tbody></table></div></section>
      </div>`;
    $("#cancel").addEventListener("click", cancelPipeline);
    $("#dag").addEventListener("click", (e) => {
      const g = e.target.closest("g.job");
      if (g) { view.selected = g.dataset.worker; showJob(); }
    });
  }
  $("#pipeline-state").innerHTML = badge(st.state);
  const facts = [];
  if (st.duration != null) facts.push(`took ${secsText(st.duration)}`);
  if (st.worker) facts.push(`failed in ${esc(st.worker)}: ${esc(st.error)}`);
  $("#pipeline-facts").innerHTML = facts.join(" · ");
  $("#cancel").hidden = p.ended;
  $("#dag").innerHTML = p.svg || `<p class="muted">The router keeps only the outcome of an ended pipeline, and this dashboard did not see it running: its DAG cannot be drawn.</p>`;
  $("#jobs tbody").innerHTML = p.jobs.map((j) => `<tr><td>${esc(j.worker)}</td><td>${badge(j.state)}</td>
    <td class="num">${j.attempts ?? ""}</td><td class="num">${j.duration != null ? secsText(j.duration) : ""}</td></tr>`).join("");
  showJob();
}

function showJob() {
  const p = view.data;
  if (!p || !view.selected) return;
  document.querySelectorAll("#dag g.job").forEach((g) => g.classList.toggle("selected", g.dataset.worker === view.selected));
  const j = p.jobs.find((x) => x.worker === view.selected);
  if (!j) return;
  $("#job-detail").className = "";
  $("#job-detail").innerHTML = `<dl class="kv">
    <dt>worker</dt><dd>${esc(j.worker)}</dd>
    <dt>state</dt><dd>${badge(j.state)}</dd>
    <dt>job id</dt><dd class="id">${esc(j["job id"] ?? (j.ended ? "—" : "not submitted yet"))}</dd>
    <dt>attempts</dt><dd>${j.attempts ?? "—"}</dd>
    <dt>duration</dt><dd>${secsText(j.duration)}</dd>
    <dt>error</dt><dd class="error-text">${esc(j.error ?? "—")}</dd></dl>`;
}

async function cancelPipeline() {
  const id = view.id;
  if (!confirm(`Cancel pipeline ${id}? Its waiting jobs are dropped and its running jobs stopped.`)) return;
  const headers = {};
  if (overview && overview["token required"]) {
    const token = prompt("The cluster token:");
    if (token == null) return;
    headers["x-pypelinin-token"] = token;
  }
  const message = $("#cancel-message");
  $("#cancel").disabled = true;
  try {
    await getJson(`/api/pipelines/${encodeURIComponent(id)}/cancel`, { method: "POST", headers });
    message.innerHTML = `<span class="muted">Cancelled.</span>`;
  } catch (e) {
    message.innerHTML = `<span class="error-text">${esc(e.message)}</span>`;
  }
  $("#cancel").disabled = false;
  refresh(true);
}

// ---- A broker or pipeliner ------------------------------------------------------------------

async function loadPeer() {
  const shown = view;
  let data;
  try {
    data = await getJson(`/api/peers/${encodeURIComponent(view.id)}`);
  } catch (e) {
    $("#main").innerHTML = `<h1>${esc(view.id)}</h1><p class="error-text">${esc(e.message)}</p>`;
    return;
  }
  if (view !== shown) return;
  const x = data.peer;
  const h = data.history;
  const half = Math.max(260, Math.min(600, $("#main").clientWidth / 2 - 60));
  const chart = (i, unit) => lineChart([{ cls: "series0", points: h.map((s) => [s[0], s[i]]) }], { width: half, height: 120, unit });
  $("#main").innerHTML = `<h1>${esc(x.role)} on ${esc(x.host)}</h1>
    <div class="grid">
      <section class="panel wide"><dl class="kv"><dt>id</dt><dd class="id">${esc(x.id)}</dd><dt>pid</dt><dd>${esc(x.pid)}</dd>
        ${x.workers ? `<dt>workers</dt><dd>${esc(x.workers.join(", "))}</dd>` : ""}
        <dt>running</dt><dd>${num(x.running)}${x.slots ? ` of ${num(x.slots)} slots` : ""}</dd>
        <dt>last seen</dt><dd>${secsText(x["last seen secs"])} ago${x.gone ? " (gone)" : ""}</dd></dl></section>
      <section class="panel"><h2>CPU of the process</h2>${chart(1, "%")}</section>
      <section class="panel"><h2>Memory of the process</h2>${chart(2, " MB")}</section>
      <section class="panel"><h2>CPU of the host</h2>${chart(3, "%")}</section>
      <section class="panel"><h2>Memory used on the host</h2>${chart(4, "%")}</section>
    </div>`;
}

// ---- Routing and updates --------------------------------------------------------------------

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  const name = parts[0] || "overview";
  view = { name, id: parts[1] ? decodeURIComponent(parts[1]) : null, state: params.get("state") || "", q: "" };
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("current", a.dataset.nav === (name === "pipeline" ? "pipelines" : name)));
  if (name === "pipelines") renderPipelinesFrame();
  else if (name !== "overview") $("#main").innerHTML = `<p class="muted">Loading…</p>`;
  refresh(true);
}

async function refresh(now) {
  setBanner();
  if (!view) return;
  if (view.name === "overview") { renderOverview(); return; }
  if (busy && !now) return;
  busy = true;
  try {
    if (view.name === "pipelines") await loadPipelines();
    else if (view.name === "pipeline") { if (now || !view.data || !view.data.ended) await loadPipeline(); }
    else if (view.name === "peer") await loadPeer();
  } finally {
    busy = false;
  }
}

function connect() {
  const source = new EventSource("/api/events");
  source.addEventListener("overview", (e) => {
    overview = JSON.parse(e.data);
    refresh(false);
  });
  source.onerror = () => {
    const live = $("#live");
    live.className = "live down";
    live.textContent = "reconnecting…";
  };
}

window.addEventListener("hashchange", route);
route();
connect();
