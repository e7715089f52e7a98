// Weft's web UI: pages over the REST API (/v1/...), refreshed every two
// seconds. No framework and no build: the RM serves these files from its
// binary. Text goes into the page only through textContent (never HTML).
"use strict";

const REFRESH_MS = 2000;
const ui = {
  token: localStorage.getItem("weft-token") || "",
  timer: null,
  logs: null,
  page: "",
  gen: 0, // the latest refresh: an older one that ends later renders nothing
  armed: null, // the application whose Kill was clicked once
  whoKnown: false, // whoami answered for the token in use
};

// ---- small helpers --------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "onclick") e.addEventListener("click", v);
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's CSP

    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}
const cores = (milli) => `${+(milli / 1000).toFixed(3)}`;
const big = (v) => v >= 9e15; // "no maximum"
function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86400)}d ago`;
}
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "");
function bar(frac) {
  const pct = Math.max(0, Math.min(1, frac || 0)) * 100;
  return el("div", { class: "bar", title: `${pct.toFixed(0)}%` }, el("span", { style: `width:${pct}%` }));
}
const state = (s) => el("span", { class: `state ${s}` }, s);
function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}
function card(k, v) {
  return el("div", { class: "card" }, el("div", { class: "k" }, k), el("div", { class: "v" }, v));
}

function headers() {
  return ui.token ? { Authorization: `Bearer ${ui.token}` } : {};
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ headers: headers() }, opts || {}));
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!r.ok) {
    const msg = body && body.message ? body.message : `${r.status} ${r.statusText}`;
    const e = new Error(msg);
    e.status = r.status;
    throw e;
  }
  return body;
}

function showError(e) {
  const box = document.getElementById("error");
  if (!e) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.textContent = e.status === 401
    ? `${e.message} (enter a token above)`
    : e.message;
}

// ---- pages ------------------------------------------------------------------

async function clusterPage() {
  const [c, nodes] = await Promise.all([api("/v1/cluster"), api("/v1/nodes")]);
  const gpus = {};
  for (const n of nodes.nodes) {
    for (const g of n.capacity.gpus) {
      const k = `${g.model} (${bytes(g.memory_bytes)})`;
      gpus[k] = (gpus[k] || 0) + 1;
    }
  }
  const byState = {};
  for (const n of nodes.nodes) byState[n.state] = (byState[n.state] || 0) + 1;
  return [
    el("h1", {}, "Cluster"),
    el("div", { class: "cards" },
      card("leader", c.leader_id ? `member ${c.leader_id}` : "none yet"),
      card("term", c.term),
      card("commit / applied", `${c.commit_index} / ${c.applied_index}`),
      card("nodes running", c.nodes),
      card("vcores used", `${cores(c.used.vcores_milli)} of ${cores(c.capacity.vcores_milli)}`),
      card("memory used", `${bytes(c.used.memory_bytes)} of ${bytes(c.capacity.memory_bytes)}`),
      card("GPUs used", `${c.used.gpus} of ${c.capacity.gpus}`)),
    el("h2", {}, "Members"),
    table(["id", "address", "HTTP", "role"], c.members.map((m) =>
      el("tr", {},
        el("td", {}, m.id),
        el("td", {}, m.address),
        el("td", {}, m.http_url || el("span", { class: "muted" }, "—")),
        el("td", {}, m.is_leader ? "leader" : m.is_learner ? "learner" : "follower"))),
      { id: "members" }),
    el("h2", {}, "Nodes by state"),
    table(["state", "nodes"], Object.entries(byState).map(([s, n]) =>
      el("tr", {}, el("td", {}, state(s)), el("td", { class: "num" }, n)))),
    el("h2", {}, "GPUs by model"),
    Object.keys(gpus).length
      ? table(["model", "devices"], Object.entries(gpus).map(([m, n]) =>
          el("tr", {}, el("td", {}, m), el("td", { class: "num" }, n))))
      : el("p", { class: "muted" }, "No GPUs reported."),
  ];
}

async function queuesPage() {
  const q = await api("/v1/queues");
  const res = (r) => `${cores(r.vcores_milli)} vcores, ${bytes(r.memory_bytes)}, ${r.gpus} GPUs`;
  const lim = (r) => (big(r.vcores_milli) && big(r.memory_bytes) ? "none" : res(r));
  return [
    el("h1", {}, "Queues"),
    table(["queue", "used", "guaranteed", "use of guarantee", "maximum", "pending", "running"],
      q.queues.map((x) => {
        const g = x.guaranteed.vcores_milli;
        return el("tr", { "data-queue": x.name },
          el("td", {}, x.name),
          el("td", {}, res(x.used)),
          el("td", {}, res(x.guaranteed)),
          el("td", {}, g ? bar(x.used.vcores_milli / g) : el("span", { class: "muted" }, "—")),
          el("td", {}, lim(x.maximum)),
          el("td", { class: "num" }, x.pending_applications),
          el("td", { class: "num" }, x.running_applications));
      }), { id: "queues" }),
  ];
}

const filters = { state: "", user: "", queue: "", name: "" };

async function appsPage() {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(filters)) if (v) qs.set(k, v);
  qs.set("page_size", "500");
  const list = await api(`/v1/apps?${qs}`);
  const input = (k, ph) => {
    const i = el("input", { placeholder: ph, value: filters[k], "data-filter": k });
    i.addEventListener("change", () => { filters[k] = i.value.trim(); refresh(); });
    return i;
  };
  const sel = el("select", { "data-filter": "state" },
    ["", "active", "finished", "submitted", "accepted", "running", "succeeded", "failed", "killed"].map((s) =>
      el("option", { value: s, selected: filters.state === s }, s || "any state")));
  sel.addEventListener("change", () => { filters.state = sel.value; refresh(); });
  const apps = list.applications.slice().reverse(); // newest first
  return [
    el("h1", {}, "Applications"),
    el("div", { class: "filters" }, sel, input("user", "user"), input("queue", "queue"), input("name", "name")),
    table(["id", "name", "state", "progress", "queue", "user", "submitted"], apps.map((a) =>
      el("tr", { "data-app": a.application_id },
        el("td", {}, el("a", { href: `#/apps/${a.application_id}` }, a.application_id)),
        el("td", {}, a.name),
        el("td", {}, state(a.state)),
        el("td", {}, bar(a.progress)),
        el("td", {}, a.queue),
        el("td", {}, a.user),
        el("td", { title: when(a.submitted_at_ms) }, ago(a.submitted_at_ms)))), { id: "apps" }),
    apps.length ? null : el("p", { class: "muted" }, "No applications."),
  ];
}

