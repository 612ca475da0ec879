"use strict";
// The console page: polls the bridge's JSON API; no framework, no outside assets.
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("omb-token") || "";
let lastSeq = 0;
const rows = [];

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) { showLogin(); throw new Error("token needed"); }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function showLogin() { $("login").hidden = false; }
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value;
  sessionStorage.setItem("omb-token", token);
  $("login").hidden = true;
  refresh();
});

function show(tab) {
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== tab;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
  if (tab === "config") loadConfig();
  if (tab === "try") loadMethods();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "status"));

function fill(list, entries) {
  list.replaceChildren();
  for (const [key, value] of entries) {
    const dt = document.createElement("dt"); dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
    dd.dataset.key = key;
    list.append(dt, dd);
  }
}

async function refreshStatus() {
  const status = await api("/api/status");
  const pill = $("state");
  pill.textContent = status.state; pill.className = "pill " + status.state;
  const { counters, journal, ...rest } = status;
  fill($("status-list"), Object.entries(Object.assign(rest, journalRows(journal || {}))));
  fill($("counters"), Object.entries(counters || {}));
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "unknown";
  const units = ["bytes", "KiB", "MiB", "GiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit ? value.toFixed(1) : String(value)) + " " + units[unit];
}

// The journal as three rows: where it is, its entries, its size (every worker's summed).
function journalRows(journal) {
  if (!journal.kind) return { journal: "off (scope " + journal.scope + ")" };
  const where = Array.isArray(journal.path) ? journal.path.join(", ") : journal.path;
  return {
    journal: journal.kind + ", scope " + journal.scope + (where ? " — " + where : ""),
    journal_entries: journal.entries ?? "unknown",
    journal_size: size(journal.bytes),
  };
}

function rowMatches(record, text) {
  if (!text) return true;
  return [record.method, record.suffix, record.code || "ok"].join(" ").toLowerCase().includes(text.toLowerCase());
}

function renderRows() {
  const text = $("filter").value;
  const body = $("request-rows");
  body.replaceChildren();
  for (const record of rows.slice().reverse()) {
    if (!rowMatches(record, text)) continue;
    const tr = document.createElement("tr");
    const when = new Date(record.at * 1000).toLocaleTimeString();
    const cells = [record.seq, when, record.method, record.suffix, JSON.stringify(record.transaction ?? null),
      record.code || "ok", record.duration_ms, record.bytes_in, record.bytes_out];
    cells.forEach((value, index) => {
      const td = document.createElement("td"); td.textContent = String(value);
      if (index === 5 && record.code) td.className = "error";
      tr.append(td);
    });
    tr.addEventListener("click", () => showDetail(record.seq));
    body.append(tr);
  }
}

async function refreshRequests() {
  if ($("pause").checked) return;
  const data = await api("/api/requests?since=" + lastSeq);
  for (const record of data.requests) { rows.push(record); lastSeq = record.seq; }
  while (rows.length > 500) rows.shift();
  if (data.requests.length) renderRows();
}
$("filter").addEventListener("input", renderRows);

function previewText(view) {
  if (!view) return "";
  if (view.binary) return `(binary: ${view.size} bytes${view.type ? ", " + view.type : ""})`;
  return view.text + (view.truncated ? `\n… (${view.size} bytes in all)` : "");
}

async function showDetail(seq) {
  const record = await api("/api/requests/" + seq);
  $("detail").hidden = false;
  $("detail-title").textContent = `#${record.seq} ${record.method} ${record.suffix} — ${record.code || "ok"}`;
  $("detail-request").textContent = previewText(record.request);
  $("detail-reply").textContent = previewText(record.reply);
}

let methodsLoaded = false;
async function loadMethods() {
  if (methodsLoaded) return;
  const data = await api("/api/methods");
  const list = $("method-names");
  for (const method of data.methods) {
    const option = document.createElement("option");
    option.value = method.name; option.label = `${method.group} ${method.verb} ${method.path}`;
    list.append(option);
  }
  methodsLoaded = true;
}

$("describe-button").addEventListener("click", async () => {
  const name = $("method-search").value.trim();
  if (!name) return;
  try {
    const found = await api("/api/describe/" + encodeURIComponent(name));
    $("describe-text").textContent = found.text;
    $("payload").value = JSON.stringify(found.example, null, 2);
  } catch (error) { $("describe-text").textContent = String(error.message); }
});

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function streams(payload) {
  const bridge = payload._bridge || {};
  return payload.stream === true || payload.stream_format === "sse" || Boolean(bridge.wait);
}

// The text an event adds: a chat or completion delta, a Responses or transcription delta.
function deltaOf(message) {
  if (typeof message.text === "string") return message.text;
  const data = message.data;
  if (typeof data === "string") return "";
  if (!data || typeof data !== "object") return "";
  const choice = Array.isArray(data.choices) ? data.choices[0] || {} : {};
  if (choice.delta && typeof choice.delta.content === "string") return choice.delta.content;
  if (typeof choice.text === "string") return choice.text;
  if (typeof data.delta === "string") return data.delta;
  return "";
}

function showEvent(item) {
  const li = document.createElement("li");
  if (item.event) {
    const message = item.event;
    const delta = deltaOf(message);
    $("try-text").textContent += delta;
    const name = message.event || (delta ? "delta" : "event");
    li.textContent = `#${message.seq ?? "?"} ${name}: ` + JSON.stringify(message.data ?? message).slice(0, 300);
  } else {
    li.textContent = previewText(item.preview);
  }
  $("try-events").append(li);
  $("try-reply").textContent = `… streaming (${$("try-events").children.length} events)`;
}

// fetch() and not EventSource: the token goes in the Authorization header, as for every call.
async function sendStreamed(method, payload) {
  const headers = { "Content-Type": "application/json", "X-OMB-Console": "1" };
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch("/api/try/stream", { method: "POST", headers, body: JSON.stringify({ method, payload }) });
  if (response.status === 401) { showLogin(); throw new Error("token needed"); }
  if (!response.ok) { const data = await response.json(); throw new Error(data.error || response.statusText); }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end); buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const item = JSON.parse(data);
      if (name === "published") $("try-topic").textContent = "published on " + item.topic + " — streaming";
      else if (name === "event") showEvent(item);
      else if (name === "truncated") $("try-topic").textContent += ` — events past ${item.after_bytes} bytes not shown`;
      else if (name === "error") throw new Error(item.error);
      else if (name === "reply") {
        $("try-topic").textContent = "published on " + item.topic + ` — ${$("try-events").children.length} events` +
          (item.events_dropped ? ` (${item.events_dropped} more not shown)` : "") + (item.code ? " — " + item.code : "");
        $("try-reply").textContent = previewText(item.reply);
      }
    }
  }
}

