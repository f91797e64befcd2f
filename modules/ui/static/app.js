// tuneonce GUI: the form is generated from /api/schema; every change is checked by the server
// with the config package's own validation (the same code the CLI runs).
"use strict";

const state = {
  schema: null,
  fields: new Map(),   // dotted key -> field descriptor
  config: null,        // nested config object as the page edits it
  texts: {},           // dotted key -> YAML text of fields edited as text
  preset: null,
  errors: [],
  polling: null,
  recordCount: 0,
  records: [],
  sampleKey: "",
  depthSeq: 0,
  memorySeq: 0,
};

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child) node.append(child);
  return node;
};

// The server's token, written into the page by the server: every request carries it (state-changing
// ones must; a GUI listening beyond localhost asks for it on every request). Sibling pages cannot read it.
const TOKEN = document.querySelector('meta[name="tuneonce-token"]').content;

async function api(path, body) {
  const headers = {"X-Tuneonce-Token": TOKEN};
  const init = body === undefined ? {headers} : {
    method: "POST", headers: {...headers, "Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  if (!response.ok) {
    const error = new Error(data.error || `HTTP ${response.status}`);
    error.status = response.status;
    error.data = data;
    throw error;
  }
  return data;
}

function setStatus(text, bad = false) {
  const line = $("#status-line");
  line.textContent = text;
  line.className = bad ? "bad" : "muted";
}

// ---------------------------------------------------------------- config values

function getPath(obj, key) {
  let node = obj;
  for (const part of key.split(".")) {
    if (node === null || typeof node !== "object" || !(part in node)) return undefined;
    node = node[part];
  }
  return node;
}

function setPath(obj, key, value) {
  const parts = key.split(".");
  let node = obj;
  for (const part of parts.slice(0, -1)) {
    if (node[part] === null || typeof node[part] !== "object") node[part] = {};
    node = node[part];
  }
  node[parts[parts.length - 1]] = value;
}

function displayValue(field, value) {
  if (value === null || value === undefined) return "";
  return String(value);
}

// Text from an input -> the value sent to the server. What does not parse is sent as typed,
// so the server's validation (not this page) says what is wrong with it.
function parseValue(field, text) {
  const trimmed = text.trim();
  if (field.kind === "int" || field.kind === "float") {
    if (trimmed === "") return null;
    const number = Number(trimmed);
    return Number.isFinite(number) ? number : text;
  }
  if (field.kind === "str" && trimmed === "" && field.nullable) return null;
  return text;
}

// ---------------------------------------------------------------- form

function indexFields(section) {
  for (const field of section.fields) state.fields.set(field.key, field);
  for (const sub of section.sections) indexFields(sub);
}

function renderForm() {
  const form = $("#config-form");
  form.replaceChildren();
  const nav = $("#section-nav");
  nav.replaceChildren();
  for (const section of state.schema.sections) {
    form.append(renderSection(section, 0));
    const id = sectionId(section.key);
    nav.append(el("li", {}, el("a", {href: `#${id}`, text: section.title})));
  }
}

function sectionId(key) {
  return `sec-${key || "general"}`.replace(/\./g, "-");
}

function renderSection(section, level) {
  const box = el("fieldset", {class: "section", id: sectionId(section.key), "data-section": section.key});
  box.append(el("legend", {text: section.title + (level && section.key ? ` (${section.key})` : "")}));
  if (section.description) box.append(el("p", {class: "section-desc", text: section.description}));
  for (const field of section.fields) box.append(renderField(field));
  for (const sub of section.sections) box.append(renderSection(sub, level + 1));
  return box;
}

function renderField(field) {
  const id = `f-${field.key.replace(/\./g, "-")}`;
  const row = el("div", {class: "field", "data-field": field.key});
  const label = el("label", {for: id, text: field.label});
  label.append(el("span", {class: "key", text: field.key}));
  const control = el("div", {class: "control"});
  const value = getPath(state.config, field.key);
  let input;
  if (field.kind === "bool") {
    input = el("input", {type: "checkbox", id, "data-key": field.key});
    input.checked = Boolean(value);
    input.addEventListener("change", () => onEdit(field, input.checked));
    control.append(el("span", {class: "switch"}, input, el("span", {class: "switch-text", text: field.label})));
  } else if (field.kind === "enum") {
    input = el("select", {id, "data-key": field.key});
    if (field.nullable) input.append(el("option", {value: "", text: "(none)"}));
    for (const choice of field.choices) input.append(el("option", {value: String(choice), text: String(choice)}));
    input.value = value === null || value === undefined ? "" : String(value);
    input.addEventListener("change", () => {
      const choice = field.choices.find((c) => String(c) === input.value);
      onEdit(field, choice === undefined ? null : choice);
    });
    control.append(input);
  } else if (field.kind === "yaml") {
    const text = state.texts[field.key] ?? "";
    input = field.multiline
      ? el("textarea", {id, "data-key": field.key, spellcheck: "false", rows: Math.min(12, text.split("\n").length + 1)})
      : el("input", {type: "text", id, "data-key": field.key, spellcheck: "false"});
    input.value = text;
    input.placeholder = field.nullable ? "null" : "YAML";
    input.addEventListener("input", () => { state.texts[field.key] = input.value; scheduleCheck(field.key, 400); });
    control.append(input);
  } else {
    input = el("input", {type: "text", id, "data-key": field.key, spellcheck: "false",
                         inputmode: field.kind === "int" ? "numeric" : field.kind === "float" ? "decimal" : null});
    input.value = displayValue(field, value);
    if (field.nullable) input.placeholder = "null";
    input.addEventListener("input", () => onEdit(field, parseValue(field, input.value), 400));
    control.append(input);
  }
  const hints = [field.description];
  if (field.min !== undefined || field.max !== undefined) {
    const lo = field.min === undefined ? "" : `${field.exclusive_min ? ">" : "≥"} ${field.min}`;
    const hi = field.max === undefined ? "" : `${field.exclusive_max ? "<" : "≤"} ${field.max}`;
    hints.push(`[${[lo, hi].filter(Boolean).join(", ")}]`);
  }
  control.append(el("div", {class: "desc", text: hints.filter(Boolean).join(" ")}));
  control.append(el("div", {class: "blocked-reason", "data-blocked-for": field.key, hidden: true}));
  control.append(el("div", {class: "error", "data-error-for": field.key, hidden: true}));
  row.append(label, control);
  return row;
}

function onEdit(field, value, delay = 120) {
  setPath(state.config, field.key, value);
  scheduleCheck(field.key, delay);
}

// ---------------------------------------------------------------- validation round-trip

let checkTimer = null;
let checkSeq = 0;
let depthTimer = null;
let memoryTimer = null;

function scheduleCheck(changedKey, delay) {
  clearTimeout(checkTimer);
  setStatus("checking…");
  checkTimer = setTimeout(runCheck, delay);
  if (changedKey && /^(model|optimizer|lora|method)\b/.test(changedKey)) {
    clearTimeout(depthTimer);
    depthTimer = setTimeout(loadDepth, delay + 300);
  }
  // the memory plan also follows the resolution, batch, caches, sampling and memory settings
  if (changedKey && /^(model|optimizer|lora|method|data|training|memory|sampling)\b/.test(changedKey)) {
    clearTimeout(memoryTimer);
    memoryTimer = setTimeout(loadMemory, delay + 300);
  }
}

async function runCheck() {
  const seq = ++checkSeq;
  try {
    const result = await api("/api/check", {config: state.config, texts: state.texts});
    if (seq === checkSeq) applyCheck(result);
  } catch (err) {
    setStatus(`check failed: ${err.message}`, true);
  }
}

function fieldRowFor(key) {
  // An error on "data.folders.0.path" belongs to the "data.folders" field.
  let probe = key;
  while (probe) {
    if (state.fields.has(probe)) return document.querySelector(`.field[data-field="${CSS.escape(probe)}"]`);
    probe = probe.includes(".") ? probe.slice(0, probe.lastIndexOf(".")) : "";
  }
  return null;
}

function applyCheck(result) {
  state.errors = result.errors;
  for (const row of document.querySelectorAll(".field.invalid")) row.classList.remove("invalid");
  for (const box of document.querySelectorAll("[data-error-for]")) { box.hidden = true; box.textContent = ""; }
  const global = [];
  for (const {key, message} of result.errors) {
    const row = fieldRowFor(key);
    if (!row) { global.push(key ? `${key}: ${message}` : message); continue; }
    row.classList.add("invalid");
    const box = row.querySelector("[data-error-for]");
    const own = row.dataset.field === key ? message : `${key}: ${message}`;
    box.textContent = box.textContent ? `${box.textContent}; ${own}` : own;
    box.hidden = false;
  }
  const globalBox = $("#global-errors");
  globalBox.hidden = global.length === 0;
  globalBox.textContent = global.join("\n");
  const warnBox = $("#warnings");
  warnBox.hidden = !result.warnings || result.warnings.length === 0;
  warnBox.textContent = (result.warnings || []).map((w) => `warning: ${w}`).join("\n");
  applyBlocked(result.blocked || {});
  const n = result.errors.length;
  setStatus(n ? `${n} problem${n > 1 ? "s" : ""} to fix` : "config valid", n > 0);
  updateButtons();
}

// Greys out the switch positions and choices that the config's validation rejects from here.
function applyBlocked(blocked) {
  for (const [key, field] of state.fields) {
    const row = document.querySelector(`.field[data-field="${CSS.escape(key)}"]`);
    if (!row) continue;
    const input = row.querySelector("[data-key]");
    const reasonBox = row.querySelector("[data-blocked-for]");
    const rejected = blocked[key] || {};
    let reason = "";
    if (field.kind === "bool") {
      reason = rejected[input.checked ? "false" : "true"] || "";
      input.disabled = Boolean(reason);
    } else if (field.kind === "enum") {
      const notes = [];
      for (const option of input.options) {
        const why = rejected[option.value];
        option.disabled = Boolean(why);
        option.title = why || "";
        option.textContent = why ? `${option.value} (rejected)` : (option.value || "(none)");
        if (why) notes.push(`${option.value}: ${why}`);
      }
      reason = notes.join("; ");
    } else {
      continue;
    }
    row.classList.toggle("blocked", field.kind === "bool" && Boolean(reason));
    reasonBox.hidden = !reason;
    reasonBox.textContent = reason ? `Not allowed here: ${reason}` : "";
  }
}

// ---------------------------------------------------------------- presets

async function loadPresets() {
  const list = $("#presets");
  try {
    const {presets, save_dir: saveDir} = await api("/api/presets");
    $("#save-dir").textContent = saveDir;
    list.replaceChildren();
    if (!presets.length) list.append(el("li", {class: "muted", text: "no presets found"}));
    for (const name of presets) {
      const button = el("button", {type: "button", "data-preset": name, text: name.replace(/\.ya?ml$/, ""),
                                   class: name === state.preset ? "active" : null});
      button.addEventListener("click", () => openPreset(name));
      list.append(el("li", {}, button));
    }
  } catch (err) {
    list.replaceChildren(el("li", {class: "bad", text: err.message}));
  }
}

async function openPreset(name) {
  setStatus(`opening ${name}…`);
  try {
    const data = await api(`/api/preset?name=${encodeURIComponent(name)}`);
    state.config = data.config;
    state.texts = data.texts;
    state.preset = name;
    for (const b of document.querySelectorAll("#presets button")) b.classList.toggle("active", b.dataset.preset === name);
    $("#preset-name").textContent = name;
    $("#save-path").value = data.save_path || "";
    renderForm();
    applyCheck(data);
    loadDepth();
    loadMemory();
  } catch (err) {
    setStatus(err.message, true);
  }
}

// ---------------------------------------------------------------- depth

async function loadDepth() {
  if (!state.config) return;
  const body = $("#depth-body");
  if (!body.querySelector("table")) { body.className = "muted"; body.textContent = "counting residual depth…"; }
  const seq = ++state.depthSeq;
  try {
    const data = await api("/api/depth", {config: state.config, texts: state.texts});
    if (seq !== state.depthSeq) return;  // a newer request is on its way
    renderDepth(data);
  } catch (err) {
    body.className = "bad";
    body.textContent = err.message;
  }
}

function renderDepth(data) {
  const body = $("#depth-body");
  body.className = "";
  body.replaceChildren();
  if (data.error) {
    body.append(el("div", {class: "muted", text: data.error}));
    return;
  }
  if (data.source) body.append(el("div", {class: "small muted", text: data.source}));
  const table = el("table", {class: "depth"});
  const head = el("tr");
  for (const title of data.columns) head.append(el("th", {text: title}));
  table.append(head);
  for (const row of data.rows) {
    const tr = el("tr", {"data-component": row.component, class: row.trained ? "" : "frozen"});
    const name = el("td", {title: `${row.class}${row.trained ? "" : " (not trained by this config)"}`});
    name.textContent = row.component;
    tr.append(name);
    for (const cell of row.cells) tr.append(el("td", {class: "num", text: String(cell)}));
    table.append(tr);
  }
  body.append(table);
  for (const note of data.notes || []) body.append(el("div", {class: "small muted", text: note}));
}

// ---------------------------------------------------------------- memory plan

async function loadMemory() {
  if (!state.config) return;
  const body = $("#memory-body");
  const seq = ++state.memorySeq;
  try {
    const data = await api("/api/memory", {config: state.config, texts: state.texts});
    if (seq !== state.memorySeq) return;  // a newer request is on its way
    renderMemory(data);
  } catch (err) {
    body.className = "bad";
    body.textContent = err.message;
  }
}

function renderMemory(data) {
  const body = $("#memory-body");
  body.className = "";
  body.replaceChildren();
  body.dataset.state = data.error ? "error" : "planned";
  if (data.error) {
    body.append(el("div", {class: "muted", text: data.error}));
    return;
  }
  const table = el("table", {class: "memory"});
  for (const [label, value] of data.rows) {
    const tr = el("tr", {"data-row": label});
    tr.append(el("td", {text: label}), el("td", {class: "num", text: value}));
    table.append(tr);
  }
  body.append(table);
  if (data.budget) {
    const b = data.budget;
    const what = b.changes.length ? `picks ${b.changes.join(", ")}` : "fits as written";
    const line = b.fits ? `budget ${b.gb} GiB: ${what}; predicted peak ${b.peak}`
      : `budget ${b.gb} GiB: does not fit even with ${b.changes.join(", ")} (${b.peak}); the run would stop`;
    body.append(el("div", {id: "memory-budget", class: b.fits ? "small" : "small bad", text: line}));
  }
  for (const note of data.notes || []) body.append(el("div", {class: "small muted", text: note}));
}

// ---------------------------------------------------------------- save

// Saves into the user presets folder; an existing file is replaced only after the user said so here.
async function save() {
  const out = $("#save-result");
  out.textContent = "saving…";
  out.className = "small";
  const request = {config: state.config, texts: state.texts, path: $("#save-path").value};
  try {
    let data;
    try {
      data = await api("/api/save", request);
    } catch (err) {
      if (err.status !== 409 || !err.data.exists) throw err;
      if (!window.confirm(`${err.message}. Overwrite it?`)) {
        out.className = "small";
        out.textContent = "not saved (the file exists)";
        return;
      }
      data = await api("/api/save", {...request, overwrite: true});
    }
    out.className = "small ok";
    out.replaceChildren(el("div", {text: `saved ${data.path}`}), el("code", {text: data.command}));
    loadPresets();  // a file saved into the presets folder is listed at once
  } catch (err) {
    out.className = "small bad";
    out.textContent = err.message;
  }
}

// ---------------------------------------------------------------- training run

function updateButtons(runState) {
  const running = (runState || state.runState) === "running";
  const hasConfig = Boolean(state.config);
  $("#save-btn").disabled = !hasConfig;
  $("#run-start").disabled = !hasConfig || running || state.errors.length > 0;
  $("#run-stop").disabled = !running;
}

async function startRun() {
  $("#run-start").disabled = true;
  try {
    await api("/api/run/start", {config: state.config, texts: state.texts});
    state.records = [];
    state.recordCount = 0;
    state.sampleKey = "";
    $("#samples").replaceChildren();
    drawLoss();
    state.runState = "running";
    updateButtons();
    pollStatus();
  } catch (err) {
    $("#run-state").className = "small bad";
    $("#run-state").textContent = err.message;
    updateButtons();
  }
}

async function stopRun() {
  $("#run-stop").disabled = true;
  try { await api("/api/run/stop", {}); } catch (err) { setStatus(err.message, true); }
  pollStatus();
}

async function pollStatus() {
  clearTimeout(state.polling);
  let status;
  try {
    status = await api(`/api/run/status?since=${state.recordCount}`);
  } catch (err) {
    state.polling = setTimeout(pollStatus, 2000);
    return;
  }
  showStatus(status);
  if (status.state === "running") state.polling = setTimeout(pollStatus, 1000);
}

function showStatus(status) {
  state.runState = status.state;
  if (status.record_count < state.recordCount) { state.records = []; } // a new run started elsewhere
  state.records.push(...status.records);
  state.recordCount = status.record_count;
  const box = $("#run-state");
  const code = status.returncode === null || status.returncode === undefined ? "" : ` (exit ${status.returncode})`;
  box.className = `small ${status.state === "failed" ? "bad" : status.state === "finished" ? "ok" : ""}`;
  box.textContent = status.state + code;
  box.dataset.state = status.state;
  const progress = $("#run-progress");
  progress.max = status.max_steps || Math.max(status.step, 1);
  progress.value = status.step || 0;
  const parts = [];
  if (status.state !== "idle") parts.push(`step ${status.step}${status.max_steps ? ` / ${status.max_steps}` : ""}`);
  if (typeof status.loss === "number") parts.push(`loss ${status.loss.toPrecision(4)}`);
  if (typeof status.lr === "number") parts.push(`lr ${status.lr.toExponential(2)}`);
  if (status.elapsed_s !== undefined) parts.push(`${status.elapsed_s}s`);
  $("#run-numbers").textContent = parts.join(" · ");
  $("#run-log").textContent = status.log || "";
  drawLoss();
  showSamples(status.samples || []);
  updateButtons(status.state);
}

function showSamples(samples) {
  const key = samples.map((s) => `${s.name}@${s.mtime}`).join("|");
  if (key === state.sampleKey) return;
  state.sampleKey = key;
  const box = $("#samples");
  box.replaceChildren();
  for (const sample of samples) {
    const src = `/api/run/sample?name=${encodeURIComponent(sample.name)}&t=${sample.mtime}`;
    box.append(el("figure", {}, el("img", {src, alt: sample.name}), el("figcaption", {text: sample.name})));
  }
}

// A small SVG line plot of loss over steps (val_loss as dots); no chart library, no CDN.
function drawLoss() {
  const svg = $("#loss-plot");
  const W = 320, H = 180, left = 44, right = 8, top = 10, bottom = 22;
  const train = state.records.filter((r) => typeof r.loss === "number" && Number.isFinite(r.loss));
  const val = state.records.filter((r) => typeof r.val_loss === "number" && Number.isFinite(r.val_loss));
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  svg.replaceChildren();
  svg.append(make("line", {class: "axis", x1: left, y1: top, x2: left, y2: H - bottom}));
  svg.append(make("line", {class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom}));
  const all = [...train.map((r) => [r.step, r.loss]), ...val.map((r) => [r.step, r.val_loss])];
  svg.dataset.points = String(train.length);
  if (!all.length) {
    svg.append(make("text", {x: left + 8, y: H / 2}, "loss appears here during training"));
    return;
  }
  const steps = all.map((p) => p[0]), values = all.map((p) => p[1]);
  let x0 = Math.min(...steps), x1 = Math.max(...steps);
  let y0 = Math.min(...values), y1 = Math.max(...values);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 + 1e-6; y1 += Math.abs(y1) * 0.05 + 1e-6; }
  const sx = (x) => left + (x - x0) / (x1 - x0) * (W - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom);
  const points = train.map((r) => `${sx(r.step).toFixed(1)},${sy(r.loss).toFixed(1)}`).join(" ");
  svg.append(make("polyline", {class: "loss", points}));
  for (const r of val) svg.append(make("circle", {class: "val", cx: sx(r.step), cy: sy(r.val_loss), r: 2.5}));
  const fmt = (v) => Math.abs(v) >= 0.01 && Math.abs(v) < 1000 ? v.toFixed(3) : v.toExponential(1);
  svg.append(make("text", {x: 2, y: top + 8}, fmt(y1)));
  svg.append(make("text", {x: 2, y: H - bottom}, fmt(y0)));
  svg.append(make("text", {x: left, y: H - 6}, `step ${x0}`));
  svg.append(make("text", {x: W - right, y: H - 6, "text-anchor": "end"}, `${x1}`));
  if (val.length) svg.append(make("text", {x: W - right, y: top + 8, "text-anchor": "end"}, "— loss  ● val"));
}

// ---------------------------------------------------------------- start

async function init() {
  $("#save-btn").addEventListener("click", save);
  $("#run-start").addEventListener("click", startRun);
  $("#run-stop").addEventListener("click", stopRun);
  drawLoss();
  try {
    state.schema = await api("/api/schema");
    indexFields({fields: [], sections: state.schema.sections});
  } catch (err) {
    setStatus(`cannot load the config schema: ${err.message}`, true);
    return;
  }
  await loadPresets();
  pollStatus();  // a run started before this page was (re)loaded keeps reporting
  const wanted = new URLSearchParams(location.search).get("preset");
  if (wanted) openPreset(wanted);
}

init();