function openLogs(id, container, task, live) {
  if (ui.logs) ui.logs.abort();
  const ctl = new AbortController();
  ui.logs = ctl;
  const pre = document.getElementById("logs");
  const title = document.getElementById("logs-title");
  pre.textContent = "";
  title.textContent = `Output of ${task} (${container})${live ? ", following" : ""}`;
  const qs = new URLSearchParams({ task: container, follow: live ? "true" : "false" });
  fetch(`/v1/apps/${id}/logs?${qs}`, { headers: headers(), signal: ctl.signal })
    .then(async (r) => {
      if (!r.ok) {
        const b = await r.json().catch(() => null);
        pre.textContent = b && b.message ? b.message : `${r.status}`;
        return;
      }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done || ctl.signal.aborted) break;
        pre.append(document.createTextNode(dec.decode(value, { stream: true })));
        pre.scrollTop = pre.scrollHeight;
      }
      if (live && !ctl.signal.aborted) title.textContent = `Output of ${task} (${container}), ended`;
    })
    .catch((e) => { if (e.name !== "AbortError") pre.textContent += `\n[${e.message}]`; });
}

async function appPage(id) {
  const [a, t] = await Promise.all([api(`/v1/apps/${id}`), api(`/v1/apps/${id}/tasks`)]);
  const finished = ["succeeded", "failed", "killed"].includes(a.state);
  // Why it waits or failed: the page shows the rest without it if the
  // leader cannot be asked.
  const why = a.state === "succeeded" ? null : await api(`/v1/apps/${id}/why`).catch(() => null);
  const kill = el("button", { class: "danger", id: "kill" }, ui.armed === id ? "Confirm kill" : "Kill");
  kill.addEventListener("click", async () => {
    if (ui.armed !== id) { ui.armed = id; kill.textContent = "Confirm kill"; return; }
    ui.armed = null;
    try { await api(`/v1/apps/${id}/kill`, { method: "POST" }); refresh(); } catch (e) { showError(e); }
  });
  return [
    el("h1", {}, `${a.application_id} · ${a.name} `, state(a.state), " ", finished ? null : kill),
    el("div", { class: "cards" },
      card("state", el("span", { id: "app-state", class: `state ${a.state}` }, a.state)),
      card("progress", `${Math.round(a.progress * 100)}%`),
      card("queue", a.queue),
      card("user", a.user),
      card("attempt", a.attempt),
      card("submitted", ago(a.submitted_at_ms)),
      card("finished", a.finished_at_ms ? ago(a.finished_at_ms) : "—")),
    a.diagnostics ? el("p", { id: "app-diagnostics" }, a.diagnostics) : null,
    why ? el("p", { id: "app-why", class: a.state === "failed" ? "diag" : "" }, `Why: ${why.summary}`) : null,
    why && why.waiting.length
      ? table(["waiting", "tasks", "ahead", "reason", "why"], why.waiting.map((w) =>
          el("tr", {}, el("td", {}, w.what), el("td", { class: "num" }, w.tasks),
            el("td", { class: "num" }, w.ahead), el("td", {}, w.reason), el("td", {}, w.detail))))
      : null,
    el("h2", {}, "Stages"),
    table(["stage", "done", "progress", "running", "failures"], a.stages.map((s) =>
      el("tr", { "data-stage": s.name },
        el("td", {}, s.name),
        el("td", { class: "num" }, `${s.done}/${s.total}`),
        el("td", {}, bar(s.total ? s.done / s.total : 0)),
        el("td", { class: "num" }, s.running),
        el("td", { class: "num" }, s.failed))), { id: "stages" }),
    el("h2", {}, "Tasks"),
    table(["task", "state", "node", "exit", "how it ended", "output"], t.tasks.map((x) =>
      el("tr", { "data-task": x.task, "data-container": x.container_id },
        el("td", {}, x.task),
        el("td", {}, state(x.state)),
        el("td", {}, x.node_id),
        el("td", { class: "num" }, x.state === "running" || x.state === "allocated" ? "" : x.exit_status),
        el("td", { class: "diag" }, x.state === "succeeded" ? "" : x.diagnostic),
        el("td", {}, x.state === "allocated" ? null
          : el("button", { "data-logs": x.container_id, onclick: () => openLogs(id, x.container_id, x.task, x.state === "running") },
              x.state === "running" ? "follow" : "show")))), { id: "tasks" }),
    el("h2", { id: "logs-title" }, "Output"),
    el("pre", { id: "logs" }, "Pick a task's output above."),
  ];
}

