// fluxrt web page: submits generation jobs to /v1/jobs, follows each job's progress over its event stream
// (live previews), and shows the results in a gallery with their parameters and download links.
// Plain browser JavaScript, no build step, nothing loaded from outside the server.
// Every request carries `Authorization: Bearer <token>` when a token is set (kept in localStorage), so the event
// stream is read with fetch() rather than EventSource (which cannot send headers), and images are fetched as blobs.
"use strict";

const TOKEN_KEY = "fluxrt.token";
const FIELDS = ["prompt", "width", "height", "steps", "guidance", "seed", "num_images", "negative", "timeout"];
const REF_FIELDS = new Set(["image", "image[]", "images", "ref", "refs", "reference", "references"]);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;
const HISTORY_LIMIT = 30;
// Parameters shown on a card, in this order, with their labels; other scalar params follow under their own names.
const PARAM_LABELS = [["size", "size"], ["steps", "steps"], ["guidance", "guidance"], ["seed", "seed"],
  ["num_images", "images"], ["n_refs", "references"], ["refs", "references"], ["negative", "negative"],
  ["model", "model"]];
const PARAM_HIDDEN = new Set(["prompt", "width", "height", "timeout"]); // timeout: a limit, not an image parameter

const $ = (sel, root = document) => root.querySelector(sel);
const state = { refs: [], cards: new Map() }; // refs: [{file, url}]; cards: job id -> {el, job, following, blobs}

// ------------------------------------------------------------------------------------------------ HTTP
class ApiError extends Error {
  constructor(message, status, fields) {
    super(message);
    this.status = status;
    this.fields = fields;
  }
}

function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: { ...authHeaders(), ...(opts.headers || {}) } });
  if (!res.ok) throw await httpError(res);
  return res;
}

// Error bodies: fluxrt's {"error": {"message", "param", ...}} or FastAPI's {"detail": str | [{loc, msg}]}.
async function httpError(res) {
  let body = null;
  try {
    body = await res.json();
  } catch (e) {
    body = null;
  }
  let message = "";
  let fields = [];
  if (body && body.error && typeof body.error === "object") {
    message = body.error.message || "";
    fields = body.error.param ? [fieldElement(String(body.error.param))] : fieldsOf(message);
  } else if (body && body.detail != null) {
    message = formatDetail(body.detail);
    fields = fieldsOf(body.detail);
  }
  message = message || `${res.status} ${res.statusText || "error"}`;
  if (res.status === 401 || res.status === 403) message += " (set the API token at the top right)";
  return new ApiError(message, res.status, fields.filter(Boolean));
}

// FastAPI errors: {"detail": "text"} or {"detail": [{"loc": ["body", "width"], "msg": "..."}, ...]}.
function formatDetail(detail) {
  if (detail == null) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const loc = locField(d.loc);
      const msg = d.msg || JSON.stringify(d);
      return loc ? `${loc}: ${msg}` : msg;
    }).join("\n");
  }
  return JSON.stringify(detail);
}

function locField(loc) {
  if (!Array.isArray(loc)) return "";
  return loc.filter((p) => !["body", "query", "path", "form"].includes(p)).join(".");
}

// The form fields an error names: the last `loc` part of list errors, the leading word of a string error.
function fieldsOf(detail) {
  const names = [];
  if (Array.isArray(detail)) {
    for (const d of detail) if (Array.isArray(d.loc)) names.push(String(d.loc[d.loc.length - 1]));
  } else if (typeof detail === "string") {
    const m = detail.match(/^([A-Za-z_]+(?:\[\])?)/);
    if (m) names.push(m[1]);
  }
  return names.map(fieldElement).filter(Boolean);
}

function fieldElement(name) {
  name = name.replace(/\[\d+\]$/, "");
  if (REF_FIELDS.has(name)) return $("#dropzone");
  if (name === "n") return $("#num_images");
  if (name === "size") return $("#width");
  return FIELDS.includes(name) ? $(`#${name}`) : null;
}

