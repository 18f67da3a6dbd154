// The chat page: keeps the conversation in memory, streams answers from /v1/chat/completions (SSE)
// and shows decode speed from the server's own timings.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, vision: false, history: [], images: [], controller: null };

function apiKey() { return $("api-key").value || localStorage.getItem("lmbundle-key") || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  return (await apiError(response)).message;
}

// The server's error as an Error with its OpenAI error code (e.g. "invalid_image").
async function apiError(response) {
  let body = null;
  try { body = (await response.json()).error; } catch { /* not JSON */ }
  const error = new Error(body?.message || `HTTP ${response.status}`);
  error.code = body?.code || null;
  return error;
}

async function loadInfo() {
  const response = await fetch("/api/info", { headers: headers() });
  if (response.status === 401) {
    $("settings").hidden = false;
    setStatus("This server needs an API key: enter it in Settings.", true);
    $("api-key").focus();
    return;
  }
  if (!response.ok) { setStatus(await errorText(response), true); return; }
  const info = await response.json();
  state.model = info.id;
  state.vision = info.vision;
  $("model-name").textContent = info.id;
  $("model-meta").textContent =
    `${info.backend} on ${info.device} · ${info.max_context.toLocaleString()} tokens context` +
    (info.vision ? " · images" : "");
  if ($("temperature").value === "") $("temperature").value = info.defaults.temperature;
  if ($("top-p").value === "") $("top-p").value = info.defaults.top_p;
  $("attach").hidden = !info.vision;
  $("prompt").placeholder = info.vision ? "Send a message, or drop an image" : "Send a message";
  setStatus("");
}

function scrollDown() {
  const box = $("conversation");
  box.scrollTop = box.scrollHeight;
}

function addReasoning(reply) {
  if (!reply.reasoning) {
    const box = document.createElement("details");
    box.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    box.append(summary, document.createTextNode(""));
    reply.bubble.before(box);
    reply.reasoning = box.lastChild;
  }
  return reply.reasoning;
}

function addTurn(role, text, images = []) {
  $("empty").hidden = true;
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  for (const url of images) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    bubble.append(img);
  }
  bubble.append(document.createTextNode(text));
  const meta = document.createElement("div");
  meta.className = "meta";
  turn.append(bubble, meta);
  $("conversation").append(turn);
  scrollDown();
  return { turn, bubble, meta, text: bubble.lastChild };
}

function userContent(text, images) {
  if (!images.length) return text;
  return [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { model: state.model, messages, stream: true, stream_options: { include_usage: true } };
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  body.temperature = number("temperature");
  body.top_p = number("top-p");
  body.max_tokens = number("max-tokens");
  return body;
}

// Yields the JSON payload of each SSE "data:" line until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("prompt").disabled = false;
}

async function send(text) {
  const images = state.images.splice(0);
  renderAttachments();
  state.history.push({ role: "user", content: userContent(text, images) });
  addTurn("user", text, images);
  const reply = addTurn("assistant", "");
  reply.turn.classList.add("streaming");
  state.controller = new AbortController();
  setBusy(true);
  setStatus("");
  let answer = "";
  let finish = null;
  let timings = null;
  let usage = null;
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    let reasoning = "";
    for await (const chunk of events(response)) {
      if (chunk.error) throw Object.assign(new Error(chunk.error.message), { code: chunk.error.code });
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta.reasoning_content) {
        reasoning += choice.delta.reasoning_content;
        addReasoning(reply).textContent = reasoning;
        scrollDown();
      }
      if (choice.delta.content) {
        answer += choice.delta.content;
        reply.text.textContent = answer;
        scrollDown();
      }
      if (choice.finish_reason) { finish = choice.finish_reason; timings = chunk.timings; }
    }
    state.history.push({ role: "assistant", content: answer });
    const parts = [];
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} tokens`);
    if (timings) parts.push(`${timings.decode_tok_s.toFixed(1)} tok/s`);
    parts.push(`${((performance.now() - started) / 1000).toFixed(1)} s`);
    if (finish === "length") parts.push("stopped at max tokens");
    reply.meta.textContent = parts.join(" · ");
  } catch (error) {
    if (error.name === "AbortError") {
      state.history.push({ role: "assistant", content: answer });
      reply.meta.textContent = "stopped";
    } else {
      // The message stays in the conversation the next request sends (it is shown, so it is part of it);
      // images the server refused are dropped from it, or every later message would fail the same way.
      const sent = state.history[state.history.length - 1];
      if (error.code === "invalid_image" && Array.isArray(sent.content)) {
        sent.content = sent.content.filter((part) => part.type === "text").map((part) => part.text).join("\n");
      }
      reply.bubble.classList.add("error");
      reply.text.textContent = error.message;
      scrollDown();
    }
  } finally {
    reply.turn.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  box.hidden = state.images.length === 0;
  state.images.forEach((url, i) => {
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = url;
    img.alt = `attachment ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.title = "Remove";
    remove.textContent = "×";
    remove.onclick = () => { state.images.splice(i, 1); renderAttachments(); };
    thumb.append(img, remove);
    box.append(thumb);
  });
}