async function nodesPage() {
  const n = await api("/v1/nodes");
  return [
    el("h1", {}, "Nodes"),
    table(["node", "state", "address", "vcores used", "memory used", "GPUs", "containers", "heartbeat"],
      n.nodes.map((x) => el("tr", { "data-node": x.node_id },
        el("td", {}, x.node_id, x.ready ? null : el("span", { class: "muted" }, " (not ready)")),
        el("td", {}, state(x.state)),
        el("td", {}, x.address),
        el("td", {}, `${cores(x.used.vcores_milli)} / ${cores(x.capacity.vcores_milli)}`,
          bar(x.used.vcores_milli / (x.capacity.vcores_milli || 1))),
        el("td", {}, `${bytes(x.used.memory_bytes)} / ${bytes(x.capacity.memory_bytes)}`,
          bar(x.used.memory_bytes / (x.capacity.memory_bytes || 1))),
        el("td", {}, x.capacity.gpus.length
          ? x.capacity.gpus.map((g) => {
              const u = (x.gpu_use || []).find((v) => v.index === g.index) || {};
              const use = u.whole ? "in use (whole)"
                : u.share_milli ? `${u.share_milli / 10}% shared, ${bytes(u.share_memory_bytes)} promised`
                : "free";
              return el("div", { "data-gpu": g.index }, `#${g.index} ${g.model} ${bytes(g.memory_bytes)}: ${use}`);
            })
          : el("span", { class: "muted" }, "none")),
        el("td", { class: "num" }, x.containers),
        el("td", {}, ago(x.last_heartbeat_ms)))), { id: "nodes" }),
  ];
}