// ------------------------------------------------------------------------------------------------ event stream
// Server-sent events from a fetch() body: blocks separated by a blank line, `event:` and `data:` lines.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  let pendingCR = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    let text = pendingCR + value; // a "\r\n" may be split across chunks
    pendingCR = text.endsWith("\r") ? "\r" : "";
    if (pendingCR) text = text.slice(0, -1);
    buf += text.replace(/\r\n?/g, "\n");
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const ev = parseEvent(buf.slice(0, i));
      buf = buf.slice(i + 2);
      if (ev) yield ev;
    }
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const key = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (key === "event") event = value;
    else if (key === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

// ------------------------------------------------------------------------------------------------ jobs
async function follow(id) {
  const card = state.cards.get(id);
  if (!card || card.following) return;
  card.following = true;
  try {
    const res = await api(`/v1/jobs/${encodeURIComponent(id)}/events?preview=1`,
      { headers: { Accept: "text/event-stream" } });
    for await (const ev of sseEvents(res.body)) {
      if (ev.event === "progress") {
        const p = JSON.parse(ev.data);
        const status = p.status || (p.step > 0 ? "running" : card.job.status);
        if (status !== card.job.status && !TERMINAL.has(status)) renderJob({ id, status });
        showProgress(card, p);
      }
      else if (ev.event === "done") return renderJob(JSON.parse(ev.data));
    }
  } catch (err) {
    console.warn(`event stream of job ${id} broke off, polling instead:`, err);
  } finally {
    card.following = false;
  }
  await poll(id); // the stream ended without `done` (proxy, restart): ask for the job until it finishes
}

async function poll(id) {
  for (;;) {
    try {
      const job = await (await api(`/v1/jobs/${encodeURIComponent(id)}`)).json();
      renderJob(job);
      if (TERMINAL.has(job.status)) return;
    } catch (err) {
      const card = state.cards.get(id);
      if (card) showCardError(card, `Lost track of this job: ${err.message}`);
      return;
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

async function submit(ev) {
  ev.preventDefault();
  clearError();
  const form = $("#gen-form");
  const fd = new FormData();
  for (const name of FIELDS) {
    const value = form.elements[name].value.trim();
    if (value !== "") fd.append(name, value);
  }
  for (const r of state.refs) fd.append("image[]", r.file, r.file.name);
  const button = $("#submit");
  button.disabled = true;
  button.textContent = "Submitting…";
  try {
    const job = await (await api("/v1/jobs", { method: "POST", body: fd })).json();
    if (!job.params) job.params = formParams(form);
    renderJob(job);
    follow(job.id);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
    button.textContent = "Generate";
  }
}

function formParams(form) {
  const params = {};
  for (const name of FIELDS) if (form.elements[name].value.trim() !== "") params[name] = form.elements[name].value;
  return params;
}

async function cancel(id) {
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    const card = state.cards.get(id);
    if (card) showCardError(card, `Cancel failed: ${err.message}`);
  }
}

async function loadHistory() {
  try {
    const { jobs } = await (await api(`/v1/jobs?limit=${HISTORY_LIMIT}`)).json();
    for (const job of [...jobs].reverse()) { // newest first from the server; cards are prepended
      renderJob(job);
      if (!TERMINAL.has(job.status)) follow(job.id);
    }
  } catch (err) {
    showError(err);
  }
}

// ------------------------------------------------------------------------------------------------ gallery
function cardFor(job) {
  let card = state.cards.get(job.id);
  if (card) return card;
  const el = $("#card-template").content.firstElementChild.cloneNode(true);
  el.dataset.jobId = job.id;
  card = { el, job, following: false, blobs: [], shownImages: "" };
  $(".cancel", el).addEventListener("click", () => cancel(job.id));
  $(".reuse", el).addEventListener("click", () => reuse(card.job.params || {}));
  $("#gallery").prepend(el);
  state.cards.set(job.id, card);
  $("#gallery-empty").hidden = true;
  return card;
}

function renderJob(job) {
  const card = cardFor(job);
  card.job = { ...card.job, ...job };
  const { el } = card;
  const status = card.job.status || "queued";
  el.dataset.status = status;
  $(".badge", el).textContent = status;
  $(".badge", el).className = `badge ${status}`;
  $(".card-time", el).textContent = timeText(card.job);
  $(".card-prompt", el).textContent = (card.job.params || {}).prompt || "";
  renderParams($(".params", el), card.job.params || {});
  $(".cancel", el).hidden = TERMINAL.has(status);
  if (card.job.progress) showProgress(card, card.job.progress);
  $(".card-progress", el).hidden = TERMINAL.has(status);
  if (card.job.error) showCardError(card, card.job.error);
  if (status === "succeeded") renderImages(card, card.job.images || []);
  if (status !== "succeeded" && TERMINAL.has(status)) $(".preview", el)?.classList.add("stale");
  updateStatusLine();
}

function renderParams(dl, params) {
  const rows = [];
  if (params.width != null && params.height != null) rows.push(["size", "size", `${params.width}×${params.height}`]);
  for (const [key, label] of PARAM_LABELS) {
    if (key === "size" || params[key] == null || (key === "n_refs" && !params[key])) continue;
    rows.push([key, label, paramText(params[key])]);
  }
  const known = new Set(PARAM_LABELS.map(([k]) => k));
  for (const [key, value] of Object.entries(params)) {
    if (!known.has(key) && !PARAM_HIDDEN.has(key) && value != null && typeof value !== "object") {
      rows.push([key, key.replace(/_/g, " "), String(value)]);
    }
  }
  dl.replaceChildren(...rows.flatMap(([key, label, text]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = label;
    dd.textContent = text;
    dd.dataset.param = key;
    return [dt, dd];
  }));
}

function paramText(value) {
  if (Array.isArray(value)) return value.every((v) => typeof v !== "object") ? value.join(", ") : String(value.length);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function timeText(job) {
  const created = toDate(job.created_at);
  if (!created) return "";
  const finished = toDate(job.finished_at);
  const took = finished ? ` · ${((finished - created) / 1000).toFixed(1)} s` : "";
  return created.toLocaleTimeString() + took;
}

function toDate(t) {
  if (t == null) return null;
  const d = typeof t === "number" ? new Date(t < 1e12 ? t * 1000 : t) : new Date(t);
  return isNaN(d) ? null : d;
}

function showProgress(card, p) {
  const bar = $("progress", card.el);
  const total = Number(p.total) || 0;
  const step = Number(p.step) || 0;
  if (total > 0) {
    bar.max = total;
    bar.value = step;
    $(".progress-text", card.el).textContent = `step ${step} / ${total}`;
  }
  if (p.preview && card.job.status !== "succeeded") {
    let img = $(".preview", card.el);
    if (!img) {
      img = document.createElement("img");
      img.className = "preview";
      img.alt = "live preview";
      $(".card-images", card.el).replaceChildren(img);
    }
    img.src = p.preview;
  }
}

async function renderImages(card, urls) {
  const key = urls.join("\n");
  if (card.shownImages === key) return;
  card.shownImages = key;
  const figures = await Promise.all(urls.map((url, i) => imageFigure(card, url, i)));
  $(".card-images", card.el).replaceChildren(...figures);
}

async function imageFigure(card, url, i) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  const src = await imageSource(card, url).catch((err) => {
    showCardError(card, `Cannot load ${url}: ${err.message}`);
    return "";
  });
  img.src = src;
  img.alt = (card.job.params || {}).prompt || "generated image";
  img.className = "result";
  img.loading = "lazy";
  const bar = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = src || url;
  link.download = `fluxrt-${card.job.id}-${i}.png`;
  link.textContent = "Download";
  link.className = "download";
  const useRef = document.createElement("button");
  useRef.type = "button";
  useRef.className = "secondary small";
  useRef.textContent = "Use as ref";
  useRef.title = "Add this image to the reference images";
  useRef.addEventListener("click", () => addRefFromUrl(url, link.download));
  bar.append(link, useRef);
  fig.append(img, bar);
  return fig;
}

// An <img> cannot send headers: with a token and an unsigned URL, fetch the file and show it from a blob URL.
// The service's URLs are signed (?exp=..&sig=..), so they load as they are.
async function imageSource(card, url) {
  if (!token() || /[?&]sig=/.test(url)) return url;
  const blob = await (await api(url)).blob();
  const objectUrl = URL.createObjectURL(blob);
  card.blobs.push(objectUrl);
  return objectUrl;
}

function showCardError(card, message) {
  const p = $(".card-error", card.el);
  p.textContent = message;
  p.hidden = false;
}

function updateStatusLine() {
  const active = [...state.cards.values()].filter((c) => !TERMINAL.has(c.job.status)).length;
  $("#gallery-status").textContent = active ? `${active} in progress` : "";
}

function reuse(params) {
  const form = $("#gen-form");
  for (const name of FIELDS) {
    if (typeof params[name] !== "object") form.elements[name].value = params[name] ?? "";
  }
  form.elements.prompt.focus();
}

// ------------------------------------------------------------------------------------------------ references
function addFiles(files) {
  const rejected = [];
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      rejected.push(file.name);
      continue;
    }
    state.refs.push({ file, url: URL.createObjectURL(file) });
  }
  renderRefs();
  if (rejected.length) showError(new ApiError(`Not an image: ${rejected.join(", ")}`, 0, [$("#dropzone")]));
}

async function addRefFromUrl(url, name) {
  try {
    const blob = await (await api(url)).blob();
    addFiles([new File([blob], name, { type: blob.type || "image/png" })]);
  } catch (err) {
    showError(err);
  }
}

function renderRefs() {
  const items = state.refs.map((ref, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = ref.url;
    img.alt = ref.file.name;
    const name = document.createElement("span");
    name.textContent = ref.file.name;
    name.title = ref.file.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `remove ${ref.file.name}`);
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(ref.url);
      state.refs.splice(i, 1);
      renderRefs();
    });
    li.append(img, name, remove);
    return li;
  });
  $("#refs").replaceChildren(...items);
}

