// pensieve's chat page. A chat is a conversation (GET /v1/conversations lists them); its turns are stored responses
// whose parents form a tree (GET /v1/conversations/{id}/responses). Sending continues the branch on screen
// (`conversation` + `previous_response_id`: the server continues its KV), editing a message or regenerating a reply
// makes a sibling branch, Stop cancels the response and keeps what it wrote (POST /v1/responses/{id}/cancel). Each
// reply shows where its prompt's KV came from (its `stats`); the side panel shows the cache from /metrics.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";

const $ = (id) => document.getElementById(id);
const KEY = "pensieve.apiKey"; // sessionStorage: this tab only
const ROOT = ""; // the parent key of a conversation's first responses

const state = {
  model: null,
  conversations: [],
  conv: null, // the open conversation (null: a new chat, made with its first message)
  nodes: new Map(), // response id -> {id, parent, input, output, status, reason, stats, usage, children}
  head: null, // the response that ends the conversation's current branch (a plain turn continues it)
  roots: [],
  choice: new Map(), // parent id (ROOT for the first) -> the child shown
  streaming: null, // {pending, controller, responseId}
  editing: null, // the response id whose user message is being edited
  chart: [],
};

// ---- HTTP --------------------------------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function headers(withBody) {
  const h = {};
  if (withBody) h["Content-Type"] = "application/json";
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const init = { method, headers: headers(body !== undefined), signal };
    if (body !== undefined) init.body = JSON.stringify(body);
    const res = await fetch(path, init);
    if (res.status === 401) {
      await askKey();
      continue;
    }
    if (!res.ok) throw new HttpError(res.status, await errorText(res));
    return res;
  }
}

const getJSON = async (path, options) => (await api(path, options)).json();

async function errorText(res) {
  try {
    const body = await res.json();
    return body.error?.message || res.statusText;
  } catch {
    return res.statusText;
  }
}

let keyPrompt = null; // the open key dialog's promise: every request that met a 401 waits on the same one

