// The imagegen web console: plain JavaScript over the public API, nothing else.
//
// Routes (the URL's hash): "#/" and "#/?status=…" the tenant's recent tasks, "#/tasks/<id>" one task.
// Every value that comes from the API is put into the page with textContent or as an attribute, never as
// HTML. Lists the page offers (aspect ratios, sizes, input types, statuses) are read from /openapi.json,
// which also says whether this server needs a key. Polling stands in for the missing event stream.

const KEY_STORAGE = "imagegen.apiKey";
const LIST_POLL_MS = 1500;
const TASK_POLL_MS = 1000;
const FINAL_TASK_POLL_MS = 3000; // a final task's webhook deliveries still change
const PAGE = 24;
const MAX_LIMIT = 100;
const FINAL = new Set(["succeeded", "failed", "canceled"]);
const PROMPT_IN_METADATA = 200; // characters of the prompt kept in metadata.prompt, shown in the list

const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  keyRequired: true,
  spec: null,
  generation: 0, // bumped on every route change: a poll of an older route drops its answer
  timer: null,
  limit: PAGE,
  cards: new Map(), // task id -> card element, kept across polls so images load once
  outputs: new Map(), // output key -> figure element on the task page
  task: null,
  pending: null, // the submission last sent and its Idempotency-Key, until it is accepted
};

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

function apiUrl(path) {
  // the page lives at <base>/console/: the API is one level up, wherever the service is mounted
  return new URL(`../${path}`, document.baseURI).toString();
}

async function api(method, path, { body, headers = {}, key = state.key } = {}) {
  const sent = { ...headers };
  if (key) sent.Authorization = `Bearer ${key}`;
  if (body !== undefined) sent["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(apiUrl(path), {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "network_error", "the API could not be reached", null);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(
      response.status,
      error.code || "http_error",
      error.message || `HTTP ${response.status}`,
      error.field || null,
    );
  }
  return data;
}

// banners -----------------------------------------------------------------------------------------

function showError(error, source = "action") {
  const box = $("error");
  const field = error.field ? ` (field: ${error.field})` : "";
  const status = error.status ? ` [HTTP ${error.status}]` : "";
  $("error-text").textContent = `${error.code || "error"}: ${error.message}${field}${status}`;
  box.dataset.code = error.code || "error";
  box.dataset.source = source;
  box.hidden = false;
}

function clearError(source = null) {
  const box = $("error");
  if (source === null || box.dataset.source === source) {
    box.hidden = true;
    delete box.dataset.code;
  }
}

function showNotice(text, href = null) {
  const box = $("notice");
  box.replaceChildren();
  if (href) {
    const link = document.createElement("a");
    link.href = href;
    link.textContent = text;
    box.append(link);
  } else {
    box.textContent = text;
  }
  box.hidden = false;
}

// routing and polling -------------------------------------------------------------------------------

function route() {
  state.generation += 1;
  clearTimeout(state.timer);
  clearError("poll");
  for (const id of ["loading", "signin", "list-view", "task-view"]) $(id).hidden = true;
  const signedIn = !state.keyRequired || state.key;
  $("sign-out").hidden = !state.key;
  if (!signedIn) {
    $("who").textContent = "";
    $("signin").hidden = false;
    $("api-key").focus();
    return;
  }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = hash.split("?");
  const match = path.match(/^\/tasks\/([^/]+)$/);
  if (match) {
    showTask(decodeURIComponent(match[1]));
  } else {
    showList(new URLSearchParams(query).get("status") || "");
  }
}

function poll(generation, fn, delay) {
  if (generation !== state.generation) return;
  clearTimeout(state.timer);
  state.timer = setTimeout(() => fn(generation), delay);
}

// Errors of a poll: a 401 (key revoked, server restarted with other keys) signs out; anything else is
// shown and the poll goes on.
function pollFailed(error) {
  if (error.status === 401 && state.keyRequired) {
    signOut();
    showError(error);
    return;
  }
  showError(error, "poll");
}

// signing in --------------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  try {
    const usage = await api("GET", "v1/usage?days=1", { key });
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    clearError();
    showTenant(usage.tenant);
    route();
  } catch (error) {
    showError(error);
  }
}

function signOut() {
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $("notice").hidden = true;
  route();
}

function showTenant(tenant) {
  $("who").textContent = state.keyRequired ? `tenant ${tenant}` : `open server · tenant ${tenant}`;
}

// the list ----------------------------------------------------------------------------------------

