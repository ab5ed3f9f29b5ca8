// The gw dashboard: the stats series (GET /v1/stats/series, every second), the
// store's devices and alerts (the query API, paged), alerts and one device's
// readings live over MQTT over WebSocket (MQTT.js), charts with uPlot.
// Everything comes from the server that served this page; credentials (an HTTP
// token, an MQTT user and password) stay in this tab's sessionStorage.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const DEVICES_PAGE = 25;
  const ALERTS_PAGE = 50;
  const TAIL_ROWS = 50;
  const TAIL_POINTS = 600;
  const SPARK_CONCURRENCY = 4;
  const SPARK_TTL = 60000;
  const store = window.sessionStorage;
  const state = {
    config: null, after: -1, cols: null, workers: [], charts: {}, capacity: 900,
    devicePages: [""], deviceNext: null, sparkQueue: [], sparkRunning: 0, sparks: new Map(),
    alertsNext: null, client: null, tailDevice: null, tail: { t: [], series: {} },
    ready: { stats: false, devices: false, alerts: false }, timers: [],
  };

  // --- HTTP -----------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, body) {
      super(body && body.message ? body.message : `HTTP ${status}`);
      this.status = status;
      this.code = body && body.code;
    }
  }

  async function api(path, options) {
    const headers = Object.assign({}, (options && options.headers) || {});
    const token = store.getItem("gw.token");
    if (token) headers["Authorization"] = "Bearer " + token;
    const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      if (response.status === 401) {
        // Polling stops until new credentials are given (each refusal is counted and logged).
        for (const id of state.timers) clearInterval(id);
        state.timers = [];
        needLogin("The HTTP API needs a token (gw token create --scope read).");
      }
      setStatus("api-status", "error", body && body.message);
      throw new HttpError(response.status, body);
    }
    setStatus("api-status", "ok");
    return body;
  }

  function setStatus(id, value, title) {
    const el = $(id);
    el.dataset.state = value;
    if (title) el.title = title;
  }

  // --- credentials ----------------------------------------------------------------

  function needLogin(reason) {
    $("login-reason").textContent = reason;
    $("login-token").value = store.getItem("gw.token") || "";
    $("login-user").value = store.getItem("gw.mqtt_user") || "";
    $("login").hidden = false;
  }

  function bindLogin() {
    $("login-open").addEventListener("click", () => needLogin("Credentials for this gateway."));
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("login-token").value.trim();
      if (token) store.setItem("gw.token", token); else store.removeItem("gw.token");
      const user = $("login-user").value.trim();
      if (user) store.setItem("gw.mqtt_user", user); else store.removeItem("gw.mqtt_user");
      const password = $("login-password").value;
      if (password) store.setItem("gw.mqtt_password", password); else store.removeItem("gw.mqtt_password");
      $("login").hidden = true;
      start();
    });
  }

  // --- formatting -----------------------------------------------------------------

  function fmtNumber(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "-";
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (Number.isInteger(v)) return String(v);
    return a >= 100 ? v.toFixed(0) : String(Math.round(v * 100) / 100);
  }

  function fmtBytes(v) {
    if (v === null || v === undefined) return "-";
    if (v >= 1 << 30) return (v / (1 << 30)).toFixed(1) + " GiB";
    if (v >= 1 << 20) return (v / (1 << 20)).toFixed(1) + " MiB";
    if (v >= 1 << 10) return (v / (1 << 10)).toFixed(1) + " KiB";
    return v + " B";
  }

  function fmtTime(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString() + " " + d.toLocaleDateString();
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.dataset[k.slice(5).replace(/-(\w)/g, (m, c) => c.toUpperCase())] = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  // --- charts ---------------------------------------------------------------------

  const PALETTE = ["#2e90fa", "#f79009", "#12b76a", "#d92d20", "#7a5af8", "#ee46bc", "#15b79e", "#667085"];

  // One point (or all at one time): uPlot would span its time axis over years; a minute instead.
  function timeRange(u, min, max) {
    const xs = u.data && u.data[0];
    if (!xs || !xs.length) { const now = Date.now() / 1000; return [now - 60, now + 1]; }
    const first = xs[0], end = xs[xs.length - 1];
    return first === end ? [first - 60, end + 1] : [min, max];
  }

  function makeChart(id, series, opts) {
    const box = $(id);
    const width = Math.max(box.clientWidth, 300);
    const o = Object.assign({
      width, height: 200, legend: { live: false },
      scales: { x: { time: true, range: timeRange } },
      axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => (opts && opts.bytes ? fmtBytes(v) : fmtNumber(v))) }],
      series: [{}].concat(series.map((s, i) => Object.assign({ stroke: PALETTE[i % PALETTE.length], width: 1.5,
                                                                points: { show: false } }, s))),
    }, opts && opts.uplot);
    const data = [[]].concat(series.map(() => []));
    const chart = new uPlot(o, data, box);
    state.charts[id] = chart;
    return chart;
  }

  function resizeCharts() {
    for (const [id, chart] of Object.entries(state.charts)) {
      chart.setSize({ width: Math.max($(id).clientWidth, 300), height: 200 });
    }
  }

  // --- the stats series -----------------------------------------------------------

  function setupStatsCharts(nworkers) {
    if (state.charts["chart-connections"]) return;
    makeChart("chart-connections", [{ label: "connections" }, { label: "sessions" }]);
    makeChart("chart-rates", [{ label: "in" }, { label: "out" }, { label: "readings" }, { label: "HTTP" }]);
    const workerSeries = [];
    for (let w = 0; w < nworkers; w++) workerSeries.push({ label: "worker " + w });
    makeChart("chart-workers", workerSeries, { uplot: { scales: { x: { time: true, range: timeRange },
                                                                  y: { range: [0, 1] } } } });
    makeChart("chart-wal", [{ label: "log not durable" }, { label: "store lag" }, { label: "file lag" },
                            { label: "bridge lag" }], { bytes: true });
  }

  function appendColumns(answer) {
    if (!state.cols) {
      state.cols = {};
      for (const k of Object.keys(answer.columns)) state.cols[k] = [];
      state.workerCols = answer.workers.map(() => ({ busy: [], connections: [], msg_in: [] }));
    }
    for (const [k, v] of Object.entries(answer.columns)) {
      const col = state.cols[k] || (state.cols[k] = []);
      col.push(...v);
      if (col.length > state.capacity) col.splice(0, col.length - state.capacity);
    }
    answer.workers.forEach((w, i) => {
      const mine = state.workerCols[i] || (state.workerCols[i] = { busy: [], connections: [], msg_in: [] });
      for (const [k, v] of Object.entries(w.columns)) {
        const col = mine[k] || (mine[k] = []);
        col.push(...v);
        if (col.length > state.capacity) col.splice(0, col.length - state.capacity);
      }
    });
  }

  function last(col) { return col && col.length ? col[col.length - 1] : null; }

  async function pollStats() {
    const answer = await api("/v1/stats/series?after=" + state.after);
    if (answer.last < state.after) {            // the server restarted: its sequence began again
      state.cols = null;
    }
    state.capacity = answer.capacity;
    state.after = answer.last;
    state.workers = answer.workers;
    setupStatsCharts(answer.workers.length);
    appendColumns(answer);
    const c = state.cols;
    if (!c.t || !c.t.length) return;
    state.charts["chart-connections"].setData([c.t, c.connections, c.sessions]);
    state.charts["chart-rates"].setData([c.t, c.msg_in, c.msg_out, c.ingest, c.http]);
    state.charts["chart-workers"].setData([c.t].concat(state.workerCols.map((w) => w.busy)));
    state.charts["chart-wal"].setData([c.t, c.wal_pending_bytes, c.store_lag_bytes, c.file_lag_bytes,
                                       c.bridge_lag_bytes]);
    $("card-connections").textContent = fmtNumber(last(c.connections));
    $("card-msg_in").textContent = fmtNumber(last(c.msg_in));
    $("card-msg_out").textContent = fmtNumber(last(c.msg_out));
    $("card-ingest").textContent = fmtNumber(last(c.ingest));
    $("card-wal_pending_bytes").textContent = fmtBytes(last(c.wal_pending_bytes));
    $("card-store_lag").textContent = fmtBytes(last(c.store_lag_bytes)) + ", " +
      fmtNumber(last(c.store_lag_seconds)) + " s";
    $("card-memory_bytes").textContent = fmtBytes(last(c.memory_bytes));
    renderWorkers();
    markReady("stats");
  }

  function renderWorkers() {
    const body = $("workers").tBodies[0];
    body.replaceChildren(...state.workers.map((w, i) => {
      const cols = state.workerCols[i] || {};
      return el("tr", { "data-slot": String(w.slot) },
        el("td", {}, w.slot), el("td", {}, w.pid || "-"),
        el("td", {}, w.heartbeat_age_ms === null ? "down" : w.heartbeat_age_ms + " ms"),
        el("td", {}, fmtNumber(last(cols.connections))), el("td", {}, fmtNumber(last(cols.msg_in))),
        el("td", {}, last(cols.busy) === null ? "-" : (100 * last(cols.busy)).toFixed(1) + " %"),
        el("td", {}, (w.store_lag_bytes === null ? "-" : fmtBytes(w.store_lag_bytes)) +
                     (w.store_behind ? " (ingest held)" : "")));
    }));
  }

  // --- devices --------------------------------------------------------------------

  function devicesPath(after) {
    return "/v1/devices?limit=" + DEVICES_PAGE + (after ? "&after=" + encodeURIComponent(after) : "");
  }

  async function loadDevices() {
    const page = state.devicePages.length - 1;
    let answer;
    try {
      answer = await api(devicesPath(state.devicePages[page]));
    } catch (e) {
      $("devices-note").textContent = e.code === "store_unavailable" ? "(the store is not there yet)" : "(" + e.message + ")";
      markReady("devices");
      return;
    }
    $("devices-note").textContent = "";
    state.deviceNext = answer.next;
    $("devices-page").textContent = "page " + (page + 1);
    $("devices-next").disabled = !answer.next;
    $("devices-prev").disabled = page === 0;
    const body = $("devices").tBodies[0];
    state.sparkQueue = [];
    const rows = answer.devices.map((d) => deviceRow(d));
    body.replaceChildren(...rows);
    pumpSparks();
    markReady("devices");
  }

  function deviceRow(d) {
    const values = el("td", { class: "values" });
    for (const [metric, value] of Object.entries(d.last_values)) {
      const canvas = el("canvas", { width: "160", height: "40", "data-metric": metric });
      values.append(el("span", { class: "metric", "data-metric": metric },
        el("span", { class: "name" }, metric), el("span", { class: "value" }, fmtNumber(value)), canvas));
      if (typeof value === "number") queueSpark(d.device_id, metric, canvas);
    }
    const follow = el("button", { type: "button" }, "Follow");
    follow.addEventListener("click", () => { $("tail-device").value = d.device_id; followDevice(d.device_id); });
    return el("tr", { "data-device": d.device_id },
      el("td", {}, d.device_id), el("td", {}, fmtTime(d.last_seen)), el("td", {}, fmtNumber(d.readings)),
      values, el("td", {}, follow));
  }

  function queueSpark(device, metric, canvas) {
    // The list is read again every few seconds; a metric's last hour, every SPARK_TTL.
    const key = device + "\u0000" + metric;
    const cached = state.sparks.get(key);
    if (cached) drawSpark(canvas, cached.values);
    if (cached && Date.now() - cached.at < SPARK_TTL) return;
    state.sparkQueue.push({ device, metric, canvas, key });
  }

  function pumpSparks() {
    while (state.sparkRunning < SPARK_CONCURRENCY && state.sparkQueue.length) {
      const job = state.sparkQueue.shift();
      if (!job.canvas.isConnected) continue;
      state.sparkRunning++;
      const path = "/v1/devices/" + encodeURIComponent(job.device) + "/metrics?metric=" +
        encodeURIComponent(job.metric) + "&window=1m&limit=60";
      api(path).then((answer) => {
        const values = answer.points.map((p) => p.mean);
        if (state.sparks.size > 2000) state.sparks.clear();
        state.sparks.set(job.key, { values, at: Date.now() });
        drawSpark(job.canvas, values);
      })
        .catch(() => {}).finally(() => { state.sparkRunning--; pumpSparks(); });
    }
  }

  function drawSpark(canvas, values) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    const vs = values.filter((v) => v !== null);
    canvas.dataset.points = String(vs.length);
    if (vs.length < 2) return;
    const lo = Math.min(...vs), hi = Math.max(...vs);
    const span = hi - lo || 1;
    ctx.strokeStyle = "#2e90fa";
    ctx.lineWidth = 2;
    ctx.beginPath();
    vs.forEach((v, i) => {
      const x = (i / (vs.length - 1)) * (w - 2) + 1;
      const y = hi === lo ? h / 2 : h - 2 - ((v - lo) / span) * (h - 4);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }

  function bindDevices() {
    $("devices-next").addEventListener("click", () => {
      if (!state.deviceNext) return;
      state.devicePages.push(state.deviceNext);
      loadDevices();
    });
    $("devices-prev").addEventListener("click", () => {
      if (state.devicePages.length > 1) state.devicePages.pop();
      loadDevices();
    });
    $("devices-first").addEventListener("click", () => { state.devicePages = [""]; loadDevices(); });
  }

  // --- alerts ---------------------------------------------------------------------

  function alertRow(a) {
    const row = el("tr", { "data-alert-id": String(a.id), "data-state": a.state },
      el("td", {}, a.id), el("td", {}, fmtTime(a.created || a.ts)), el("td", {}, a.device_id),
      el("td", {}, a.metric), el("td", { class: "value" }, fmtNumber(a.value)),
      el("td", {}, fmtNumber(a.zscore)), el("td", { class: "state" }, a.state), el("td", { class: "action" }));
    setAlertState(row, a);
    return row;
  }

  function setAlertState(row, a) {
    row.dataset.state = a.state;
    row.querySelector("td.state").textContent = a.state === "acked" && a.acked ? "acked " + fmtTime(a.acked) : a.state;
    const action = row.querySelector("td.action");
    action.replaceChildren();
    if (a.state === "open") {
      const button = el("button", { type: "button", class: "ack" }, "Acknowledge");
      button.addEventListener("click", () => acknowledge(a.id, row, button));
      action.append(button);
    }
  }

  async function acknowledge(id, row, button) {
    button.disabled = true;
    try {
      const alert = await api("/v1/alerts/" + id + "/ack", { method: "POST", body: "{}",
        headers: { "Content-Type": "application/json" } });
      setAlertState(row, alert);
    } catch (e) {
      button.disabled = false;
      row.querySelector("td.action").append(el("span", { class: "error" },
        e.status === 403 ? " the token needs the admin scope" : " " + e.message));
    }
  }

  function showAlert(a, fresh) {
    const body = $("alerts").tBodies[0];
    const existing = body.querySelector('tr[data-alert-id="' + a.id + '"]');
    if (existing) {
      if (a.state === "acked") setAlertState(existing, a);
      return;
    }
    const row = alertRow(a);
    if (fresh) {
      row.classList.add("fresh");
      // newest first: before the first row with a smaller id
      const rows = Array.from(body.rows);
      const after = rows.find((r) => Number(r.dataset.alertId) < a.id);
      body.insertBefore(row, after || null);
    } else {
      body.append(row);
    }
  }

  async function loadAlerts(after) {
    let answer;
    try {
      answer = await api("/v1/alerts?limit=" + ALERTS_PAGE + (after ? "&after=" + after : ""));
    } catch (e) {
      $("alerts-note").textContent = e.code === "store_unavailable" ? "(the store is not there yet)" : "(" + e.message + ")";
      markReady("alerts");
      return;
    }
    $("alerts-note").textContent = "";
    for (const a of answer.alerts) showAlert(a, false);
    state.alertsNext = answer.next;
    $("alerts-more").hidden = !answer.next;
    markReady("alerts");
  }

  // --- MQTT over WebSocket ----------------------------------------------------------

  function connectLive() {
    const cfg = state.config;
    if (state.client) { state.client.end(true); state.client = null; }
    const secure = location.protocol === "https:";
    const listener = (secure && cfg.wss) || cfg.ws || cfg.wss;
    if (!listener) {
      setStatus("mqtt-status", "error", "no ws or wss listener: live updates are off");
      return;
    }
    if (typeof mqtt === "undefined") { setStatus("mqtt-status", "error", "MQTT.js did not load"); return; }
    const url = (listener.tls ? "wss://" : "ws://") + location.hostname + ":" + listener.port + listener.path;
    // MQTT 5.0: the broker's reason codes (CONNACK, SUBACK, its DISCONNECT) say what went wrong.
    // Clean Start without a Session Expiry Interval: the session ends with the connection.
    const options = { clientId: "gw-dashboard-" + Math.random().toString(16).slice(2, 10), clean: true,
                      protocolVersion: 5, reconnectPeriod: 3000, connectTimeout: 10000, keepalive: 30 };
    const user = store.getItem("gw.mqtt_user");
    if (user) { options.username = user; options.password = store.getItem("gw.mqtt_password") || ""; }
    else if (!cfg.mqtt_anonymous) {
      setStatus("mqtt-status", "error", "this gateway needs an MQTT user for live updates");
      needLogin("Live updates need an MQTT user and password (allow_anonymous is off).");
      return;
    }
    setStatus("mqtt-status", "connecting", url);
    const client = mqtt.connect(url, options);
    state.client = client;
    client.on("connect", () => {
      setStatus("mqtt-status", "ok", url);
      // Marked live once the broker confirmed the subscription (SUBACK): from then on,
      // every alert raised reaches this page.
      client.subscribe(cfg.alerts_topic + "/#", { qos: 0 }, (err, granted) => {
        if (state.client !== client) return;
        const refused = subackRefused(err, granted);
        if (!refused) document.body.dataset.live = "1";
        else setStatus("mqtt-status", "error", "alerts: " + refused);
      });
      if (state.tailDevice) subscribeTail(client, state.tailDevice);
    });
    client.on("error", (err) => {
      setStatus("mqtt-status", "error", String(err && err.message));
      // CONNACK 0x86 Bad User Name or Password, 0x87 Not authorized (3.1.1's codes 4 and 5).
      if (err && (err.code === 0x86 || err.code === 0x87 || /Not authorized|Bad user ?name/i.test(err.message))) {
        client.end(true);
        needLogin("The MQTT user or password was refused.");
      }
    });
    // The broker's DISCONNECT (MQTT 5.0) tells why it closes: shown until the reconnect.
    client.on("disconnect", (packet) => {
      if (state.client !== client) return;
      const why = (packet.properties && packet.properties.reasonString) || "";
      setStatus("mqtt-status", "error", "disconnected by the broker: reason 0x" +
                (packet.reasonCode || 0).toString(16).padStart(2, "0") + (why ? " (" + why + ")" : ""));
    });
    client.on("close", () => { document.body.dataset.live = "0"; if (state.client === client) setStatus("mqtt-status", "connecting", url); });
    client.on("message", (topic, payload) => {
      let msg;
      try { msg = JSON.parse(new TextDecoder().decode(payload)); } catch (e) { return; }
      if (topic.startsWith(cfg.alerts_topic + "/")) showAlert(msg, true);
      else if (topic === cfg.telemetry_topic + "/" + state.tailDevice) tailReading(msg);
    });
  }

  // --- the live tail ----------------------------------------------------------------

  function followDevice(id) {
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(id)) { $("tail-note").textContent = "not a device id"; return; }
    const cfg = state.config;
    if (state.client && state.tailDevice) state.client.unsubscribe(cfg.telemetry_topic + "/" + state.tailDevice);
    state.tailDevice = id;
    state.tail = { t: [], series: {} };
    $("tail").tBodies[0].replaceChildren();
    if (state.charts["chart-tail"]) { state.charts["chart-tail"].destroy(); delete state.charts["chart-tail"]; }
    $("tail-note").textContent = "following " + id;
    delete document.body.dataset.tail;
    if (state.client && state.client.connected) subscribeTail(state.client, id);
  }

  function subscribeTail(client, id) {
    // data-tail once the SUBACK is in: readings sent from then on are shown.
    client.subscribe(state.config.telemetry_topic + "/" + id, { qos: 0 }, (err, granted) => {
      if (state.tailDevice !== id) return;
      const refused = subackRefused(err, granted);
      if (!refused) document.body.dataset.tail = id;
      else $("tail-note").textContent = "not followed: " + refused;
    });
  }

  // Why a subscription failed, or null: a SUBACK's MQTT 5.0 reason code >= 0x80 (0x87 when the
  // ACL does not let this user read the filter; MQTT.js hands the SUBACK with the error, its
  // codes in packet.granted), or another error's message.
  function subackRefused(err, granted) {
    const codes = ((err && err.packet && err.packet.granted) || []).concat((granted || []).map((g) => g.qos));
    const bad = codes.find((c) => c >= 0x80);
    const code = bad === undefined ? null : bad;
    if (code === null) return err ? String(err.message) : null;
    const names = { 0x80: "unspecified error", 0x83: "implementation specific error", 0x87: "not authorized",
                    0x8f: "topic filter invalid", 0x91: "packet identifier in use", 0x97: "quota exceeded",
                    0x9e: "shared subscriptions not supported" };
    return "refused, reason 0x" + code.toString(16) + (names[code] ? " (" + names[code] + ")" : "");
  }

  function tailReading(r) {
    const t = Date.parse(r.ts) / 1000;
    const metrics = r.metrics || {};
    const tail = state.tail;
    const names = Object.keys(tail.series);
    const fresh = Object.keys(metrics).filter((m) => !(m in tail.series));
    for (const m of fresh) tail.series[m] = tail.t.map(() => null);
    tail.t.push(t);
    for (const m of Object.keys(tail.series)) tail.series[m].push(m in metrics ? metrics[m] : null);
    if (tail.t.length > TAIL_POINTS) {
      tail.t.shift();
      for (const m of Object.keys(tail.series)) tail.series[m].shift();
    }
    const all = Object.keys(tail.series);
    if (fresh.length || !state.charts["chart-tail"]) {
      if (state.charts["chart-tail"]) state.charts["chart-tail"].destroy();
      makeChart("chart-tail", all.map((m) => ({ label: m, points: { show: true, size: 4 } })));
    }
    state.charts["chart-tail"].setData([tail.t].concat(all.map((m) => tail.series[m])));
    const body = $("tail").tBodies[0];
    const values = Object.entries(metrics).map(([k, v]) => k + " = " + v).join(", ");
    const row = el("tr", { class: "fresh", "data-seq": r.seq === null || r.seq === undefined ? "" : String(r.seq) },
      el("td", {}, fmtTime(r.ts)), el("td", {}, r.seq === null || r.seq === undefined ? "-" : r.seq),
      el("td", { class: "values" }, values));
    body.insertBefore(row, body.firstChild);
    while (body.rows.length > TAIL_ROWS) body.deleteRow(body.rows.length - 1);
    // The device's row in the list, if shown, gets the new values too.
    const deviceRow = $("devices").querySelector('tr[data-device="' + r.device_id + '"]');
    if (deviceRow) {
      for (const [k, v] of Object.entries(metrics)) {
        const span = deviceRow.querySelector('.metric[data-metric="' + k + '"] .value');
        if (span) span.textContent = fmtNumber(v);
      }
    }
    void names;
  }

  // --- start ----------------------------------------------------------------------

  function markReady(part) {
    state.ready[part] = true;
    if (state.ready.stats && state.ready.devices && state.ready.alerts && document.body.dataset.ready !== "1") {
      document.body.dataset.ready = "1";
      if (window.performance && performance.mark) performance.mark("gw-ready");
    }
  }

  function every(ms, fn) {
    let busy = false;
    const id = setInterval(async () => {
      if (busy) return;                  // the previous call has not finished: skip this one
      busy = true;
      try { await fn(); } catch (e) { /* shown in the status */ } finally { busy = false; }
    }, ms);
    state.timers.push(id);
  }

  async function start() {
    for (const id of state.timers) clearInterval(id);
    state.timers = [];
    try {
      state.config = await api("/v1/dashboard");
    } catch (e) {
      if (e.status !== 401) setStatus("api-status", "error", e.message);
      return;
    }
    $("version").textContent = "v" + state.config.version + ", " + state.config.workers + " workers";
    connectLive();
    await Promise.allSettled([pollStats(), loadDevices(), loadAlerts(null)]);
    every(1000, pollStats);
    every(5000, loadDevices);
  }

  function init() {
    bindLogin();
    bindDevices();
    $("alerts-more").addEventListener("click", () => loadAlerts(state.alertsNext));
    $("tail-form").addEventListener("submit", (ev) => { ev.preventDefault(); followDevice($("tail-device").value.trim()); });
    window.addEventListener("resize", resizeCharts);
    start();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