function askKey() {
  keyPrompt ??= new Promise((resolve) => {
    const dialog = $("key-dialog");
    const input = $("key-input");
    input.value = "";
    dialog.addEventListener(
      "close",
      () => {
        if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
        keyPrompt = null;
        resolve();
      },
      { once: true },
    );
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

async function* events(res) {
  // Server-sent events of a streamed response -> their data objects.
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- conversations and their trees -------------------------------------------------------------------------------

function textOf(content) {
  if (typeof content === "string") return content;
  return (content || []).map((part) => part.text || "").join("");
}

function nodeOf(r) {
  const output = (r.output || [])
    .filter((item) => item.type === "message")
    .map((item) => textOf(item.content))
    .join("");
  const calls = (r.output || []).filter((item) => item.type === "function_call");
  const input = (r.input_items || [])
    .filter((item) => item.type === "message" && item.role === "user")
    .map((item) => textOf(item.content))
    .join("\n\n");
  return {
    id: r.id,
    parent: r.parent_response_id ?? null,
    input,
    output: output || calls.map((c) => `${c.name}(${c.arguments})`).join("\n"),
    status: r.status,
    reason: r.incomplete_details?.reason,
    stats: r.stats,
    usage: r.usage,
    children: [],
  };
}

async function loadConversations() {
  const list = await getJSON("/v1/conversations?limit=100");
  state.conversations = list.data;
  renderList();
}

async function openConversation(id, focusComposer = false) {
  const conv = await getJSON(`/v1/conversations/${encodeURIComponent(id)}`);
  const tree = await getJSON(`/v1/conversations/${encodeURIComponent(id)}/responses`);
  state.conv = conv;
  state.nodes = new Map();
  state.roots = [];
  state.choice = new Map();
  state.editing = null;
  state.head = tree.head_response_id;
  for (const r of tree.data) {
    const node = nodeOf(r);
    state.nodes.set(node.id, node);
    const parent = node.parent && state.nodes.get(node.parent);
    (parent ? parent.children : state.roots).push(node.id);
  }
  for (let n = state.nodes.get(tree.head_response_id); n; n = state.nodes.get(n.parent)) {
    state.choice.set(n.parent ?? ROOT, n.id);
  }
  remember(id);
  renderList();
  renderMessages();
  if (focusComposer) $("composer-input").focus();
}

function remember(id) {
  // The open conversation is in the address (?c=...), so a reload shows it again.
  const url = new URL(location.href);
  if (id) url.searchParams.set("c", id);
  else url.searchParams.delete("c");
  history.replaceState(null, "", url);
}

function newChat() {
  if (state.streaming) return;
  state.conv = null;
  state.nodes = new Map();
  state.roots = [];
  state.choice = new Map();
  state.editing = null;
  state.head = null;
  remember(null);
  renderList();
  renderMessages();
  $("composer-input").focus();
}

function shownPath() {
  // The responses on screen, first to last: at each fork the chosen child (else the newest).
  const out = [];
  let ids = state.roots;
  let key = ROOT;
  while (ids.length) {
    const chosen = state.choice.get(key);
    const id = ids.includes(chosen) ? chosen : ids[ids.length - 1];
    const node = state.nodes.get(id);
    out.push(node);
    ids = node.children;
    key = node.id;
  }
  return out;
}

function siblings(node) {
  const parent = node.parent && state.nodes.get(node.parent);
  return parent ? parent.children : state.roots;
}

// ---- sending, stopping, branching --------------------------------------------------------------------------------

function settings() {
  const body = {
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_output_tokens: Math.max(1, Math.round(Number($("max-tokens").value))),
  };
  if ($("json-mode").checked) {
    let schema;
    try {
      schema = JSON.parse($("json-schema").value);
    } catch (error) {
      throw new Error(`the JSON schema does not parse: ${error.message}`);
    }
    body.text = { format: { type: "json_schema", name: "reply", schema, strict: true } };
  }
  return body;
}

async function send(text, parent) {
  // parent: the response the new one follows (undefined: the last one on screen; null: none, a new first message)
  if (state.streaming || !text.trim()) return;
  let body;
  try {
    body = { model: state.model, input: text, stream: true, ...settings() };
  } catch (error) {
    setStatus(error.message);
    return;
  }
  const previous = parent === undefined ? (shownPath().at(-1)?.id ?? null) : parent;
  const pending = { id: null, parent: previous, input: text, output: "", status: "in_progress", children: [] };
  const controller = new AbortController();
  state.streaming = { pending, controller, responseId: null };
  state.editing = null;
  renderMessages();
  setBusy(true);
  let final = null;
  try {
    if (!state.conv) {
      const system = $("system-prompt").value.trim();
      const metadata = { title: text.trim().slice(0, 60) };
      if (system) metadata.system = system.slice(0, 512);
      state.conv = await getJSON("/v1/conversations", { method: "POST", body: { metadata } });
      remember(state.conv.id);
    } else if (previous === null && state.roots.length) {
      await clearItems(); // a new first message: the conversation's items start empty again
    }
    body.conversation = state.conv.id;
    // the conversation's own branch goes on by itself; any other point of the tree is a branch from that response
    if (previous && previous !== state.head) body.previous_response_id = previous;
    if (state.conv.metadata?.system) body.instructions = state.conv.metadata.system;
    const res = await api("/v1/responses", { method: "POST", body, signal: controller.signal });
    for await (const event of events(res)) {
      if (event.type === "response.created") {
        state.streaming.responseId = event.response.id;
        setStatus("Replying…");
      }
      else if (event.type === "response.output_text.delta") {
        pending.output += event.delta;
        renderPending();
      } else if (event.type === "response.completed" || event.type === "response.incomplete") final = event.response;
      else if (event.type === "error") throw new Error(event.message || "the response failed");
    }
    const reason = final?.incomplete_details?.reason;
    setStatus(reason === "cancelled" ? "Stopped: the reply so far is kept." : final ? "Replied." : "");
  } catch (error) {
    setStatus(error.name === "AbortError" ? "Stopped before the reply began: nothing was kept." : `Error: ${error.message}`);
  } finally {
    state.streaming = null;
    setBusy(false);
  }
  if (state.conv) {
    await openConversation(state.conv.id);
    if (final) state.choice.set(previous ?? ROOT, final.id);
    renderMessages();
    await loadConversations();
  }
  $("composer-input").focus();
}

async function clearItems() {
  const items = await getJSON(`/v1/conversations/${encodeURIComponent(state.conv.id)}/items?limit=100`);
  for (const item of items.data) {
    await api(`/v1/conversations/${encodeURIComponent(state.conv.id)}/items/${encodeURIComponent(item.id)}`, {
      method: "DELETE",
    });
  }
}

async function stop() {
  const streaming = state.streaming;
  if (!streaming) return;
  if (!streaming.responseId) {
    streaming.controller.abort(); // not begun: the turn is aborted, nothing kept
    return;
  }
  try {
    await api(`/v1/responses/${encodeURIComponent(streaming.responseId)}/cancel`, { method: "POST" });
  } catch (error) {
    setStatus(`Error: ${error.message}`);
  }
}

// ---- rendering ---------------------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

const PURIFY = {
  USE_PROFILES: { html: true },
  // no ids or names (a reply must not shadow the page's own elements), no styles, no forms or embedded documents
  FORBID_ATTR: ["id", "name", "style", "form", "formaction"],
  FORBID_TAGS: ["form", "input", "textarea", "button", "select", "option", "dialog", "style", "iframe", "object", "embed"],
  SANITIZE_NAMED_PROPS: true,
};

function markdown(text) {
  // The reply as sanitized HTML: marked renders, DOMPurify removes every script, handler, unsafe URL and the rest.
  const html = marked.parse(text, { async: false, gfm: true, breaks: true });
  return DOMPurify.sanitize(html, PURIFY);
}

function statsLine(node) {
  const s = node.stats;
  if (!s) return null;
  const c = s.cached_tokens;
  const cached = c.device + c.host + c.disk;
  const parts = [
    el("span", { class: "cached", text: `cached ${cached}` }),
    ` (device ${c.device} · host ${c.host} · disk ${c.disk}) · `,
    el("span", { class: "prefilled", text: `prefilled ${s.prefilled_tokens}` }),
    " · ",
    el("span", { class: "recomputed", text: `recomputed ${s.recomputed_tokens}` }),
    ` · TTFT ${s.ttft_s.toFixed(3)} s`,
    s.output_tokens_per_s ? ` · ${s.output_tokens_per_s.toFixed(1)} tokens/s` : "",
  ];
  return el("div", { class: "stats" }, ...parts);
}

function navigator(node) {
  const ids = siblings(node);
  if (ids.length < 2) return null;
  const at = ids.indexOf(node.id);
  const go = (step) => () => {
    state.choice.set(node.parent ?? ROOT, ids[(at + step + ids.length) % ids.length]);
    renderMessages();
  };
  return el(
    "span",
    { class: "nav", role: "group", "aria-label": "Branches of this message" },
    branchButton("Previous branch", go(-1), "‹"),
    el("span", { class: "branch-at", text: `${at + 1}/${ids.length}` }),
    branchButton("Next branch", go(1), "›"),
  );
}

function branchButton(label, onclick, text) {
  const button = el("button", { type: "button", class: "link", "aria-label": label, onclick, text });
  button.disabled = Boolean(state.streaming); // the branch on screen is the one a reply streams into
  return button;
}

function userItem(node) {
  const li = el("li", { class: "msg user", "data-response": node.id ?? "" });
  li.append(el("div", { class: "who" }, el("span", { text: "You" }), node.id ? navigator(node) : null));
  if (state.editing === node.id) {
    const box = el("textarea", { rows: "3", "aria-label": "Edit the message" });
    box.value = node.input;
    const save = () => send(box.value, node.parent);
    box.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        save();
      } else if (e.key === "Escape") {
        state.editing = null;
        renderMessages();
      }
    });
    li.append(
      el(
        "div",
        { class: "edit-box" },
        box,
        el(
          "div",
          { class: "actions" },
          el("button", { type: "button", onclick: save, text: "Send as a new branch" }),
          el("button", { type: "button", onclick: () => ((state.editing = null), renderMessages()), text: "Cancel" }),
        ),
      ),
    );
    queueMicrotask(() => box.focus());
    return li;
  }
  li.append(el("div", { class: "body", text: node.input }));
  if (node.id && !state.streaming) {
    const edit = () => {
      state.editing = node.id;
      renderMessages();
    };
    li.append(el("div", { class: "actions" }, el("button", { type: "button", class: "link", onclick: edit, text: "Edit" })));
  }
  return li;
}

function assistantItem(node) {
  const stopped = node.reason === "cancelled" ? " stopped" : "";
  const li = el("li", { class: `msg assistant${stopped}`, "data-response": node.id ?? "" });
  li.append(el("div", { class: "who" }, el("span", { text: "Assistant" })));
  const body = el("div", { class: "body" });
  body.innerHTML = markdown(node.output);
  li.append(body, statsLine(node));
  if (node.id && !state.streaming) {
    const again = () => send(node.input, node.parent);
    li.append(el("div", { class: "actions" }, el("button", { type: "button", class: "link", onclick: again, text: "Regenerate" })));
  }
  return li;
}

function renderMessages() {
  const list = $("messages");
  const path = shownPath();
  const pending = state.streaming?.pending;
  if (pending) {
    const at = pending.parent ? path.findIndex((n) => n.id === pending.parent) + 1 : 0;
    path.splice(at, path.length - at, pending);
  }
  list.replaceChildren(...path.flatMap((node) => [userItem(node), assistantItem(node)]));
  $("chat-title").textContent = state.conv?.metadata?.title || "New chat";
  list.scrollTop = list.scrollHeight;
}

function renderPending() {
  const items = $("messages").querySelectorAll(".msg.assistant");
  const last = items[items.length - 1];
  if (!last) return;
  last.querySelector(".body").innerHTML = markdown(state.streaming.pending.output);
  $("messages").scrollTop = $("messages").scrollHeight;
}

function renderList() {
  const list = $("chat-list");
  list.replaceChildren(
    ...state.conversations.map((conv) => {
      const open = () => {
        if (!state.streaming) openConversation(conv.id, true).catch((e) => setStatus(`Error: ${e.message}`));
      };
      const current = state.conv?.id === conv.id ? "true" : "false";
      const title = conv.metadata?.title || "Untitled";
      return el("li", {}, el("button", { type: "button", "aria-current": current, onclick: open, text: title }));
    }),
  );
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- the cache panel ---------------------------------------------------------------------------------------------

function parseMetrics(text) {
  // Prometheus text -> metric(name, labels): the sample with that name and those labels (in any order), else 0.
  const samples = [];
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match) continue;
    const labels = Object.fromEntries([...(match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1], m[2]]));
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return (name, labels = {}) => {
    const found = samples.find(
      (s) => s.name === name && Object.entries(labels).every(([key, value]) => s.labels[key] === value),
    );
    return found ? found.value : 0;
  };
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let i = -1;
  do {
    n /= 1024;
    i += 1;
  } while (n >= 1024 && i < units.length - 1);
  return `${n.toFixed(1)} ${units[i]}`;
}

