// The adapter service's console: lists adapters, uploads and deletes them, and runs them next to the base model.
// Adapter names, labels and model text come from whoever uploaded or prompted: they only ever go into the page
// through textContent and attributes, never through HTML parsing.

const ADMIN_TOKEN_KEY = "adapter-console.admin-token";
const API_KEY_KEY = "adapter-console.api-key";
const TASK_TITLES = {
  generation: "Generation",
  classification: "Classification",
  token_classification: "Token classification",
};
const BASE_VALUE = "";

const $ = (id) => document.getElementById(id);

class ServerError extends Error {}

let adapters = [];  // the last listing, in the server's order
let runController = null;  // aborts the streams of the previous run

// -- credentials ------------------------------------------------------------------------------------------------

function adminToken() {
  return sessionStorage.getItem(ADMIN_TOKEN_KEY) || "";
}

function apiKey() {
  return sessionStorage.getItem(API_KEY_KEY) || "";
}

function bearer(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// The service takes the admin token wherever it takes an API key.
function apiHeaders() {
  return bearer(apiKey() || adminToken());
}

function keepInSession(input, key, onChange) {
  input.value = sessionStorage.getItem(key) || "";
  input.addEventListener("input", () => {
    const value = input.value.trim();
    if (value) sessionStorage.setItem(key, value);
    else sessionStorage.removeItem(key);
  });
  input.addEventListener("change", onChange);
}

function showApiKeyField() {
  $("api-key-field").hidden = false;
}

// -- alerts and server errors -----------------------------------------------------------------------------------

function showAlert(id, message) {
  const alert = $(id);
  alert.textContent = message;
  alert.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && typeof body.message === "string") return body.message;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText || "error"}`;
}

async function getJson(path) {
  const response = await fetch(path, { headers: apiHeaders() });
  if (response.status === 401) showApiKeyField();
  if (!response.ok) throw new ServerError(await errorMessage(response));
  return response.json();
}

async function postJson(path, body, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...apiHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (response.status === 401) showApiKeyField();
  if (!response.ok) throw new ServerError(await errorMessage(response));
  return response;
}

function describe(error) {
  if (error instanceof ServerError) return error.message;
  return `Could not reach the service: ${error.message}`;
}

// -- readiness --------------------------------------------------------------------------------------------------

async function waitUntilReady() {
  const status = $("service-status");
  for (;;) {
    try {
      const response = await fetch("/ready");
      const body = await response.json();
      status.textContent = response.ok ? `Ready: ${body.message}` : `${body.status}: ${body.message || "…"}`;
      if (response.ok) return;
      if (body.status === "failed") return;
    } catch (error) {
      status.textContent = `Cannot reach the service (${error.message}); retrying…`;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// -- the adapters table ------------------------------------------------------------------------------------------

function formatBytes(bytes) {
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 || value >= 100 ? 0 : 1)} ${units[unit]}`;
}

function capacity(entry) {
  if (entry.rank !== null) return `r = ${entry.rank}`;
  if (entry.num_virtual_tokens !== null) return `${entry.num_virtual_tokens} virtual tokens`;
  return "—";
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function adapterRow(entry) {
  const row = document.createElement("tr");
  const name = document.createElement("th");
  name.scope = "row";
  name.textContent = entry.name;
  row.append(name);
  cell(row, entry.type);
  cell(row, TASK_TITLES[entry.task] || entry.task);
  cell(row, capacity(entry));
  const labels = entry.labels || [];
  const shown = labels.length > 6 ? [...labels.slice(0, 6), `+${labels.length - 6}`] : labels;
  cell(row, shown.join(", ") || "—").title = labels.join(", ");
  cell(row, formatBytes(entry.size_bytes), "number");
  cell(row, entry.version, "mono").title = `sha256 ${entry.sha256}`;
  cell(row, entry.loaded ? "yes" : "no");
  const state = cell(row, entry.state, `state state-${entry.state}`);
  if (entry.error) {
    const reason = document.createElement("small");
    reason.textContent = entry.error;
    state.append(document.createElement("br"), reason);
  }
  cell(row, String(entry.requests), "number requests");
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "danger";
  remove.textContent = "Delete";
  remove.setAttribute("aria-label", `Delete ${entry.name}`);
  remove.addEventListener("click", () => deleteAdapter(entry.name));
  row.insertCell().append(remove);
  return row;
}

function renderAdapters() {
  $("adapters-body").replaceChildren(...adapters.map(adapterRow));
  $("adapters-empty").hidden = adapters.length > 0;
  renderAdapterPicker();
}

async function refreshAdapters() {
  try {
    adapters = (await getJson("/v1/adapters")).adapters;
    showAlert("adapters-alert", "");
    renderAdapters();
  } catch (error) {
    showAlert("adapters-alert", describe(error));
  }
}

async function deleteAdapter(name) {
  if (!confirm(`Delete the adapter "${name}"? Requests naming it will get 404.`)) return;
  try {
    const response = await fetch(`/v1/adapters/${encodeURIComponent(name)}`, {
      method: "DELETE",
      headers: bearer(adminToken()),
    });
    if (!response.ok) throw new ServerError(await errorMessage(response));
    showAlert("adapters-alert", "");
  } catch (error) {
    showAlert("adapters-alert", describe(error));
  }
  await refreshAdapters();
}

// -- upload ------------------------------------------------------------------------------------------------------

function nameFromFile(fileName) {
  return fileName.replace(/\.(zip|tar\.gz|tgz)$/i, "").replace(/[^A-Za-z0-9._-]/g, "-").replace(/^[^A-Za-z0-9]+/, "");
}

// XMLHttpRequest rather than fetch: only it reports upload progress.
function sendUpload(method, path, form, progress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open(method, path);
    for (const [header, value] of Object.entries(bearer(adminToken()))) request.setRequestHeader(header, value);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.value = event.loaded / event.total;
    });
    request.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(request.responseText);
      } catch {
        // not JSON: reported by status below
      }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new ServerError(body?.message || `${request.status} ${request.statusText || "error"}`));
    });
    request.addEventListener("error", () => reject(new Error("the upload was interrupted")));
    request.send(form);
  });
}

