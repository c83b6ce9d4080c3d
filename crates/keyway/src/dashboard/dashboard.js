// keyway dashboard: polls /status and renders it; actions call the admin API.
//
// Everything from /status (backend ids, plugin names, `by` fields, reasons) is rendered
// with textContent and DOM calls only: those strings come from configs, peers and
// plugins. The admin token is typed by the operator, kept in sessionStorage (this tab
// only) and sent as `Authorization: Bearer`, never in a URL.
"use strict";

(function () {
  const POLL_MS = 1500;
  const TOKEN_KEY = "keyway-admin-token";
  // Previous counters per "cluster/backend", for requests/s and the error rate.
  const previous = new Map();
  let last = null;
  let timer = null;
  // A press on a button must not meet a re-rendered button on release: while the
  // pointer is down, polls update nothing.
  let pressed = false;

  // === DOM helpers (text only) ===

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "onclick") e.addEventListener("click", v);
      else e.setAttribute(k, String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function badge(text, cls) {
    return el("span", { class: "badge " + (cls || "") }, text);
  }

  function when(ms) {
    if (!ms) return "—";
    const d = new Date(ms);
    const ago = Math.round((Date.now() - ms) / 1000);
    const rel = ago < 0 ? "" : ago < 90 ? ` (${ago}s ago)` : ago < 5400 ? ` (${Math.round(ago / 60)}m ago)` : "";
    return d.toLocaleTimeString() + rel;
  }

  function path(...parts) {
    return parts.map((p) => encodeURIComponent(p)).join("/");
  }

  // === token ===

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function showTokenState() {
    document.getElementById("token-state").textContent = token()
      ? "token set for this tab"
      : "no token (kept in this tab only)";
  }

  // === actions ===

  function showResult(ok, text) {
    const r = document.getElementById("result");
    r.hidden = false;
    r.className = "result " + (ok ? "ok" : "err");
    r.textContent = text;
  }

  async function act(question, url) {
    if (!window.confirm(question)) return;
    const headers = { "keyway-operator": "dashboard" };
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    try {
      const resp = await fetch(url, { method: "POST", headers, cache: "no-store" });
      const body = (await resp.text()).trim();
      let hint = "";
      if (resp.status === 401 || resp.status === 403) {
        hint = "\nType the admin token (the content of [admin] token_file) above and try again.";
      }
      showResult(resp.ok, `${resp.status} ${resp.statusText}: ${body}${hint}`);
    } catch (e) {
      showResult(false, "the admin API did not answer: " + e);
    }
    poll();
  }

  // === rendering ===

  function rates(key, b, now) {
    const errors = (b.responses_5xx || 0) + (b.connect_errors || 0);
    const prev = previous.get(key);
    previous.set(key, { at: now, requests: b.requests || 0, errors });
    if (!prev || now <= prev.at) return { rps: null, err: null };
    const dt = (now - prev.at) / 1000;
    const dr = Math.max(0, (b.requests || 0) - prev.requests);
    const de = Math.max(0, errors - prev.errors);
    return { rps: dr / dt, err: dr > 0 ? de / dr : de > 0 ? 1 : 0 };
  }

  function checksCell(h) {
    const checks = (h && h.last_checks) || [];
    if (!checks.length) return el("td", {}, el("span", { class: "muted" }, "no active checks"));
    const strip = el("span", { class: "checks" });
    for (const c of checks.slice().reverse()) {
      const what = c.ok ? `ok ${c.status ?? ""}` : `failed: ${c.error ?? c.status ?? ""}`;
      strip.append(el("span", { class: c.ok ? "" : "fail", title: `${when(c.at_unix_ms)} ${what}, ${(c.latency_us / 1000).toFixed(1)} ms` }));
    }
    const latest = checks[0];
    const lag = latest.lag_ms ?? h.lag_ms;
    return el(
      "td",
      {},
      strip,
      ` ${(latest.latency_us / 1000).toFixed(1)} ms`,
      lag !== null && lag !== undefined ? `, lag ${lag} ms` : ""
    );
  }

  function backendRow(cluster, b, demo, now) {
    const key = cluster.name + "/" + b.id;
    const h = b.health || {};
    const health = h.health || "unknown";
    const fenced = !!h.fenced || b.role === "fenced";
    const r = rates(key, b, now);
    const stopped = demo && demo.some((d) => d.cluster === cluster.name && d.backend === b.id && !d.running);
    const actions = el("td", { class: "actions" });
    if (b.drain) {
      actions.append(el("button", { type: "button", class: "action undrain", onclick: () =>
        act(`Undrain ${b.id} in ${cluster.name}? It takes new sessions again.`, `/clusters/${path(cluster.name)}/backends/${path(b.id)}/undrain`) }, "Undrain"));
    } else {
      actions.append(el("button", { type: "button", class: "action drain", onclick: () =>
        act(`Drain ${b.id} in ${cluster.name}? It takes no new sessions; pinned ones stay.`, `/clusters/${path(cluster.name)}/backends/${path(b.id)}/drain`) }, "Drain"));
    }
    if (cluster.strategy === "primary-replica" && cluster.primary !== b.id) {
      actions.append(" ", el("button", { type: "button", class: "action promote", onclick: () =>
        act(`Promote ${b.id} to primary of ${cluster.name}? Writes move to it after the current primary drains.`, `/clusters/${path(cluster.name)}/promote/${path(b.id)}`) }, "Promote"));
    }
    const drainText = b.drain
      ? el("span", {}, badge("drained", "drained"), ` by ${b.drain.by} ${when(b.drain.since_unix_ms)}`,
          b.drain.holding_clients ? `, ${b.drain.holding_clients} pinned` : "")
      : "";
    return el(
      "tr",
      { "data-backend": key, "data-health": health, "data-drained": b.drain ? "yes" : "no", "data-fenced": fenced ? "yes" : "no" },
      el("td", {}, el("b", {}, b.id), el("div", { class: "muted" }, b.address)),
      el("td", { class: "health" }, badge(health, health), stopped ? badge("stopped", "stopped") : null,
        el("div", { class: "muted reason" }, h.reason || "")),
      el("td", { class: "role" }, b.role ? badge(b.role, b.role) : el("span", { class: "muted" }, `priority ${b.priority}, weight ${b.weight}`)),
      el("td", { class: "fenced" }, fenced ? badge("fenced", "fenced") : "no"),
      el("td", { class: "drain" }, drainText || "no"),
      el("td", { class: "num in-flight" }, b.in_flight),
      el("td", { class: "num rps" }, r.rps === null ? "…" : r.rps.toFixed(1)),
      el("td", { class: "num errors" }, r.err === null ? "…" : (r.err * 100).toFixed(1) + "%"),
      checksCell(h),
      actions
    );
  }

  function historyKind(reason) {
    if (/failback/i.test(reason)) return "failback";
    if (/manual promotion/i.test(reason)) return "switchover";
    if (/promoted/i.test(reason)) return "promotion";
    if (/^imported/i.test(reason)) return "import";
    return "";
  }

  function clusterPanel(c, coord, demo, now) {
    const topo = (coord && coord.clusters && coord.clusters[c.name]) || null;
    const title = el("h2", {}, c.name, el("span", { class: "muted" }, `${c.strategy}, ${c.balance}`));
    if (c.strategy === "primary-replica") {
      title.append(el("span", {}, "primary ", c.primary ? badge(c.primary, "primary") : badge("none (switching)", "unhealthy"), ` epoch ${c.epoch}`));
      title.append(el("button", { type: "button", class: "action failback", onclick: () =>
        act(`Fail back ${c.name} to its configured primary?`, `/clusters/${path(c.name)}/failback`) }, "Failback"));
    }
    const table = el(
      "table",
      {},
      el("thead", {}, el("tr", {}, ...["backend", "health", "role", "fenced", "drained", "in-flight", "req/s", "errors", "last checks", ""]
        .map((t, i) => el("th", { class: i >= 5 && i <= 7 ? "num" : "" }, t)))),
      el("tbody", {}, ...c.backends.map((b) => backendRow(c, b, demo, now)))
    );
    const panel = el("section", { class: "panel cluster", "data-cluster": c.name }, title, table);
    if (topo && (topo.history || []).length) {
      panel.append(el("h3", {}, "Decisions"));
      panel.append(el("table", { class: "history" },
        el("thead", {}, el("tr", {}, ...["epoch", "kind", "primary", "fenced", "when", "by", "why"].map((t) => el("th", {}, t)))),
        el("tbody", {}, ...topo.history.slice().reverse().map((t) => el("tr", {},
          el("td", { class: "num" }, t.epoch), el("td", {}, historyKind(t.reason || "")),
          el("td", {}, t.primary ?? "none (draining)"), el("td", {}, (t.fenced || []).join(", ") || "—"),
          el("td", {}, when(t.unix_ms)), el("td", {}, t.by ?? "this instance"), el("td", { class: "reason" }, t.reason || ""))))));
    }
    if ((c.plugins || []).length) {
      panel.append(el("h3", {}, "Plugins"));
      panel.append(el("table", { class: "plugins" },
        el("thead", {}, el("tr", {}, ...["kind", "name", "sha256", "loaded", "calls", "errors"].map((t) => el("th", {}, t)))),
        el("tbody", {}, ...c.plugins.map((p) => el("tr", {},
          el("td", {}, p.kind), el("td", { title: p.path }, p.name), el("td", { title: p.sha256 }, String(p.sha256 || "").slice(0, 16)),
          el("td", {}, when(p.loaded_at_unix_ms)), el("td", { class: "num" }, p.calls), el("td", { class: "num" }, p.errors))))));
    }
    return panel;
  }

  function coordination(coord) {
    const dl = document.getElementById("coordination");
    const facts = [];
    if (!coord) {
      facts.push(["store", "unknown"]);
    } else if (coord.kind === "etcd") {
      facts.push(["store", "etcd " + (coord.endpoints || []).join(", ")]);
      facts.push(["etcd connected", coord.connected ? "yes" : "NO"]);
      facts.push(["instance", coord.instance]);
      facts.push(["leader", coord.leader ?? "none"]);
      facts.push(["this instance decides", coord.decides ? "yes" : "no"]);
      facts.push(["instances", (coord.instances || []).join(", ")]);
      if (coord.last_error) facts.push(["last error", coord.last_error]);
    } else {
      facts.push(["store", "state file " + (coord.file || "")]);
      facts.push(["this instance decides", coord.decides ? "yes" : "no"]);
    }
    const p = (coord && coord.write_permit) || {};
    facts.push(["write lease", p.held ? `held (${p.by}${p.remaining_ms !== undefined ? `, ${p.remaining_ms} ms left` : ""})` : `NOT held (${p.by || "none"}): writes are refused`]);
    dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  function demoPanel(demo) {
    const panel = document.getElementById("demo");
    panel.hidden = !demo;
    if (!demo) return;
    const list = document.getElementById("demo-backends");
    list.replaceChildren(...demo.map((d) => {
      const name = `${d.cluster}/${d.backend}`;
      const action = d.running ? "stop" : "start";
      return el("div", { "data-demo": name }, d.running ? badge("running", "healthy") : badge("stopped", "stopped"), name,
        el("button", { type: "button", class: "action demo-" + action, onclick: () =>
          act(`${d.running ? "Stop" : "Start"} the demo backend ${name}?`, `/demo/backends/${path(d.cluster)}/${path(d.backend)}/${action}`) },
          d.running ? "Stop" : "Start"));
    }));
  }

  function render(status) {
    const now = Date.now();
    coordination(status.coordination);
    demoPanel(status.demo);
    const clusters = document.getElementById("clusters");
    clusters.replaceChildren(...status.clusters.map((c) => clusterPanel(c, status.coordination, status.demo, now)));
  }

  // === polling ===

  async function poll() {
    clearTimeout(timer);
    const live = document.getElementById("live");
    try {
      const resp = await fetch("/status", { cache: "no-store" });
      if (!resp.ok) throw new Error(`/status answered ${resp.status}`);
      last = await resp.json();
      if (!pressed) render(last);
      live.className = "live ok";
      live.textContent = "live, " + new Date().toLocaleTimeString();
    } catch (e) {
      live.className = "live stale";
      live.textContent = "not updating: " + e.message;
    }
    timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = document.getElementById("token");
      if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      input.value = "";
      showTokenState();
    });
    document.getElementById("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenState();
    });
    document.getElementById("reload").addEventListener("click", () =>
      act("Reload the configuration file? A configuration that fails to build changes nothing.", "/reload"));
    document.addEventListener("pointerdown", () => { pressed = true; });
    document.addEventListener("pointerup", () => setTimeout(() => { pressed = false; }, 0));
    document.addEventListener("pointercancel", () => { pressed = false; });
    showTokenState();
    poll();
  });
})();
