// The PocketOS dashboard. Everything it shows comes from /api (JSON) and
// /api/events (Server-Sent Events); every change sends the session's CSRF
// token. Text from the box is always set as text, never as markup.
"use strict";

const $ = (sel) => document.querySelector(sel);
// jobs: install jobs in progress by id; finished: ids of jobs that ended
// (a fast job can end before the reply that started it arrives);
// uploading: the name of the file being uploaded.
// chat: the conversation shown (role, content), and the answer in
// progress's AbortController.
const state = { session: {}, jobs: new Map(), finished: new Set(), uploading: null, models: null, update: null, events: null,
  chat: { messages: [], abort: null } };

function trackJob(job) {
  if (!state.finished.has(job.id)) state.jobs.set(job.id, job);
  renderModels();
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v;
    else if (k === "data") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined || s < 0) return "";
  if (s < 60) return `${s} s left`;
  return `${Math.floor(s / 60)} min ${s % 60} s left`;
}

function say(text, kind = "error") {
  const m = $("#message");
  m.textContent = text;
  m.className = kind === "error" ? "" : "info";
  m.hidden = false;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body.message || `request failed (${status})`);
    this.status = status;
    this.name = body.error || "Error";
  }
}

async function api(method, path, body, raw) {
  const headers = { "X-CSRF-Token": state.session.csrf || "none" };
  let payload;
  if (raw !== undefined) {
    headers["Content-Type"] = "application/octet-stream";
    payload = raw;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// A change: asks to log in first when needed, shows what went wrong.
async function change(method, path, body, raw) {
  if (!state.session.logged_in) {
    await askLogin();
    if (!state.session.logged_in) return null;
  }
  try {
    return await api(method, path, body, raw);
  } catch (e) {
    if (e.status === 401) {
      state.session.logged_in = false;
      renderSession();
      say("Your session ended: log in again.");
    } else {
      say(e.message);
    }
    return null;
  }
}

// ---- session ----

async function loadSession() {
  state.session = await api("GET", "/api/session");
  renderSession();
  if (state.session.setup_needed) askLogin();
}

function renderSession() {
  const s = state.session;
  $("#who").textContent = s.logged_in ? "admin" : s.setup_needed ? "no admin password set" : "viewing";
  $("#login-button").hidden = !!s.logged_in;
  $("#logout-button").hidden = !s.logged_in;
  $("#tls").hidden = !s.tls_fingerprint;
  $("#tls-fingerprint").textContent = s.tls_fingerprint || "";
}

function askLogin() {
  const setup = state.session.setup_needed;
  $("#login-title").textContent = setup ? "Set the admin password" : "Log in";
  $("#login-hint").textContent = setup
    ? `This box has no admin password yet. Choose one (at least ${state.session.min_password} characters); changing anything on the box will need it.`
    : "Changing anything on the box needs the admin password.";
  const code = !!(setup && state.session.setup_code_needed);
  if (code) $("#login-hint").textContent += " " + state.session.setup_code_hint;
  $("#confirm-row").hidden = !setup;
  $("#password2").required = !!setup;
  $("#code-row").hidden = !code;
  $("#setup-code").required = code;
  $("#login-submit").textContent = setup ? "Set password" : "Log in";
  $("#login-error").textContent = "";
  $("#password").value = "";
  $("#password2").value = "";
  const d = $("#login");
  if (!d.open) d.showModal();
  return new Promise((resolve) => d.addEventListener("close", resolve, { once: true }));
}

async function submitLogin(ev) {
  ev.preventDefault();
  const setup = state.session.setup_needed;
  const password = $("#password").value;
  if (setup && password !== $("#password2").value) {
    $("#login-error").textContent = "The two passwords differ.";
    return;
  }
  try {
    const body = { password };
    if (setup && state.session.setup_code_needed) body.setup_code = $("#setup-code").value;
    const r = await api("POST", setup ? "/api/setup" : "/api/login", body);
    state.session = { ...state.session, logged_in: true, setup_needed: false, csrf: r.csrf };
    renderSession();
    $("#login").close();
    // With login_to_read, the event stream was refused before the login.
    if (!state.events || state.events.readyState === EventSource.CLOSED) listen();
    refreshAll();
  } catch (e) {
    $("#login-error").textContent = e.message;
  }
}

// ---- models ----

async function loadModels() {
  try {
    state.models = await api("GET", "/api/models");
  } catch (e) {
    $("#store-status").textContent = e.message;
    return;
  }
  for (const j of state.models.jobs) mergeJob(j);
  renderModels();
}

// A job's news, from an event or the job list, over what the page knew of
// it; nothing for a job that has ended.
function mergeJob(job) {
  if (state.finished.has(job.id)) return;
  const old = state.jobs.get(job.id) || {};
  // An upload's job has no model name until the pack is read: keep the
  // file's name the page gave it.
  state.jobs.set(job.id, { ...old, ...job, name: job.name || old.name });
}

function jobFor(name) {
  for (const j of state.jobs.values()) if (j.name === name && !["done", "failed"].includes(j.phase)) return j;
  return null;
}

function progressCell(job) {
  const frac = job.bytes_total ? job.bytes_done / job.bytes_total : 0;
  const parts = [`${job.phase}`, `${bytes(job.bytes_done)} of ${bytes(job.bytes_total)}`];
  if (job.bytes_per_sec) parts.push(`${bytes(job.bytes_per_sec)}/s`);
  if (job.eta_seconds > 0) parts.push(duration(job.eta_seconds));
  return el("span", { class: "job", data: { job: job.id } },
    el("progress", { max: 1, value: frac.toFixed(3) }),
    el("button", { type: "button", class: "secondary cancel", onclick: () => change("POST", `/api/models/jobs/${job.id}/cancel`) }, "Cancel"),
    el("span", { class: "progress-text" }, parts.join(" · ")));
}

function renderModels() {
  const m = state.models;
  if (!m) return;
  $("#store-status").textContent = m.status && m.status !== "ok" ? m.status : "";
  const rows = m.catalog.map((c) => {
    const job = jobFor(c.name);
    const fits = c.fits_disk && c.fits_memory;
    const why = !c.fits_disk ? "not enough disk" : !c.fits_memory ? "not enough memory" : "yes";
    let action;
    if (job) action = progressCell(job);
    else if (c.installed_version === c.version) action = el("span", { class: "ok" }, "Installed");
    else action = el("button", { type: "button", class: "install", disabled: !fits, onclick: () => install(c.name) },
      c.installed_version ? `Update to ${c.version}` : "Install");
    return el("tr", { data: { model: c.name } },
      el("td", {}, `${c.name} ${c.version}`, el("small", {}, c.description)),
      el("td", {}, bytes(c.size_bytes)),
      el("td", {}, bytes(c.memory_bytes), c.kv_bytes ? el("small", { class: "kv" }, `+ ${bytes(c.kv_bytes)} KV cache`) : ""),
      el("td", { class: fits ? "yes" : "no" }, why),
      el("td", {}, action));
  });
  $("#catalog").replaceChildren(...rows);
  // Uploads show their progress under the upload form.
  const named = new Set(m.catalog.map((c) => c.name));
  const other = [...state.jobs.values()].filter((j) => !named.has(j.name) && !["done", "failed"].includes(j.phase));
  $("#upload-model-progress").replaceChildren(...other.map(progressCell));

  $("#runtime-status").textContent = m.runtime_status && m.runtime_status !== "ok" ? `Runtime: ${m.runtime_status}` : "";
  const installed = m.installed.map((i) => el("tr", { data: { model: i.name } },
    el("td", {}, i.name, el("small", {}, i.description)),
    el("td", {}, i.version),
    el("td", {}, bytes(i.size_bytes)),
    el("td", { class: "provider" }, i.provider || "not loaded",
      i.kv_bytes_reserved ? el("small", { class: "held" }, `${bytes(i.weights_bytes)} weights + ${bytes(i.kv_bytes_reserved)} KV cache`) : ""),
    el("td", {},
      i.llm
        ? el("button", { type: "button", class: "chat", onclick: () => chatWith(i.name) }, "Chat")
        : el("button", { type: "button", class: "run", onclick: () => run(i.name) }, "Test run"), " ",
      el("button", { type: "button", class: "secondary remove", onclick: () => remove(i.name) }, "Remove"))));
  $("#models").replaceChildren(...(installed.length ? installed : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "No model installed yet."))]));
  renderChatModels();
}