function showList(status) {
  $("list-view").hidden = false;
  for (const link of $("filters").children) {
    link.classList.toggle("active", link.dataset.status === status);
    if (link.dataset.status === status) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("tasks").dataset.status = status;
  pollList(state.generation, status);
}

async function pollList(generation, status = $("tasks").dataset.status) {
  const query = new URLSearchParams({ limit: String(state.limit) });
  if (status) query.set("status", status);
  try {
    const page = await api("GET", `v1/tasks?${query}`);
    if (generation !== state.generation) return;
    renderList(page);
    clearError("poll");
  } catch (error) {
    if (generation !== state.generation) return;
    pollFailed(error);
    if (error.status === 401) return;
  }
  poll(generation, pollList, LIST_POLL_MS);
}

function renderList(page) {
  const grid = $("tasks");
  const seen = new Set();
  let previous = null;
  for (const task of page.data) {
    let card = state.cards.get(task.id);
    if (!card) {
      card = makeCard(task);
      state.cards.set(task.id, card);
    }
    updateCard(card, task);
    const next = previous ? previous.nextSibling : grid.firstChild;
    if (card !== next) grid.insertBefore(card, next);
    previous = card;
    seen.add(task.id);
  }
  for (const [id, card] of state.cards) {
    if (!seen.has(id)) {
      card.remove();
      state.cards.delete(id);
    }
  }
  $("empty").hidden = page.data.length > 0;
  $("more").hidden = page.next_cursor === null || state.limit >= MAX_LIMIT;
}

function makeCard(task) {
  const card = document.createElement("a");
  card.className = "card";
  card.href = `#/tasks/${encodeURIComponent(task.id)}`;
  card.dataset.taskId = task.id;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  const caption = document.createElement("div");
  caption.className = "caption";
  const status = document.createElement("span");
  status.className = "status";
  const title = document.createElement("span");
  title.className = "title";
  const when = document.createElement("span");
  when.className = "when muted";
  caption.append(status, title, when);
  card.append(thumb, caption);
  return card;
}

function updateCard(card, task) {
  const status = card.querySelector(".status");
  setStatus(status, task.status);
  const prompt = task.metadata && typeof task.metadata.prompt === "string" ? task.metadata.prompt : null;
  card.querySelector(".title").textContent = prompt || task.model;
  card.querySelector(".title").title = prompt || task.model;
  const error = task.error ? ` · ${task.error.code}` : "";
  const count = task.outputs.length > 1 ? ` · ${task.outputs.length} images` : "";
  card.querySelector(".when").textContent = `${shortTime(task.created_at)}${count}${error}`;
  const thumb = card.querySelector(".thumb");
  const output = task.outputs[0];
  if (output && !thumb.querySelector("img")) {
    // a presigned URL changes on every read: set it once, or the image would load on every poll
    const img = document.createElement("img");
    img.alt = `output of task ${task.id}`;
    img.loading = "lazy";
    img.addEventListener("error", () => img.remove()); // e.g. an expired URL: the next poll sets a new one
    img.src = output.url;
    thumb.replaceChildren(img);
  } else if (!output) {
    thumb.textContent = task.status;
  }
}

// one task ----------------------------------------------------------------------------------------

function showTask(id) {
  if (!state.task || state.task.id !== id) {
    state.task = null;
    state.outputs.clear();
    $("outputs").replaceChildren();
    $("task-id").textContent = id;
    $("task-status").textContent = "";
    $("cancel").disabled = true;
    $("redeliver").disabled = true;
  }
  $("task-view").hidden = false;
  pollTask(state.generation, id);
}

async function pollTask(generation, id = $("task-id").textContent) {
  try {
    const task = await api("GET", `v1/tasks/${encodeURIComponent(id)}`);
    if (generation !== state.generation) return;
    renderTask(task);
    clearError("poll");
  } catch (error) {
    if (generation !== state.generation) return;
    pollFailed(error);
    if (error.status === 401 || error.status === 404) return;
  }
  poll(generation, pollTask, state.task && FINAL.has(state.task.status) ? FINAL_TASK_POLL_MS : TASK_POLL_MS);
}

function renderTask(task) {
  state.task = task;
  $("task-id").textContent = task.id;
  setStatus($("task-status"), task.status);
  $("cancel").disabled = FINAL.has(task.status);
  $("redeliver").disabled = !task.webhook;

  const facts = [
    ["model", task.model],
    ["created", fullTime(task.created_at)],
    ["started", fullTime(task.started_at)],
    ["finished", fullTime(task.finished_at)],
  ];
  if (task.next_attempt_at) facts.push(["next attempt", fullTime(task.next_attempt_at)]);
  if (task.usage && task.usage.totalTokenCount !== undefined) facts.push(["tokens", task.usage.totalTokenCount]);
  $("task-facts").replaceChildren(
    ...facts.flatMap(([name, value]) => [element("dt", name), element("dd", value ?? "—")]),
  );

  const error = $("task-error");
  error.hidden = !task.error;
  error.textContent = task.error
    ? `${task.error.code}: ${task.error.message}${task.error.retryable ? " (retryable)" : ""}`
    : "";
  $("task-text").replaceChildren(...task.text.map((text) => element("p", text, "model-text")));

  renderOutputs(task);
  fillTable(
    $("attempts"),
    task.attempts.map((attempt) => [
      attempt.number,
      shortTime(attempt.started_at),
      shortTime(attempt.finished_at),
      attempt.outcome ?? "running",
      attempt.upstream_status,
      attempt.error_code,
      duration(attempt.duration_ms),
    ]),
  );

  $("webhook-none").hidden = Boolean(task.webhook);
  $("webhook").hidden = !task.webhook;
  if (task.webhook) {
    $("webhook-url-shown").textContent = task.webhook.url;
    $("webhook-events").textContent = task.webhook.events.join(", ");
    fillTable(
      $("deliveries"),
      task.webhook.deliveries.map((delivery) => [
        delivery.event,
        delivery.attempt,
        shortTime(delivery.attempted_at),
        delivery.status_code !== null ? `HTTP ${delivery.status_code}` : delivery.error,
        duration(delivery.duration_ms),
        delivery.outcome,
        shortTime(delivery.next_retry_at),
      ]),
    );
  }
  $("task-metadata").textContent = task.metadata ? JSON.stringify(task.metadata, null, 2) : "—";
}

function renderOutputs(task) {
  $("no-outputs").hidden = task.outputs.length > 0;
  for (const output of task.outputs) {
    let figure = state.outputs.get(output.key);
    if (!figure) {
      figure = document.createElement("figure");
      figure.dataset.index = output.index;
      const img = document.createElement("img");
      img.className = "full";
      img.alt = `output ${output.index} of task ${task.id}`;
      img.src = output.url;
      const caption = document.createElement("figcaption");
      const link = document.createElement("a");
      link.className = "download";
      link.textContent = "Download";
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      link.download = `${task.id}-${output.index}.${extension(output.mime_type)}`;
      caption.append(element("span", ""), " ", link);
      figure.append(img, caption);
      $("outputs").append(figure);
      state.outputs.set(output.key, figure);
    }
    const size = output.width && output.height ? `${output.width}×${output.height} · ` : "";
    figure.querySelector("figcaption span").textContent =
      `#${output.index} · ${size}${output.mime_type} · ${bytes(output.bytes)} · sha256 ${output.sha256.slice(0, 12)}…`;
    figure.querySelector("a.download").href = output.url; // the freshest URL: it never expires on the page
  }
}

async function cancelTask() {
  const id = state.task.id;
  $("cancel").disabled = true;
  try {
    renderTask(await api("POST", `v1/tasks/${encodeURIComponent(id)}/cancel`));
    clearError();
    showNotice(`Task ${id} canceled.`);
  } catch (error) {
    showError(error);
    $("cancel").disabled = state.task ? FINAL.has(state.task.status) : false;
  }
}

async function redeliverWebhook() {
  const id = state.task.id;
  try {
    const redelivery = await api("POST", `v1/tasks/${encodeURIComponent(id)}/webhook/redeliver`);
    clearError();
    showNotice(`Webhook ${redelivery.event} (${redelivery.webhook_id}) queued for delivery again.`);
    poll(state.generation, pollTask, 0);
  } catch (error) {
    showError(error);
  }
}

// submitting --------------------------------------------------------------------------------------

async function submitPrompt(event) {
  event.preventDefault();
  const button = $("submit-button");
  button.disabled = true;
  try {
    const prompt = $("prompt").value;
    const parts = [{ text: prompt }];
    for (const file of $("images").files) {
      parts.push({ inline_data: { mime_type: file.type, data: await base64Of(file) } });
    }
    const body = {
      model: $("model").value.trim(),
      contents: [{ role: "user", parts }],
      generationConfig: {
        responseModalities: ["TEXT", "IMAGE"],
        imageConfig: { aspectRatio: $("ratio").value, imageSize: $("size").value },
      },
      // by code points: slicing UTF-16 could leave half a surrogate pair, which the API refuses
      metadata: { prompt: Array.from(prompt).slice(0, PROMPT_IN_METADATA).join("") },
    };
    const webhookUrl = $("webhook-url").value.trim();
    if (webhookUrl) body.webhook_url = webhookUrl;
    // the same body sent again after a failure (a lost answer, a double click) keeps its key, so the API
    // answers with the task it may already have made instead of making a second one
    const text = JSON.stringify(body);
    if (!state.pending || state.pending.text !== text) state.pending = { text, key: randomKey() };
    const accepted = await api("POST", "v1/images/generations", {
      body,
      headers: { "Idempotency-Key": state.pending.key },
    });
    state.pending = null;
    clearError();
    showNotice(`Submitted task ${accepted.id}`, `#/tasks/${encodeURIComponent(accepted.id)}`);
    $("prompt").value = "";
    $("images").value = "";
    poll(state.generation, pollList, 0);
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new ApiError(0, "file_unreadable", `could not read ${file.name}`, null));
    reader.readAsDataURL(file);
  });
}