async function upload(event) {
  event.preventDefault();
  const file = $("archive").files[0];
  const name = $("upload-name").value.trim();
  const replace = $("replace").checked;
  showAlert("upload-alert", "");
  $("upload-done").textContent = "";
  if (!file || !name) {
    showAlert("upload-alert", "Choose an archive and give the adapter a name.");
    return;
  }
  const form = new FormData();
  if (!replace) form.append("name", name);
  form.append("archive", file, file.name);
  const progress = $("upload-progress");
  progress.value = 0;
  progress.hidden = false;
  const button = $("upload-button");
  button.disabled = true;
  try {
    const entry = replace
      ? await sendUpload("PUT", `/v1/adapters/${encodeURIComponent(name)}`, form, progress)
      : await sendUpload("POST", "/v1/adapters", form, progress);
    progress.value = 1;
    $("upload-done").textContent = `Uploaded ${entry.name} (version ${entry.version}).`;
    $("upload-form").reset();
  } catch (error) {
    showAlert("upload-alert", describe(error));
  } finally {
    button.disabled = false;
  }
  await refreshAdapters();
}

// -- the playground ----------------------------------------------------------------------------------------------

function selectedTask() {
  const value = $("adapter").value;
  if (value === BASE_VALUE) return "generation";
  return adapters.find((entry) => entry.name === value)?.task || "generation";
}

function renderAdapterPicker() {
  const picker = $("adapter");
  const previous = picker.options.length ? picker.value : null;
  const groups = [];
  for (const [task, title] of Object.entries(TASK_TITLES)) {
    const group = document.createElement("optgroup");
    group.label = title;
    if (task === "generation") group.append(new Option("Base model (no adapter)", BASE_VALUE));
    for (const entry of adapters.filter((e) => e.task === task)) group.append(new Option(entry.name, entry.name));
    if (group.children.length) groups.push(group);
  }
  picker.replaceChildren(...groups);
  const names = new Set(adapters.map((entry) => entry.name));
  if (previous !== null && (previous === BASE_VALUE || names.has(previous))) picker.value = previous;
  else picker.value = (adapters.find((e) => e.task === "generation") || adapters[0] || { name: BASE_VALUE }).name;
  showInputsFor(selectedTask());
}

function showInputsFor(task) {
  const generation = task === "generation";
  $("generation-inputs").hidden = !generation;
  $("classification-inputs").hidden = generation;
}

function showOutput(which) {
  $("generation-output").hidden = which !== "generation";
  $("classification-output").hidden = which !== "classification";
  $("token-output").hidden = which !== "token_classification";
}

async function run(event) {
  event.preventDefault();
  runController?.abort();
  runController = new AbortController();
  const signal = runController.signal;
  showAlert("run-alert", "");
  const adapter = $("adapter").value === BASE_VALUE ? null : $("adapter").value;
  const task = selectedTask();
  showOutput(task);
  try {
    if (task === "generation") await compareGenerations(adapter, signal);
    else if (task === "classification") await classify(adapter, signal);
    else await classifyTokens(adapter, signal);
  } catch (error) {
    if (error.name !== "AbortError") showAlert("run-alert", describe(error));
  }
  if (!signal.aborted) await refreshAdapters();  // its request count and residency changed
}

// -- generation: the adapter and the base, streamed side by side

function generationRequest() {
  return {
    prompt: $("prompt").value,
    max_new_tokens: Number($("max-new-tokens").value),
    temperature: Number($("temperature").value),
    chat: $("chat").checked,
    stream: true,
  };
}