// ---- chat ----

function renderChatModels() {
  const llms = state.models.installed.filter((i) => i.llm).map((i) => i.name);
  const select = $("#chat-model");
  const current = select.value;
  select.replaceChildren(...llms.map((n) => el("option", { value: n }, n)));
  if (llms.includes(current)) select.value = current;
  $("#chat-empty").hidden = llms.length > 0;
  $("#chat-form").hidden = llms.length === 0;
}

function chatWith(name) {
  $("#chat-model").value = name;
  $("#chat").scrollIntoView();
  $("#chat-input").focus();
}

function clearChat() {
  if (state.chat.abort) state.chat.abort.abort();
  state.chat.messages = [];
  $("#chat-log").replaceChildren();
}

function chatStats(last, ttftMs, stopped) {
  const rate = last.eval_duration > 0 ? (last.eval_count / (last.eval_duration / 1e9)).toFixed(1) : "–";
  const energy = last.energy_j === null || last.energy_j === undefined ? "energy n/a" : `${last.energy_j.toFixed(1)} J`;
  return `${stopped ? "stopped · " : ""}first token ${Math.round(ttftMs)} ms · ${rate} tokens/s · ${last.eval_count} tokens · ${energy}`;
}

// Sends the conversation to /api/chat and streams the answer into the
// log, one NDJSON object at a time; Stop aborts the request, which ends
// the generation on the box.
async function sendChat(ev) {
  ev.preventDefault();
  const input = $("#chat-input");
  const text = input.value.trim();
  if (!text || state.chat.abort) return;
  input.value = "";
  const model = $("#chat-model").value;
  state.chat.messages.push({ role: "user", content: text });
  $("#chat-log").append(el("div", { class: "turn user" }, text));
  const answer = el("span", { class: "answer" });
  const stats = el("small", { class: "stats" }, "…");
  $("#chat-log").append(el("div", { class: "turn assistant" }, answer, stats));
  const system = $("#chat-system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.chat.messages] : state.chat.messages;
  const temperature = Number($("#chat-temperature").value);
  const abort = new AbortController();
  state.chat.abort = abort;
  $("#chat-stop").hidden = false;
  $("#chat-send").disabled = true;
  const started = performance.now();
  let ttft = null, last = null, content = "";
  try {
    const resp = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.session.csrf || "none" },
      body: JSON.stringify({ model, messages, stream: true, options: { temperature } }),
      credentials: "same-origin",
      signal: abort.signal,
    });
    if (!resp.ok) {
      const e = await resp.json().catch(() => ({}));
      throw new Error(e.error || `the box answered ${resp.status}`);
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!line) continue;
        const obj = JSON.parse(line);
        if (obj.error) throw new Error(obj.error);
        if (obj.message && obj.message.content) {
          if (ttft === null) ttft = performance.now() - started;
          content += obj.message.content;
          answer.textContent = content;
        }
        if (obj.done) last = obj;
      }
    }
    stats.textContent = last ? chatStats(last, ttft ?? performance.now() - started, false) : "the answer ended early";
  } catch (e) {
    if (e.name === "AbortError") {
      stats.textContent = `stopped after ${content.length} characters`;
      stats.classList.add("stopped");
    } else {
      stats.textContent = `failed: ${e.message}`;
      stats.classList.add("error");
    }
  } finally {
    state.chat.messages.push({ role: "assistant", content });
    state.chat.abort = null;
    $("#chat-stop").hidden = true;
    $("#chat-send").disabled = false;
  }
}

