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

$("send").addEventListener("click", async () => {
  const method = $("method-search").value.trim();
  $("try-reply").textContent = "…";
  try {
    const payload = JSON.parse($("payload").value || "{}");
    const file = $("file").files[0];
    if (file) payload[$("file-field").value || "file"] = { base64: await readBase64(file), filename: file.name };
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
