// The "Cluster" card: cluster-wide series, jobs and outbox from
// /api/cluster, polled every 2 s. Shown only while that answers 200 (an
// embedded node answers 404: no card). Used by the node's status page
// (beside app.js) and by a receiver's page (alone). Text only, through
// textContent, as app.js.
"use strict";

(() => {
  const TOKEN_KEY = "biomarker-node-token";
  const section = document.querySelector("#cluster-section");
  const box = document.querySelector("#cluster");
  // A receiver's page has its own token box; the node's page uses app.js'.
  const auth = document.querySelector("#cluster-auth");

  function row(label, counts) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = label;
    tr.appendChild(th);
    const td = document.createElement("td");
    td.textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(" · ");
    tr.appendChild(td);
    return tr;
  }

  async function refresh() {
    const token = sessionStorage.getItem(TOKEN_KEY) || "";
    const headers = token ? { Authorization: "Bearer " + token } : {};
    let r;
    try {
      r = await fetch("/api/cluster", { headers });
    } catch (e) {
      section.hidden = true;
      return;
    }
    if (auth) auth.hidden = r.status !== 401;
    if (r.status !== 200) {
      section.hidden = true;
      return;
    }
    const c = await r.json();
    const table = document.createElement("table");
    table.appendChild(row("Series", c.series));
    table.appendChild(row("Jobs", c.jobs));
    table.appendChild(row("Outbox", c.outbox));
    const note = document.createElement("p");
    note.className = c.error ? "err" : "hint";
    note.textContent = `This process: ${c.role} ${c.id} · counts ${c.age_s} s old` +
      (c.error ? ` · last refresh failed: ${c.error}` : "");
    box.replaceChildren(table, note);
    section.hidden = false;
    const id = document.querySelector("#cluster-id");
    if (id) id.textContent = `${c.role} · ${c.id}`;
  }

  const btn = document.querySelector("#cluster-token-btn");
  if (btn) {
    btn.onclick = () => {
      const input = document.querySelector("#cluster-token");
      sessionStorage.setItem(TOKEN_KEY, input.value);
      input.value = "";
      refresh();
    };
  }
  refresh();
  setInterval(refresh, 2000);
})();