async function install(name) {
  const r = await change("POST", "/api/models/install", { name });
  if (r) trackJob({ id: r.job, name, phase: "queued", bytes_done: 0, bytes_total: 0 });
}

async function run(name) {
  const box = $("#run-result");
  box.hidden = false;
  box.replaceChildren(`Running ${name}…`);
  const r = await change("POST", `/api/models/${encodeURIComponent(name)}/run`);
  if (!r) { box.hidden = true; return; }
  box.replaceChildren(
    el("strong", {}, `${r.name}: `),
    el("span", { class: "run-provider" }, r.provider), ` in `,
    el("span", { class: "run-latency" }, `${r.latency_ms.toFixed(2)} ms`),
    ...r.outputs.map((o) => el("small", {}, `${o.name} ${o.dtype}[${o.shape.join("×")}]: ${o.first.map((v) => typeof v === "number" ? +v.toFixed(4) : v).join(", ")}…`)));
  loadModels();
}

async function remove(name) {
  if (!confirm(`Remove ${name} from this box?`)) return;
  if (await change("POST", `/api/models/${encodeURIComponent(name)}/remove`)) {
    say(`${name} was removed.`, "info");
    loadModels();
  }
}

async function uploadModel(ev) {
  ev.preventDefault();
  const file = $("#model-file").files[0];
  if (!file) return say("Choose a model pack file first.");
  $("#upload-model-progress").textContent = `Uploading ${file.name}…`;
  state.uploading = file.name;
  const r = await change("POST", "/api/models/upload", undefined, file);
  $("#upload-model-progress").textContent = "";
  if (r) trackJob({ id: r.job, name: file.name, phase: "queued", bytes_done: 0, bytes_total: file.size });
  state.uploading = null;
}