function* serverSentEvents(buffer) {
  // Yields [event, data] for each complete event in buffer.text and keeps the incomplete rest there.
  let cut;
  while ((cut = buffer.text.indexOf("\n\n")) >= 0) {
    const block = buffer.text.slice(0, cut);
    buffer.text = buffer.text.slice(cut + 2);
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) yield [event, JSON.parse(data.join("\n"))];
  }
}

async function streamInto(body, pane, meta, signal) {
  const text = document.createTextNode("");
  pane.replaceChildren(text);
  pane.setAttribute("aria-busy", "true");
  meta.textContent = "";
  const started = performance.now();
  try {
    const response = await postJson("/v1/generate", body, signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const buffer = { text: "" };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer.text += value.replace(/\r\n?/g, "\n");
      for (const [event, data] of serverSentEvents(buffer)) {
        if (event === "token") {
          text.appendData(data.text);
        } else if (event === "done") {
          if (text.data !== data.text) text.data = data.text;
          const seconds = ((performance.now() - started) / 1000).toFixed(1);
          meta.textContent = `${data.generated_tokens} tokens · ${data.finish_reason} · ${seconds} s`;
          return;
        } else if (event === "error") {
          throw new ServerError(data.message);
        }
      }
    }
    throw new ServerError("the stream ended before its 'done' event");
  } finally {
    pane.removeAttribute("aria-busy");
  }
}

async function compareGenerations(adapter, signal) {
  const body = generationRequest();
  $("adapter-answer").hidden = adapter === null;
  $("adapter-answer-name").textContent = adapter ?? "";
  const streams = [streamInto({ ...body, adapter: null }, $("base-output"), $("base-output-meta"), signal)];
  if (adapter !== null) {
    streams.unshift(streamInto({ ...body, adapter }, $("adapter-output"), $("adapter-output-meta"), signal));
  }
  const failures = (await Promise.allSettled(streams)).filter((outcome) => outcome.status === "rejected");
  if (failures.length) throw failures[0].reason;
}

// -- classification: one bar per label

async function classify(adapter, signal) {
  const response = await postJson("/v1/classify", { adapter, inputs: $("text").value }, signal);
  const [result] = (await response.json()).results;
  const top = $("top-label");
  const strong = document.createElement("strong");
  strong.textContent = result.label;
  top.replaceChildren("Top label: ", strong, ` (${result.score.toFixed(3)})`);
  const bars = Object.entries(result.scores).map(([label, score]) => {
    const item = document.createElement("li");
    if (label === result.label) item.className = "top";
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "meter");
    bar.setAttribute("aria-label", label);
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "1");
    bar.setAttribute("aria-valuenow", String(score));
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    fill.style.width = `${(score * 100).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "bar-score";
    value.textContent = score.toFixed(3);
    item.append(name, bar, value);
    return item;
  });
  $("label-bars").replaceChildren(...bars);
}

// -- token classification: the text with its entities marked

async function classifyTokens(adapter, signal) {
  const text = $("text").value;
  const response = await postJson("/v1/classify_tokens", { adapter, inputs: text }, signal);
  const [entities] = (await response.json()).results;
  // The server's offsets count code points (Python strings); JavaScript strings count UTF-16 units.
  const characters = Array.from(text);
  const pieces = [];
  let at = 0;
  for (const entity of [...entities].sort((a, b) => a.start - b.start)) {
    if (entity.start < at) continue;  // overlapping spans (aggregation "none" never overlaps; be safe)
    pieces.push(characters.slice(at, entity.start).join(""));
    const mark = document.createElement("mark");
    mark.textContent = characters.slice(entity.start, entity.end).join("");
    mark.dataset.label = entity.label;
    mark.title = `${entity.label} ${entity.score.toFixed(3)}`;
    pieces.push(mark);
    at = entity.end;
  }
  pieces.push(characters.slice(at).join(""));
  $("entity-text").replaceChildren(...pieces);
  $("entity-summary").textContent = entities.length
    ? `${entities.length} ${entities.length === 1 ? "entity" : "entities"}: ` +
      entities.map((e) => `${e.text} (${e.label} ${e.score.toFixed(2)})`).join(", ")
    : "No entities found.";
}

// -- start -------------------------------------------------------------------------------------------------------

function start() {
  keepInSession($("admin-token"), ADMIN_TOKEN_KEY, refreshAdapters);
  keepInSession($("api-key"), API_KEY_KEY, refreshAdapters);
  if (apiKey()) showApiKeyField();
  $("credentials").addEventListener("submit", (event) => {
    event.preventDefault();
    refreshAdapters();
  });
  $("refresh").addEventListener("click", refreshAdapters);
  $("upload-form").addEventListener("submit", upload);
  $("archive").addEventListener("change", () => {
    const file = $("archive").files[0];
    if (file && !$("upload-name").value.trim()) $("upload-name").value = nameFromFile(file.name);
  });
  $("run-form").addEventListener("submit", run);
  $("adapter").addEventListener("change", () => showInputsFor(selectedTask()));
  renderAdapterPicker();
  waitUntilReady().then(refreshAdapters);
}

start();