async function refreshCache() {
  if (document.visibilityState !== "visible") return;
  let metric;
  try {
    metric = parseMetrics(await (await api("/metrics")).text());
  } catch {
    return;
  }
  const blocks = (tier, state) => metric("pensieve_kv_blocks", { tier, state });
  const tier = (name) => {
    const used = blocks(name, "used");
    const total = used + blocks(name, "free");
    return total ? `${used} / ${total} blocks (${Math.round((100 * used) / total)}%)` : "none";
  };
  const hits = ["device", "host", "disk"].map((tier) => metric("pensieve_cache_hit_tokens_total", { tier }));
  const prompt = metric("pensieve_prompt_tokens_total");
  const figures = [
    ["Device KV", tier("device")],
    ["Host KV", tier("host")],
    ["Disk read", formatBytes(metric("pensieve_disk_kv_bytes", { direction: "read" }))],
    ["Hit rate", prompt ? `${((100 * hits.reduce((a, b) => a + b, 0)) / prompt).toFixed(1)}%` : "—"],
    ["Hits device / host / disk", hits.join(" / ")],
    ["Conversations", String(metric("pensieve_conversations"))],
    ["Running turns", String(metric("pensieve_running_turns"))],
  ];
  $("cache-figures").replaceChildren(...figures.flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: value })]));
  const used = blocks("device", "used");
  const total = used + blocks("device", "free");
  state.chart.push(total ? used / total : 0);
  state.chart = state.chart.slice(-60);
  const points = state.chart.map((v, i) => `${(i * 200) / 59},${58 - v * 56}`).join(" ");
  const svg = $("cache-chart");
  svg.querySelector("polyline")?.remove();
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  svg.append(line);
}