function randomKey() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `console-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

// from the OpenAPI document ---------------------------------------------------------------------------

function setUpFromSpec(spec) {
  const schemas = spec.components.schemas;
  const request = schemas.GenerationRequest.properties;
  const image = request.generationConfig.properties.imageConfig.properties;
  fillSelect($("ratio"), image.aspectRatio.enum);
  fillSelect($("size"), image.imageSize.enum);
  $("model").value = request.model.example;
  const inline = Object.values(schemas).find((schema) => schema.properties && schema.properties.mime_type);
  if (inline) $("images").accept = inline.properties.mime_type.enum.join(",");
  const filters = [["", "all"], ...schemas.Task.properties.status.enum.map((status) => [status, status])];
  $("filters").replaceChildren(
    ...filters.map(([status, label]) => {
      const link = element("a", label);
      link.href = status ? `#/?status=${status}` : "#/";
      link.dataset.status = status;
      return link;
    }),
  );
  // "security": [{}, {"bearer": []}] on an open server (a key is optional), [{"bearer": []}] otherwise
  return !spec.security.some((requirement) => Object.keys(requirement).length === 0);
}

// small helpers -----------------------------------------------------------------------------------

function element(tag, text, className = null) {
  const node = document.createElement(tag);
  node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fillSelect(select, values) {
  select.replaceChildren(...values.map((value) => element("option", value)));
}

function fillTable(table, rows) {
  table.tBodies[0].replaceChildren(
    ...rows.map((cells) => {
      const row = document.createElement("tr");
      row.append(...cells.map((cell) => element("td", cell ?? "—")));
      return row;
    }),
  );
}

function setStatus(node, status) {
  node.textContent = status;
  node.className = `status status-${status}`;
}

function shortTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) : null;
}