async function modelFinished(ev) {
  const id = ev.job.split("/").pop();
  const job = state.jobs.get(id);
  const name = ev.name || (job && job.name) || state.uploading || "the model";
  state.jobs.delete(id);
  state.finished.add(id);
  // The lists first, so that the message and the rows agree.
  await loadModels();
  if (ev.success) say(`${name} is installed and ready to run.`, "info");
  else say(`Install of ${name} failed: ${ev.message}`);
}

// ---- power ----

async function loadPower() {
  try {
    renderPower(await api("GET", "/api/power"));
  } catch (e) {
    $("#degraded").textContent = e.message;
  }
}

function renderPower(p) {
  $("#profiles").replaceChildren(...p.profiles.map((name) =>
    el("button", { type: "button", "aria-pressed": String(name === p.profile), data: { profile: name },
      onclick: async () => { const r = await change("POST", "/api/power/profile", { profile: name }); if (r) renderPower(r); } }, name)));
  $("#budget").textContent = `${p.budget_watts} W `;
  $("#budget-input").placeholder = String(p.budget_watts);
  $("#watts").textContent = p.system_watts === null ? "no power sensor" : `${p.system_watts.toFixed(1)} W`;
  $("#temps").textContent = p.temperatures.length ? p.temperatures.map((t) => `${t.zone} ${t.celsius.toFixed(1)} °C`).join(", ") : "no sensor";
  $("#degraded").textContent = p.degraded ? `held back: ${p.degraded}` : "none";
}

async function setBudget(ev) {
  ev.preventDefault();
  const watts = Number($("#budget-input").value);
  const r = await change("POST", "/api/power/budget", { watts });
  if (r) renderPower(r);
}

// ---- updates ----