function setupDropzone() {
  const zone = $("#dropzone");
  const input = $("#ref-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    addFiles([...input.files]);
    input.value = "";
  });
  // Files dropped anywhere on the page become references (instead of the browser opening them).
  window.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  window.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) zone.classList.remove("over");
  });
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles([...e.dataTransfer.files]);
  });
}

// ------------------------------------------------------------------------------------------------ errors, token
function showError(err) {
  const box = $("#error");
  box.textContent = err.message || String(err);
  box.hidden = false;
  const fields = err.fields || [];
  for (const el of fields) el.setAttribute("aria-invalid", "true");
  if (fields.length) fields[0].focus();
  if (err.status === 401 || err.status === 403) {
    $("#token-box").open = true;
    $("#token").focus();
  }
}

function clearError() {
  $("#error").hidden = true;
  $("#error").textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function setupToken() {
  const input = $("#token");
  input.value = token();
  const save = () => {
    const t = input.value.trim();
    if (t === token()) return;
    if (t) localStorage.setItem(TOKEN_KEY, t);
    else localStorage.removeItem(TOKEN_KEY);
    clearError();
    state.cards.clear(); // each token sees its own jobs
    $("#gallery").replaceChildren();
    $("#gallery-empty").hidden = false;
    loadHistory();
  };
  input.addEventListener("change", save);
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    save();
    $("#token-box").open = false;
  });
  $("#token-clear").addEventListener("click", () => {
    input.value = "";
    save();
  });
}

function init() {
  setupToken();
  setupDropzone();
  const form = $("#gen-form");
  form.addEventListener("submit", submit);
  form.addEventListener("input", (e) => e.target.removeAttribute("aria-invalid"));
  form.elements.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
  });
  loadHistory();
}

document.addEventListener("DOMContentLoaded", init);