// ---- routing and refresh ----------------------------------------------------

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [page, id] = h.split("/");
  switch (page) {
    case "queues": return ["queues", queuesPage];
    case "apps": return id ? ["apps", () => appPage(decodeURIComponent(id))] : ["apps", appsPage];
    case "nodes": return ["nodes", nodesPage];
    default: return ["cluster", clusterPage];
  }
}

async function refresh(byTimer) {
  clearTimeout(ui.timer);
  const gen = ++ui.gen;
  const key = location.hash;
  // Someone typing in a filter: leave the page as it is until they are done.
  const typing = document.activeElement && document.activeElement.dataset &&
    document.activeElement.dataset.filter && document.activeElement.tagName === "INPUT";
  if (byTimer && typing) {
    ui.timer = setTimeout(() => refresh(true), REFRESH_MS);
    return;
  }
  const [page, load] = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  const main = document.getElementById("main");
  try {
    const parts = await load();
    if (gen !== ui.gen || location.hash !== key) return; // a newer refresh renders
    // Keep the log panel (a follow in progress) across refreshes.
    const logs = document.getElementById("logs");
    const title = document.getElementById("logs-title");
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.filter : null;
    main.replaceChildren(...parts.filter(Boolean));
    if (logs && ui.page === key && document.getElementById("logs")) {
      document.getElementById("logs").replaceWith(logs);
      document.getElementById("logs-title").replaceWith(title);
    }
    if (focused) {
      const f = main.querySelector(`[data-filter="${focused}"]`);
      if (f) f.focus();
    }
    main.dataset.page = page;
    main.dataset.ready = "1";
    showError(null);
    // Who the page calls as, until known (the first try may come while
    // the cluster is still making its first admin token).
    if (!ui.whoKnown) whoami();
  } catch (e) {
    if (gen !== ui.gen) return;
    showError(e);
  }
  ui.page = key;
  ui.timer = setTimeout(() => refresh(true), REFRESH_MS);
}

async function whoami() {
  try {
    const w = await api("/v1/whoami");
    document.getElementById("who").textContent = w.acl_enabled ? `${w.user}${w.admin ? " (admin)" : ""}` : "";
    ui.whoKnown = true;
  } catch (_) {
    document.getElementById("who").textContent = "";
    ui.whoKnown = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const tok = document.getElementById("token");
  tok.value = ui.token;
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    ui.token = tok.value.trim();
    ui.whoKnown = false;
    if (ui.token) localStorage.setItem("weft-token", ui.token);
    else localStorage.removeItem("weft-token");
    whoami();
    refresh();
  });
  window.addEventListener("hashchange", () => {
    if (ui.logs) { ui.logs.abort(); ui.logs = null; }
    document.getElementById("main").dataset.ready = "";
    refresh();
  });
  whoami();
  refresh();
});