async function loadUpdate() {
  try {
    state.update = await api("GET", "/api/update");
  } catch (e) {
    $("#health").textContent = e.message;
    return;
  }
  const u = state.update;
  $("#system-version").textContent = u.version;
  $("#booted-slot").textContent = `${u.booted} (next boot: ${u.primary})`;
  $("#health").textContent = u.health + (u.last_error ? ` — last error: ${u.last_error}` : "");
  $("#slots").replaceChildren(...u.slots.map((s) => el("tr", { data: { slot: s.name } },
    el("td", {}, s.name + (s.booted ? " (running)" : "")),
    el("td", {}, s.version || "—"),
    el("td", {}, s.health && s.health !== s.state ? `${s.state}, ${s.health}` : s.state),
    el("td", {}, s.primary ? "boots next" : ""))));
  renderUpdateJob(u.job);
}

function renderUpdateJob(job) {
  const active = job && !["done", "failed"].includes(job.phase);
  $("#update-job").hidden = !active;
  if (!active) return;
  $("#update-progress").value = job.bytes_total ? job.bytes_done / job.bytes_total : 0;
  const parts = [job.phase, `${bytes(job.bytes_done)} of ${bytes(job.bytes_total)}`];
  if (job.bytes_per_sec) parts.push(`${bytes(job.bytes_per_sec)}/s`);
  if (job.eta_seconds > 0) parts.push(duration(job.eta_seconds));
  $("#update-progress-text").textContent = `${job.version} → slot ${job.slot}: ${parts.join(" · ")}`;
  $("#update-cancel").onclick = () => change("POST", `/api/update/jobs/${job.id}/cancel`);
}

async function checkUpdate() {
  const r = await change("POST", "/api/update/check");
  if (!r) return;
  $("#update-check-result").textContent = r.available ? `Version ${r.version} is available (running ${r.current_version}).` : `Up to date (${r.current_version}).`;
  $("#update-install").hidden = !r.available;
}

async function installUpdate() {
  if (await change("POST", "/api/update/install")) loadUpdate();
}

async function uploadUpdate(ev) {
  ev.preventDefault();
  const file = $("#update-file").files[0];
  if (!file) return say("Choose an update bundle first.");
  if (await change("POST", "/api/update/upload", undefined, file)) loadUpdate();
}

async function rollback() {
  if (!confirm("Boot the other system slot from the next restart?")) return;
  const r = await change("POST", "/api/update/rollback");
  if (r) { say(`Slot ${r.primary} boots next.`, "info"); loadUpdate(); }
}

// ---- live events ----

function listen() {
  const es = new EventSource("/api/events");
  state.events = es;
  es.onmessage = (e) => {
    const ev = JSON.parse(e.data);
    switch (ev.type) {
      case "model-job":
        mergeJob(ev.job);
        renderModels();
        break;
      case "model-finished": modelFinished(ev); break;
      case "models-changed": loadModels(); break;
      case "power": renderPower(ev.power); break;
      case "update-job": renderUpdateJob(ev.job); break;
      case "update-finished":
        say(ev.success ? "The update is installed: it runs from the next restart." : `Update failed: ${ev.message}`, ev.success ? "info" : "error");
        loadUpdate();
        break;
      default: refreshAll();
    }
  };
  es.onopen = () => refreshAll();
}

function refreshAll() {
  loadModels();
  loadPower();
  loadUpdate();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", submitLogin);
  $("#login-cancel").addEventListener("click", () => $("#login").close());
  $("#login-button").addEventListener("click", askLogin);
  $("#logout-button").addEventListener("click", async () => {
    await change("POST", "/api/logout");
    state.session = { ...state.session, logged_in: false, csrf: null };
    renderSession();
  });
  $("#upload-model").addEventListener("submit", uploadModel);
  $("#budget-form").addEventListener("submit", setBudget);
  $("#update-check").addEventListener("click", checkUpdate);
  $("#update-install").addEventListener("click", installUpdate);
  $("#upload-update").addEventListener("submit", uploadUpdate);
  $("#rollback").addEventListener("click", rollback);
  $("#chat-form").addEventListener("submit", sendChat);
  $("#chat-stop").addEventListener("click", () => state.chat.abort && state.chat.abort.abort());
  $("#chat-clear").addEventListener("click", clearChat);
  $("#chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  loadSession().then(refreshAll);
  listen();
});
