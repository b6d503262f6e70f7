// Nexus dashboard: keeps the server-rendered page live.
//
// The page arrives complete (rendered on the server, with the same data embedded as JSON in
// #initial-data). This script re-renders it from that data, then follows /ws: BackendStatus,
// ModelChange, RequestComplete and StatsUpdate (see docs/api.md). When the socket drops it
// reconnects after 3, 6, 12, 24 and 48 s, then polls /v1/stats and /v1/history every 5 s
// while retrying the socket every 60 s.
//
// Every value from the server is put into the page with textContent or setAttribute, never
// as HTML: a backend or model name cannot inject markup.
"use strict";

(() => {
  const RECONNECT_DELAYS = [3, 6, 12, 24, 48]; // seconds, then RECONNECT_CAP
  const RECONNECT_CAP = 60;
  const POLL_MS = 5000;
  const HISTORY_LIMIT = 100;
  const BACKEND_STATUSES = ["healthy", "unhealthy", "unknown", "loading", "draining"];
  const OUTCOMES = ["Success", "Error", "Cancelled", "Interrupted"];
  const BUDGET_STATUSES = ["Normal", "SoftLimit", "HardLimit"];
  const CAPABILITIES = [["vision", "vision"], ["tools", "tools"], ["json_mode", "json"], ["embeddings", "embeddings"]];

  const state = { stats: null, backends: [], history: [], lastPoll: null };
  let socket = null;
  let attempt = 0;
  let connectedOnce = false;
  let pollTimer = null;
  let reconnectTimer = null;

  // -- DOM helpers ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  }

  function oneOf(value, allowed, fallback) {
    return allowed.includes(value) ? value : fallback;
  }

  // -- formatting -----------------------------------------------------------------------

  function duration(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function uptime(seconds) {
    seconds = Math.floor(seconds || 0);
    const d = Math.floor(seconds / 86400), h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m`;
    return `${m}m ${s}s`;
  }

  function percent(fraction) {
    return fraction === null || fraction === undefined ? "—" : `${(fraction * 100).toFixed(1)}%`;
  }

  function clock(timestamp) {
    return new Date(timestamp * 1000).toLocaleTimeString([], { hour12: false });
  }

  function money(value, digits) {
    return value === null || value === undefined ? "—" : `$${Number(value).toFixed(digits)}`;
  }

  // -- rendering ------------------------------------------------------------------------

  function modelRows(backends) {
    const rows = new Map();
    for (const backend of backends) {
      for (const model of backend.models || []) {
        let row = rows.get(model.id);
        if (!row) {
          row = { id: model.id, context_length: null, backends: new Set() };
          for (const [cap] of CAPABILITIES) row[cap] = false;
          rows.set(model.id, row);
        }
        if (model.context_length) row.context_length = Math.max(row.context_length || 0, model.context_length);
        for (const [cap] of CAPABILITIES) row[cap] = row[cap] || Boolean(model[cap]);
        row.backends.add(backend.id);
      }
    }
    return [...rows.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  }

  function renderSummary() {
    const stats = state.stats;
    const backends = state.backends;
    if (stats) {
      setText("sum-uptime", uptime(stats.uptime_seconds));
      setText("sum-requests", String(stats.requests.total));
      let rps = null, errorRate = null;
      if (stats.recent) {
        rps = stats.recent.requests_per_second;
        errorRate = stats.recent.error_rate;
      } else if (state.lastPoll) { // polling: rates from the change since the last poll
        const seconds = (Date.now() - state.lastPoll.at) / 1000;
        const done = stats.requests.total - state.lastPoll.total;
        rps = seconds > 0 ? done / seconds : 0;
        errorRate = done > 0 ? (stats.requests.errors - state.lastPoll.errors) / done : 0;
      }
      setText("sum-rps", rps === null ? "—" : rps.toFixed(2));
      setText("sum-errors", percent(errorRate));
    }
    const healthy = backends.filter((b) => b.status === "healthy").length;
    setText("sum-backends", `${healthy} / ${backends.length}`);
    setText("sum-models", String(modelRows(backends).length));
  }

  function renderBudget(budget) {
    const box = document.getElementById("budget");
    if (!box || budget === undefined) return; // undefined: this update says nothing about the budget
    if (budget === null) {
      box.replaceChildren(el("p", { class: "muted" }, "No limit configured."));
      return;
    }
    const status = oneOf(budget.status, BUDGET_STATUSES, "Normal");
    const utilization = Number(budget.utilization_percent || 0);
    box.replaceChildren(
      el("p", { class: "big" }, el("span", { id: "budget-spend" }, money(budget.current_spending_usd || 0, 2)), " ",
        el("span", { class: "muted" }, `of ${money(budget.monthly_limit_usd || 0, 2)}`)),
      el("meter", { min: 0, max: 100, low: 75, high: 100, optimum: 0, value: Math.min(utilization, 100) }),
      el("dl", { class: "facts" },
        el("dt", null, "Utilization"), el("dd", null, `${utilization.toFixed(1)}%`),
        el("dt", null, "Status"), el("dd", null, el("span", { class: `badge budget-${status}` }, status)),
        el("dt", null, "Month"), el("dd", null, budget.billing_month || "—")),
    );
  }

  function renderQueue(queue) {
    const box = document.getElementById("queue");
    if (!box || !queue) return;
    const depth = queue.depth || {};
    const waiting = Object.values(depth).reduce((sum, n) => sum + n, 0);
    box.replaceChildren(
      el("p", { class: "big" }, el("span", { id: "queue-depth" }, String(waiting)), " ",
        el("span", { class: "muted" }, `waiting of ${queue.max_size}${queue.enabled ? "" : " (queue off)"}`)),
      el("dl", { class: "facts" },
        el("dt", null, "High priority"), el("dd", null, String(depth.high || 0)),
        el("dt", null, "Normal priority"), el("dd", null, String(depth.normal || 0)),
        el("dt", null, "Dispatched"), el("dd", null, String(queue.dispatched)),
        el("dt", null, "Timed out"), el("dd", null, String(queue.timed_out)),
        el("dt", null, "Refused (full)"), el("dd", null, String(queue.rejected_full))),
    );
  }

  function backendCard(b) {
    const status = oneOf(b.status, BACKEND_STATUSES, "unknown");
    const q = b.quality;
    const pending = b.max_concurrent ? `${b.pending} / ${b.max_concurrent}` : String(b.pending);
    const facts = [
      ["Zone", b.zone], ["Tier", b.tier], ["Source", b.source], ["Pending", pending],
      ["Requests", b.total_requests], ["Latency", duration(b.avg_latency_ms)],
      ["TTFT (1 h)", q && q.avg_ttft_ms ? duration(q.avg_ttft_ms) : "—"],
      ["Error rate (1 h)", q ? percent(q.error_rate_1h) : "—"],
    ];
    const list = el("dl", { class: "facts" });
    for (const [label, value] of facts) list.append(el("dt", null, label), el("dd", null, String(value ?? "—")));
    const chips = el("ul", { class: "chips" });
    for (const model of b.models || []) chips.append(el("li", null, model.id));
    return el("article", { class: "card backend", "data-id": b.id },
      el("header", { class: "card-head" }, el("h3", { title: b.id }, b.name),
        el("span", { class: `badge status-${status}` }, status)),
      el("p", { class: "muted url" }, `${b.url || ""} · ${b.type || ""}`),
      list, chips,
      b.last_error ? el("p", { class: "error" }, b.last_error) : null);
  }

  function renderBackends() {
    const box = document.getElementById("backends");
    if (!box) return;
    if (!state.backends.length) {
      box.replaceChildren(el("p", { class: "muted empty" }, "No backends configured."));
      return;
    }
    box.replaceChildren(...state.backends.map(backendCard));
  }

  function renderMatrix() {
    const box = document.getElementById("matrix");
    if (!box) return;
    const rows = modelRows(state.backends);
    if (!rows.length) {
      box.replaceChildren(el("p", { class: "muted empty" }, "No models available."));
      return;
    }
    const head = el("tr", null, el("th", { scope: "col" }, "Model"), el("th", { scope: "col" }, "Context"),
      el("th", { scope: "col" }, "Capabilities"));
    for (const b of state.backends) head.append(el("th", { scope: "col", title: b.id }, b.name));
    const body = el("tbody");
    for (const row of rows) {
      const caps = el("td");
      for (const [cap, label] of CAPABILITIES) if (row[cap]) caps.append(el("span", { class: "badge cap" }, label));
      const tr = el("tr", null, el("th", { scope: "row" }, row.id), el("td", null, row.context_length || "—"), caps);
      for (const b of state.backends) {
        tr.append(el("td", { class: "cell" },
          row.backends.has(b.id) ? el("span", { class: "yes", title: `${b.name} serves ${row.id}` }, "✓") : null));
      }
      body.append(tr);
    }
    box.replaceChildren(el("table", { class: "matrix" }, el("thead", null, head), body));
  }

  function historyRow(e) {
    const status = oneOf(e.status, OUTCOMES, "Error");
    const names = new Map(state.backends.map((b) => [b.id, b.name]));
    const model = el("td", null, e.model);
    if (e.resolved_model && e.resolved_model !== e.model) model.append(" ", el("span", { class: "muted" }, `→ ${e.resolved_model}`));
    if (e.stream) model.append(" ", el("span", { class: "badge cap" }, "stream"));
    const outcome = el("td", null, el("span", { class: `badge outcome-${status}` }, e.status_code ? `${status} ${e.status_code}` : status));
    if (e.error_message) outcome.append(el("div", { class: "err", title: e.error_message }, e.error_message));
    const tokens = e.prompt_tokens !== null || e.completion_tokens !== null
      ? `${e.prompt_tokens || 0} / ${e.completion_tokens || 0}` : "—";
    return el("tr", { class: `row-${status}`, "data-request-id": e.request_id },
      el("td", { title: new Date(e.timestamp * 1000).toISOString() }, clock(e.timestamp)),
      model,
      el("td", { title: e.backend_id }, names.get(e.backend_id) || e.backend_id),
      el("td", null, e.route_reason || "—"),
      outcome,
      el("td", null, duration(e.duration_ms)),
      el("td", null, duration(e.ttft_ms)),
      el("td", null, tokens),
      el("td", null, money(e.cost_usd, 4)));
  }

  function renderHistory() {
    const body = document.getElementById("history-body");
    if (!body) return;
    if (!state.history.length) {
      body.replaceChildren(el("tr", { class: "empty" }, el("td", { colspan: 9, class: "muted" }, "No requests yet.")));
      return;
    }
    body.replaceChildren(...state.history.slice().reverse().map(historyRow));
  }

  function addHistory(entry) {
    state.history.push(entry);
    if (state.stats) { // the total moves at once; the rest waits for the next StatsUpdate
      state.stats.requests.total += 1;
      setText("sum-requests", String(state.stats.requests.total));
    }
    if (state.history.length > HISTORY_LIMIT) state.history.splice(0, state.history.length - HISTORY_LIMIT);
    const body = document.getElementById("history-body");
    if (!body) return;
    for (const row of body.querySelectorAll("tr.empty")) row.remove();
    body.prepend(historyRow(entry));
    while (body.rows.length > HISTORY_LIMIT) body.deleteRow(-1);
  }

  function applyStats(stats) {
    const known = new Map(state.backends.map((b) => [b.id, b]));
    const merged = [];
    for (const s of stats.backends || []) {
      const b = known.get(s.id) || { id: s.id, name: s.name, type: s.type, url: "", models: [] };
      Object.assign(b, {
        name: s.name, status: s.status, source: s.source, zone: s.zone, tier: s.tier,
        pending: s.pending, max_concurrent: s.max_concurrent, total_requests: s.requests,
        avg_latency_ms: s.average_latency_ms, quality: s.quality || null,
      });
      merged.push(b);
    }
    state.backends = merged;
    state.stats = stats;
    renderSummary();
    renderBudget(stats.budget);
    renderQueue(stats.queue);
    renderBackends();
  }

  function renderAll() {
    renderBackends();
    renderMatrix();
    renderSummary();
    renderHistory();
    if (state.stats) {
      renderBudget(state.stats.budget);
      renderQueue(state.stats.queue);
    }
  }

  // -- live updates ---------------------------------------------------------------------

  function setConnection(kind, text) {
    const node = document.getElementById("conn");
    if (!node) return;
    node.dataset.state = kind;
    node.textContent = text;
  }

  function onMessage(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    const data = message.data;
    switch (message.update_type) {
      case "BackendStatus":
        state.backends = data;
        renderBackends();
        renderMatrix();
        renderSummary();
        break;
      case "ModelChange": {
        const backend = state.backends.find((b) => b.id === data.backend_id);
        if (backend) backend.models = data.models;
        renderBackends();
        renderMatrix();
        renderSummary();
        break;
      }
      case "RequestComplete":
        addHistory(data);
        break;
      case "StatsUpdate":
        applyStats(data);
        break;
      default:
        break; // a newer server may send more types
    }
  }

  async function getJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    if (!response.ok) throw new Error(`${path}: ${response.status}`);
    return response.json();
  }

  async function refreshHistory() {
    try {
      state.history = (await getJSON("/v1/history")).slice(-HISTORY_LIMIT);
      renderHistory();
    } catch {
      // the next poll or reconnect tries again
    }
  }

  async function poll() {
    try {
      const [stats, history] = await Promise.all([getJSON("/v1/stats"), getJSON("/v1/history")]);
      applyStats(stats);
      state.lastPoll = { at: Date.now(), total: stats.requests.total, errors: stats.requests.errors };
      state.history = history.slice(-HISTORY_LIMIT);
      renderHistory();
      renderMatrix();
      if (!socket) setConnection("polling", "polling every 5 s");
    } catch {
      if (!socket) setConnection("error", "server unreachable");
    }
  }

  function startPolling() {
    if (pollTimer === null) {
      pollTimer = setInterval(poll, POLL_MS);
      poll();
    }
  }

  function stopPolling() {
    if (pollTimer !== null) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
    state.lastPoll = null;
  }

  function scheduleReconnect() {
    const delay = attempt < RECONNECT_DELAYS.length ? RECONNECT_DELAYS[attempt] : RECONNECT_CAP;
    attempt += 1;
    if (attempt > RECONNECT_DELAYS.length) startPolling();
    if (pollTimer === null) setConnection("disconnected", `disconnected, retrying in ${delay} s`);
    reconnectTimer = setTimeout(connect, delay * 1000);
  }

  function connect() {
    reconnectTimer = null;
    if (pollTimer === null) setConnection("connecting", "connecting…");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    let ws;
    try {
      ws = new WebSocket(`${scheme}${location.host}/ws`);
    } catch {
      scheduleReconnect();
      return;
    }
    ws.addEventListener("open", () => {
      socket = ws;
      attempt = 0;
      stopPolling();
      setConnection("live", "live");
      if (connectedOnce) refreshHistory(); // requests that ended while we were away
      connectedOnce = true;
    });
    ws.addEventListener("message", onMessage);
    ws.addEventListener("close", () => {
      if (socket === ws) socket = null;
      if (reconnectTimer === null) scheduleReconnect();
    });
  }

  function start() {
    const initial = document.getElementById("initial-data");
    if (initial) {
      try {
        const data = JSON.parse(initial.textContent);
        state.stats = data.stats;
        state.backends = data.backends || [];
        state.history = data.history || [];
      } catch {
        // keep the server-rendered page as it is
      }
    }
    setText("history-time", "Time");
    renderAll();
    document.getElementById("history-body")?.addEventListener("click", (event) => {
      const row = event.target instanceof Element ? event.target.closest("tr") : null;
      if (row) row.classList.toggle("expanded"); // shows a long error message in full
    });
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