const MAX_IMAGE_BYTES = 20 * 1024 * 1024;
// What the server decodes (Pillow); SVG and other types are refused here, before anything is sent.
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"];

// Attach only what is really an image of a type the server reads: the type the browser gives is a guess
// from the file name, so the data is decoded here first; a file that does not decode is refused now.
function attachFiles(files) {
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) {
      setStatus(`${file.name}: not an image (PNG, JPEG, GIF, WebP or BMP)`, true);
      continue;
    }
    if (file.size > MAX_IMAGE_BYTES) { setStatus(`${file.name}: over the 20 MB image limit`, true); continue; }
    const reader = new FileReader();
    reader.onload = () => {
      const probe = new Image();
      probe.onload = () => { state.images.push(reader.result); renderAttachments(); setStatus(""); };
      probe.onerror = () => setStatus(`${file.name}: not an image (it does not decode)`, true);
      probe.src = reader.result;
    };
    reader.onerror = () => setStatus(`${file.name}: cannot be read`, true);
    reader.readAsDataURL(file);
  }
}

function autoGrow() {
  const box = $("prompt");
  box.style.height = "auto";
  box.style.height = `${box.scrollHeight}px`;
}

function submit(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  if (!state.model) { setStatus("Not connected to the server yet.", true); return; }
  $("prompt").value = "";
  autoGrow();
  send(text);
}

function wire() {
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("input", autoGrow);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.images = [];
    renderAttachments();
    $("conversation").querySelectorAll(".turn").forEach((node) => node.remove());
    $("empty").hidden = false;
    $("prompt").focus();
  });
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value;
    if (key) localStorage.setItem("lmbundle-key", key); else localStorage.removeItem("lmbundle-key");
    loadInfo();
  });
  $("attach").addEventListener("click", () => $("file-picker").click());
  $("file-picker").addEventListener("change", (event) => { attachFiles(event.target.files); event.target.value = ""; });
  const composer = $("composer");
  let depth = 0;
  composer.addEventListener("dragenter", (event) => {
    if (!state.vision) return;
    event.preventDefault();
    depth += 1;
    composer.classList.add("dragging");
    $("drop-hint").hidden = false;
  });
  composer.addEventListener("dragover", (event) => { if (state.vision) event.preventDefault(); });
  composer.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) { composer.classList.remove("dragging"); $("drop-hint").hidden = true; }
  });
  composer.addEventListener("drop", (event) => {
    if (!state.vision) return;
    event.preventDefault();
    depth = 0;
    composer.classList.remove("dragging");
    $("drop-hint").hidden = true;
    attachFiles(event.dataTransfer.files);
  });
}

$("api-key").value = localStorage.getItem("lmbundle-key") || "";
wire();
loadInfo().catch((error) => setStatus(`Cannot reach the server: ${error.message}`, true));