function fullTime(iso) {
  return iso ? new Date(iso).toLocaleString([], { hour12: false }) : null;
}

function duration(ms) {
  if (ms === null || ms === undefined) return null;
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
}

function bytes(count) {
  if (count < 1024) return `${count} B`;
  if (count < 1024 * 1024) return `${(count / 1024).toFixed(1)} KiB`;
  return `${(count / 1024 / 1024).toFixed(1)} MiB`;
}

function extension(mimeType) {
  return { "image/jpeg": "jpg", "image/png": "png", "image/webp": "webp" }[mimeType] || "bin";
}

// start -------------------------------------------------------------------------------------------

async function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  $("submit-form").addEventListener("submit", submitPrompt);
  $("cancel").addEventListener("click", cancelTask);
  $("redeliver").addEventListener("click", redeliverWebhook);
  $("error-close").addEventListener("click", () => clearError());
  $("more").addEventListener("click", () => {
    state.limit = Math.min(MAX_LIMIT, state.limit + PAGE);
    poll(state.generation, pollList, 0);
  });
  window.addEventListener("hashchange", () => {
    $("notice").hidden = true;
    route();
  });
  try {
    state.spec = await api("GET", "openapi.json", { key: null });
    state.keyRequired = setUpFromSpec(state.spec);
    if (!state.keyRequired || state.key) {
      showTenant((await api("GET", "v1/usage?days=1")).tenant);
    }
  } catch (error) {
    if (error.status === 401) {
      state.key = null;
      sessionStorage.removeItem(KEY_STORAGE);
    } else {
      $("loading").textContent = "The API could not be reached.";
      showError(error);
      return;
    }
  }
  document.body.dataset.ready = "true";
  route();
}

start();