// ---- settings, kept in this browser (never the API key) -----------------------------------------------------------

const SETTINGS = "pensieve.settings";
const FIELDS = { "system-prompt": "value", temperature: "value", "top-p": "value", "max-tokens": "value", "json-mode": "checked", "json-schema": "value" };

function restoreSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  } catch {
    saved = {};
  }
  for (const [id, prop] of Object.entries(FIELDS)) {
    if (id in saved) $(id)[prop] = saved[id];
    $(id).addEventListener("change", saveSettings);
  }
  $("json-schema").disabled = !$("json-mode").checked;
}

function saveSettings() {
  const saved = {};
  for (const [id, prop] of Object.entries(FIELDS)) saved[id] = $(id)[prop];
  localStorage.setItem(SETTINGS, JSON.stringify(saved));
}

// ---- start -------------------------------------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = $("composer-input");
    const text = input.value;
    if (!text.trim() || state.streaming) return;
    try {
      settings(); // a bad setting (a JSON schema that does not parse) keeps the message in the box
    } catch (error) {
      setStatus(error.message);
      return;
    }
    input.value = "";
    send(text);
  });
  $("composer-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.streaming) {
      e.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("json-mode").addEventListener("change", () => ($("json-schema").disabled = !$("json-mode").checked));
  $("toggle-list").addEventListener("click", () => {
    const open = $("chats").classList.toggle("open");
    $("toggle-list").setAttribute("aria-expanded", String(open));
  });
  document.addEventListener("visibilitychange", refreshCache);
}

async function start() {
  restoreSettings();
  wire();
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0]?.id ?? null;
    $("model").textContent = state.model ?? "";
    await loadConversations();
    const wanted = new URL(location.href).searchParams.get("c");
    if (wanted && state.conversations.some((c) => c.id === wanted)) await openConversation(wanted);
    else renderMessages();
  } catch (error) {
    setStatus(`Error: ${error.message}`);
  }
  refreshCache();
  setInterval(refreshCache, 2000);
  document.body.dataset.ready = "true";
}

start();
