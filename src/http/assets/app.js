// Status page: polls the JSON API every 2 s. No framework, no CDN: the node
// serves this file from its binary.
//
// Everything the API returns (series descriptions come from whoever sent the
// images) goes into the page as text, through textContent and
// createElement: nothing received is ever parsed as markup. The
// Content-Security-Policy forbids inline script, so this file holds all of it.
"use strict";

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = "biomarker-node-token";
// The token lives for this tab only: sessionStorage is gone when the tab
// closes and is not shared with other tabs or kept on disk like
// localStorage. Earlier versions kept it in localStorage: remove it.
localStorage.removeItem(TOKEN_KEY);
let token = sessionStorage.getItem(TOKEN_KEY) || "";
const thumbs = new Map(); // job id -> object URL

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const r = await fetch(path, Object.assign({}, opts, { headers }));
  if (r.status === 401) {
    $("#auth").hidden = false;
    throw new Error("this node requires a bearer token");
  }
  return r;
}

async function json(path, opts) {
  const r = await api(path, opts);
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || (body.problems || []).join("; ") || r.statusText);
  return body;
}

function text(v) { return v === null || v === undefined ? "" : String(v); }

function el(tag, cls, txt) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (txt !== undefined) e.textContent = txt;
  return e;
}

function cell(tr, v, cls) {
  const td = document.createElement("td");
  td.textContent = text(v);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(table, rows, render) {
  const body = $(table + " tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    render(tr, r);
    body.appendChild(tr);
  }
}

function since(t, from) {
  if (!t || !from) return "";
  return ((Date.parse(t) - Date.parse(from)) / 1000).toFixed(2) + " s";
}

function say(msg, isError) {
  const m = $("#message");
  m.textContent = msg;
  m.className = isError ? "error" : "";
}

async function thumbnail(job) {
  if (thumbs.has(job.id)) return thumbs.get(job.id);
  const r = await api(job.overlay);
  if (!r.ok) return null;
  const url = URL.createObjectURL(await r.blob());
  thumbs.set(job.id, url);
  return url;
}

async function renderResults(jobs) {
  // Shadow runs are in the shadow comparison, not among the results sent.
  const done = jobs.filter((j) => j.state === "done" && j.result && !j.shadow).slice(0, 8);
  const box = $("#results");
  if (!done.length) {
    box.replaceChildren(el("p", "empty", "No results yet."));
    return;
  }
  const cards = [];
  for (const j of done) {
    const card = document.createElement("div");
    card.className = "result-card";
    card.dataset.job = j.id;
    if (j.overlay) {
      const img = document.createElement("img");
      img.alt = "overlay of job " + j.id;
      const url = await thumbnail(j);
      if (url) img.src = url;
      card.appendChild(img);
    }
    const v = document.createElement("div");
    v.className = "value";
    const r = j.result;
    v.textContent = `${r.biomarker}: ${Number(r.value).toFixed(2)} ${r.unit}` + (r.risk_category ? ` (${r.risk_category})` : "");
    card.appendChild(v);
    const meta = document.createElement("div");
    meta.className = "hint";
    const ttr = j.timeline.time_to_result_s;
    meta.textContent = `${r.model} ${r.model_version} · ${r.execution_provider} · ` +
      (ttr !== null && ttr !== undefined ? `result in ${ttr.toFixed(2)} s` : j.timeline.delivery);
    card.appendChild(meta);
    cards.push(card);
  }
  box.replaceChildren(...cards);
}

let plots = []; // object URLs of the last Bland-Altman plots

function fmt(v) { return v === null || v === undefined ? "–" : Number(v).toPrecision(4); }

async function overlayImg(id, url, label) {
  const img = document.createElement("img");
  img.alt = label;
  img.title = label;
  const u = await thumbnail({ id, overlay: url });
  if (u) img.src = u;
  return img;
}

// One block per model with a candidate or shadow runs: the statistics, the
// Bland-Altman plot (an SVG the node draws) and the most discordant series
// with both overlays.
async function renderShadow(models) {
  const blocks = [];
  const urls = [];
  for (const m of models) {
    const name = encodeURIComponent(m.name);
    const r = await api(`/api/models/${name}/agreement`);
    if (!r.ok) continue;
    const a = await r.json();
    const box = el("div", "shadow-model");
    box.appendChild(el("h3", "", `${m.name}: candidate ${a.candidate_version} vs active ${m.version}`));
    const u = a.unit ? " " + a.unit : "";
    const loa = a.limits_of_agreement ? `[${fmt(a.limits_of_agreement[0])}, ${fmt(a.limits_of_agreement[1])}]${u}` : "–";
    box.appendChild(el("p", "stats",
      `n = ${a.n} · r = ${fmt(a.r)} · bias = ${fmt(a.bias)}${u} · 95% limits of agreement ${loa} · ` +
      `${a.pending} pending, ${a.unpaired} without a pair`));
    const v = a.candidate_version ? `?version=${encodeURIComponent(a.candidate_version)}` : "";
    const svg = await api(`/api/models/${name}/agreement.svg${v}`);
    if (svg.ok) {
      const img = el("img", "bland-altman");
      img.alt = `Bland-Altman plot of ${m.name} ${a.candidate_version}`;
      const url = URL.createObjectURL(await svg.blob());
      urls.push(url);
      img.src = url;
      box.appendChild(img);
    }
    if (a.worst.length) {
      box.appendChild(el("h4", "", "Where they disagree most"));
      const t = el("table", "worst");
      const head = document.createElement("tr");
      for (const h of ["Series", "Active", "Candidate", "Difference", "Active overlay", "Candidate overlay"]) head.appendChild(el("th", "", h));
      t.appendChild(head);
      for (const p of a.worst) {
        const tr = document.createElement("tr");
        cell(tr, p.series_instance_uid, "uid");
        cell(tr, fmt(p.active_value) + u);
        cell(tr, fmt(p.candidate_value) + u);
        cell(tr, fmt(p.difference) + u);
        (cell(tr, "")).appendChild(await overlayImg(p.active_job, p.active_overlay, `active, job ${p.active_job}`));
        (cell(tr, "")).appendChild(await overlayImg(p.candidate_job, p.candidate_overlay, `candidate, job ${p.candidate_job}`));
        t.appendChild(tr);
      }
      box.appendChild(t);
    }
    blocks.push(box);
  }
  const target = $("#shadow");
  if (blocks.length) target.replaceChildren(...blocks);
  else target.replaceChildren(el("p", "empty", "No candidate and no shadow runs."));
  for (const old of plots) URL.revokeObjectURL(old);
  plots = urls;
}

async function refresh() {
  try {
    const [status, series, jobs, outbox, models] = await Promise.all([
      json("/api/status"), json("/api/series?limit=50"), json("/api/jobs?limit=50"),
      json("/api/outbox?limit=100"), json("/api/models"),
    ]);
    $("#auth").hidden = true;
    $("#node-id").textContent = `${status.ae_title} · DICOM port ${status.dicom_port} · v${status.version} · up ${status.uptime_s} s`;
    const ready = $("#ready");
    ready.textContent = status.ready ? "ready" : "not ready";
    ready.className = "badge " + (status.ready ? "ok" : "bad");
    const count = (o) => Object.entries(o).map(([k, v]) => `${v} ${k}`).join(", ") || "none";
    $("#counts").textContent = `series: ${count(status.series)} · jobs: ${count(status.jobs)} · outbox: ${count(status.outbox)}`;
    fill("#series-table", series, (tr, s) => {
      cell(tr, s.series_instance_uid, "uid");
      cell(tr, s.modality);
      cell(tr, s.series_description);
      cell(tr, s.instances);
      cell(tr, s.state, "state-" + s.state);
      cell(tr, s.last_received_at);
    });
    fill("#jobs-table", jobs, (tr, j) => {
      const t = j.timeline;
      cell(tr, j.id);
      cell(tr, j.state, "state-" + j.state);
      cell(tr, j.route);
      cell(tr, j.shadow ? `${j.model} ${j.model_version} (shadow)` : j.model);
      cell(tr, j.series_instance_uid, "uid");
      cell(tr, j.result ? `${Number(j.result.value).toFixed(2)} ${j.result.unit}` : j.error, j.error ? "err" : "");
      cell(tr, since(t.completed_at, t.last_received_at));
      cell(tr, since(t.inference_finished_at, t.last_received_at));
      cell(tr, since(t.delivered_at, t.last_received_at));
      cell(tr, t.delivery, "state-" + t.delivery);
    });
    fill("#outbox-table", outbox, (tr, i) => {
      tr.dataset.item = i.id;
      cell(tr, i.id);
      cell(tr, i.destination);
      cell(tr, i.sop_instance_uid, "uid");
      cell(tr, i.state, "state-" + i.state);
      cell(tr, i.attempts);
      cell(tr, i.delivered_at);
      cell(tr, i.last_error, "err");
      const td = cell(tr, "");
      // A pending item that failed waits out its backoff; once the PACS is
      // back an administrator can send it now.
      if (i.state === "pending" && i.last_error) {
        const b = document.createElement("button");
        b.textContent = "Send now";
        b.className = "retry";
        b.onclick = () => outboxOp(i.id, "retry");
        td.appendChild(b);
      }
    });
    fill("#dead-table", outbox.filter((i) => i.state === "dead"), (tr, i) => {
      tr.dataset.item = i.id;
      cell(tr, i.id);
      cell(tr, i.destination);
      cell(tr, i.sop_instance_uid, "uid");
      cell(tr, i.attempts);
      cell(tr, i.last_error, "err");
      const td = cell(tr, "");
      for (const op of ["retry", "dismiss"]) {
        const b = document.createElement("button");
        b.textContent = op === "retry" ? "Retry" : "Dismiss";
        b.className = op;
        b.onclick = () => outboxOp(i.id, op);
        td.appendChild(b);
      }
    });
    fill("#models-table", models, (tr, m) => {
      cell(tr, m.name);
      cell(tr, m.status, m.status === "loaded" ? "state-done" : "state-failed");
      cell(tr, m.card || m.error);
      cell(tr, m.version);
      cell(tr, m.candidate_version);
      cell(tr, m.previous_version);
      cell(tr, m.execution_provider ? `${m.execution_provider} (asked ${m.execution_provider_requested})` : "");
    });
    await renderResults(jobs);
    await renderShadow(models);
  } catch (e) {
    say(e.message, true);
  }
}

async function outboxOp(id, op) {
  try {
    const item = await json(`/api/outbox/${id}/${op}`, { method: "POST" });
    say(`Outbox item ${id}: ${op} requested, now ${item.state}.`);
  } catch (e) {
    say(e.message, true);
  }
  refresh();
}

async function testRoutes() {
  const f = $("#route-file").files[0];
  const out = $("#route-result");
  if (!f) { say("Choose a DICOM file first.", true); return; }
  out.textContent = "Testing…";
  try {
    const r = await json("/api/routes/test", { method: "POST", body: await f.arrayBuffer(),
      headers: { "Content-Type": "application/dicom" } });
    const table = document.createElement("table");
    table.id = "route-result-table";
    const head = table.createTHead().insertRow();
    for (const h of ["Route", "Result", "Why"]) head.appendChild(el("th", "", h));
    table.createTBody();
    for (const o of r.routes) {
      const tr = document.createElement("tr");
      tr.dataset.route = o.route;
      cell(tr, o.route);
      cell(tr, o.matched ? "MATCH" : "no match", o.matched ? "match" : "nomatch");
      cell(tr, o.matched ? `model ${o.model} → ${o.send_to.join(", ")}` : `${o.failed_at}: ${o.reason}`);
      table.tBodies[0].appendChild(tr);
    }
    const facts = document.createElement("p");
    facts.className = "hint";
    facts.textContent = "Derived: " + Object.entries(r.derived).map(([k, v]) => `${k}=${text(v)}`).join(", ");
    out.replaceChildren(table, facts);
  } catch (e) {
    out.textContent = "";
    say(e.message, true);
  }
}

$("#route-test-btn").onclick = testRoutes;
$("#reload-btn").onclick = async () => {
  try {
    const r = await json("/api/config/reload", { method: "POST" });
    say(`Config reloaded: ${r.routes} route(s).`);
  } catch (e) {
    say("Reload refused: " + e.message, true);
  }
};
$("#token-btn").onclick = () => {
  token = $("#token").value;
  $("#token").value = "";
  sessionStorage.setItem(TOKEN_KEY, token);
  refresh();
};

refresh();
setInterval(refresh, 2000);