$("send").addEventListener("click", async () => {
  const method = $("method-search").value.trim();
  $("try-reply").textContent = "…";
  $("try-topic").textContent = "";
  $("try-text").textContent = "";
  $("try-events").replaceChildren();
  try {
    const payload = JSON.parse($("payload").value || "{}");
    const file = $("file").files[0];
    if (file) payload[$("file-field").value || "file"] = { base64: await readBase64(file), filename: file.name };
    if (streams(payload)) { await sendStreamed(method, payload); return; }
    const result = await api("/api/try", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-OMB-Console": "1" },
      body: JSON.stringify({ method, payload }),
    });
    $("try-topic").textContent = "published on " + result.topic + (result.code ? " — " + result.code : "");
    $("try-reply").textContent = previewText(result.reply);
  } catch (error) { $("try-reply").textContent = "error: " + error.message; }
});

async function loadConfig() {
  const data = await api("/api/config");
  $("config-source").textContent = "source: " + (data.source || "built-in defaults") +
    (data.overrides.length ? " · environment: " + data.overrides.map((o) => o.variable + "=" + JSON.stringify(o.value)).join(", ") : "");
  const findings = $("config-findings"); findings.replaceChildren();
  for (const finding of data.findings) { const li = document.createElement("li"); li.textContent = finding; findings.append(li); }
  $("config-text").textContent = JSON.stringify(data.config, null, 2);
}

async function refresh() {
  try { await refreshStatus(); await refreshRequests(); } catch (error) { /* shown by the next poll */ }
}
show(location.hash.slice(1) || "status");
refresh();
setInterval(refresh, 1000);
