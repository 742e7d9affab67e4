// The aigc playground: plain JavaScript over the OpenAI-style API of `aigc serve`.
// No build step, no dependencies. Model text is only ever written as text
// (textContent, text nodes), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const el = {
  key: $("api-key"),
  form: $("controls"),
  model: $("model"),
  modelInfo: $("model-info"),
  textControls: $("text-controls"),
  imageControls: $("image-controls"),
  prompt: $("prompt"),
  promptLabel: $("prompt-label"),
  promptHint: $("prompt-hint"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  n: $("n"),
  labels: $("labels"),
  diffusionControls: $("diffusion-controls"),
  captionFields: $("caption-fields"),
  imagePrompt: $("image-prompt"),
  negativePrompt: $("negative-prompt"),
  steps: $("steps"),
  scheduler: $("scheduler"),
  guidance: $("guidance"),
  editImage: $("edit-image"),
  restoreControls: $("restore-controls"),
  restoreImage: $("restore-image"),
  restoreHint: $("restore-hint"),
  translateControls: $("translate-controls"),
  translateImage: $("translate-image"),
  translateDirection: $("translate-direction"),
  translateHint: $("translate-hint"),
  speechControls: $("speech-controls"),
  speechInput: $("speech-input"),
  speechHint: $("speech-hint"),
  voiceFields: $("voice-fields"),
  voice: $("voice"),
  speed: $("speed"),
  denoiseControls: $("denoise-controls"),
  denoiseFile: $("denoise-file"),
  editArea: $("edit-area"),
  editCanvas: $("edit-canvas"),
  brush: $("brush"),
  strength: $("strength"),
  clearMask: $("clear-mask"),
  dropImage: $("drop-image"),
  progress: $("progress"),
  seed: $("seed"),
  seedField: $("seed-field"),
  generate: $("generate"),
  stop: $("stop"),
  reset: $("reset"),
  results: $("results"),
  status: $("status"),
  chat: $("chat"),
  output: $("output"),
  images: $("images"),
  sounds: $("sounds"),
};

const KEY_STORE = "aigc.apiKey";
const MAX_PREVIEWS = 8; // partial images asked per image of a diffusion model
const MODEL_STORE = "aigc.model";

const state = {
  models: new Map(), // model id -> its entry in GET /v1/models
  messages: [], // the conversation so far, [{role, content}], for a chat model
  controller: null, // the AbortController of the request in flight
  loads: 0, // counts model-list loads, so that only the latest one is shown
  imageSize: 0, // the side of the chosen image model's images
  edit: null, // the image to edit: {canvas (the model's size), mask (1 = fill), size}
  painting: false,
  soundUrls: [], // the object URLs of the clips shown, revoked when they go
};

// ---------------------------------------------------------------------------
// the API

class ApiError extends Error {
  constructor(message, status = 0, code = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

/** GET `path`, or POST `body` as JSON (or a FormData as multipart); the API key, if
 * any, goes as a bearer token. */
async function api(path, body, signal) {
  const form = body instanceof FormData;
  const stream = body && (form ? body.get("stream") === "true" : body.stream);
  const headers = { Accept: stream ? "text/event-stream" : "application/json" };
  const key = el.key.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method: "GET", headers, signal, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    if (!form) headers["Content-Type"] = "application/json"; // multipart sets its own
    init.body = form ? body : JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** The API's errors are {"error": {"message", "type", "param", "code"}}. */
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code ?? null;
    }
  } catch {
    // not JSON (a proxy's page, say): the status line says enough
  }
  return new ApiError(message, response.status, code);
}

/**
 * Yields the data of each server-sent event of `response`
 * (https://html.spec.whatwg.org/multipage/server-sent-events.html): an event is
 * a run of lines ended by a blank line, and its "data:" lines joined by newlines
 * are its data. Comments (":...") and other fields are skipped.
 */
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value, { stream: !done });
      const lines = buffer.split("\n");
      buffer = done ? "" : lines.pop(); // an unfinished line waits for the next chunk
      for (let line of lines) {
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let fieldValue = colon < 0 ? "" : line.slice(colon + 1);
        if (fieldValue.startsWith(" ")) fieldValue = fieldValue.slice(1);
        if (field === "data") data.push(fieldValue);
      }
      if (done) break;
    }
    if (data.length) yield data.join("\n"); // a last event without its blank line
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * POSTs a streaming request and calls `onPiece` with each new piece of text,
 * which `pieceOf(choice)` reads from a chunk's first choice. Counts the characters
 * in `job.chars` and takes the server's token count where it sends `usage` (a chunk
 * may hold several tokens: the server joins those a slow reader has not yet taken).
 */
async function streamText(path, body, signal, job, pieceOf, onPiece) {
  const response = await api(path, body, signal);
  for await (const data of serverSentEvents(response)) {
    signal.throwIfAborted(); // Stop ends the text now, even where the rest has arrived
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(chunk.error.message || "the stream failed", 0, chunk.error.code);
    if (chunk.usage && Number.isFinite(chunk.usage.completion_tokens)) {
      job.usage = chunk.usage.completion_tokens;
    }
    const choice = chunk.choices && chunk.choices[0];
    const piece = choice ? pieceOf(choice) : null;
    if (piece) {
      job.chars += [...piece].length;
      onPiece(piece);
    }
  }
  throw new ApiError("the stream ended early, without [DONE]; see the server's log");
}

// ---------------------------------------------------------------------------
// models

function currentModel() {
  return state.models.get(el.model.value) || null;
}

function describe(model) {
  const a = model.aigc || {};
  const parts = [a.kind, a.family];
  if (a.chat) parts.push("chat");
  if (a.conditional) parts.push(`conditional on ${Object.keys(a.classes || {}).join(", ")}`);
  if (a.diffusion && a.diffusion.text) parts.push("text-to-image");
  if (a.voices && a.voices.length) parts.push(`voices ${a.voices.join(", ")}`);
  return [...new Set(parts.filter(Boolean))].join(" · ");
}

async function loadModels() {
  const load = ++state.loads;
  setStatus("loading models…");
  let body;
  try {
    body = await (await api("/v1/models")).json();
  } catch (error) {
    if (load !== state.loads) return;
    state.models = new Map();
    el.model.replaceChildren();
    showModel();
    showError(error);
    return;
  }
  if (load !== state.loads) return;
  el.key.removeAttribute("aria-invalid");
  const models = (body.data || []).filter((m) => m && m.id);
  state.models = new Map(models.map((m) => [m.id, m]));
  const wanted = el.model.value || sessionStorage.getItem(MODEL_STORE);
  const groups = {
    text: "Text", image: "Images", restore: "Restoration", translate: "Translation",
    spoken: "Spoken digits", speech: "Text to speech", denoise: "Speech denoising",
  };
  const options = [];
  for (const [kind, title] of Object.entries(groups)) {
    const group = document.createElement("optgroup");
    group.label = title;
    for (const m of models.filter((m) => (m.aigc && m.aigc.kind) === kind)) {
      group.append(new Option(m.id, m.id));
    }
    if (group.children.length) options.push(group);
  }
  for (const m of models.filter((m) => !(m.aigc && m.aigc.kind in groups))) {
    options.push(new Option(m.id, m.id)); // a kind this page does not know: listed, not usable
  }
  el.model.replaceChildren(...options);
  if (state.models.has(wanted)) el.model.value = wanted;
  showModel();
  setStatus(models.length ? "" : "This server serves no models.");
}

/** Shows the controls of the chosen model's kind; a new model starts a new conversation. */
function showModel() {
  const model = currentModel();
  const a = (model && model.aigc) || {};
  const text = a.kind === "text";
  const image = a.kind === "image";
  const restore = a.kind === "restore";
  const translate = a.kind === "translate";
  const speech = a.kind === "spoken" || a.kind === "speech";
  const denoise = a.kind === "denoise";
  const chat = text && Boolean(a.chat);
  if (model) sessionStorage.setItem(MODEL_STORE, model.id);
  el.modelInfo.textContent = model ? describe(model) : "";
  // A disabled fieldset's fields are neither validated nor submitted.
  el.textControls.hidden = el.textControls.disabled = !text;
  el.imageControls.hidden = el.imageControls.disabled = !image;
  el.restoreControls.hidden = el.restoreControls.disabled = !restore;
  if (restore) el.restoreHint.textContent = restoreHint(a.restore || {});
  el.translateControls.hidden = el.translateControls.disabled = !translate;
  if (translate) showTranslate(a.translate || {});
  el.speechControls.hidden = el.speechControls.disabled = !speech;
  if (speech) showSpeech(a);
  el.denoiseControls.hidden = el.denoiseControls.disabled = !denoise;
  el.seedField.hidden = el.seed.disabled = denoise; // denoising draws nothing at random
  el.promptLabel.textContent = chat ? "Message" : "Prompt";
  el.promptHint.textContent = chat ? "Enter sends; Shift+Enter starts a new line." : "Ctrl+Enter generates.";
  const verbs = { restore: "Restore", translate: "Translate", spoken: "Say", speech: "Say", denoise: "Denoise" };
  el.generate.textContent = chat ? "Send" : verbs[a.kind] || "Generate";
  el.reset.hidden = !chat;
  el.chat.hidden = !chat;
  el.output.hidden = !text || chat;
  el.images.hidden = !(image || restore || translate);
  el.sounds.hidden = !(speech || denoise);
  const usable = text || image || restore || translate || speech || denoise;
  el.generate.disabled = !usable || state.controller !== null;
  buildLabels(image && a.conditional ? a.classes || {} : {});
  state.imageSize = image ? a.image_size || 0 : 0;
  dropEditImage();
  showDiffusion(image ? a.diffusion || null : null);
  resetOutputs();
}

/** A diffusion model's controls, set to its defaults: caption fields for a text-to-image
 * run, steps, the server's schedulers and guidance. */
function showDiffusion(d) {
  el.diffusionControls.hidden = el.diffusionControls.disabled = !d;
  if (!d) return;
  el.captionFields.hidden = !d.text;
  el.steps.value = d.num_inference_steps;
  el.steps.max = d.max_inference_steps;
  el.guidance.value = d.guidance_scale;
  el.guidance.max = d.max_guidance_scale;
  el.scheduler.replaceChildren(...(d.schedulers || []).map((name) => new Option(name, name)));
  el.scheduler.value = d.scheduler;
}

/** One select per attribute the model is conditioned on, each with "any". */
function buildLabels(classes) {
  const fields = Object.entries(classes).map(([attribute, values], i) => {
    const field = document.createElement("div");
    field.className = "field";
    const label = document.createElement("label");
    label.htmlFor = `label-${i}`;
    label.textContent = attribute;
    const select = document.createElement("select");
    select.id = `label-${i}`;
    select.dataset.attribute = attribute;
    select.append(new Option("any", ""));
    for (const value of values) select.append(new Option(String(value), String(value)));
    field.append(label, select);
    return field;
  });
  el.labels.replaceChildren(...fields);
  el.labels.hidden = fields.length === 0;
}

function resetOutputs() {
  state.messages = [];
  el.chat.replaceChildren();
  el.output.replaceChildren();
  el.images.replaceChildren();
  clearSounds();
  el.progress.hidden = true;
}

// ---------------------------------------------------------------------------
// generating

function numberOf(input, parse) {
  const raw = input.value.trim();
  return raw === "" ? null : parse(raw);
}

function samplingParams(model) {
  const params = {
    model: model.id,
    max_tokens: numberOf(el.maxTokens, (v) => parseInt(v, 10)),
    temperature: numberOf(el.temperature, parseFloat),
    stream: true,
    stream_options: { include_usage: true }, // a last chunk with the server's token count
  };
  if (params.max_tokens === null) delete params.max_tokens; // the server's default
  if (params.temperature === null) delete params.temperature;
  const seed = numberOf(el.seed, (v) => parseInt(v, 10));
  if (seed !== null) params.seed = seed;
  return params;
}

/** Appends `piece` as text, keeping the view at the bottom if it was there. */
function appendText(box, piece) {
  const scroller = box.scrollHeight > box.clientHeight ? box : document.scrollingElement;
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 24;
  box.append(document.createTextNode(piece));
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
}

async function complete(model, signal, job) {
  const prompt = el.prompt.value;
  const shown = document.createElement("span");
  shown.className = "prompt";
  shown.textContent = prompt;
  el.output.replaceChildren(shown);
  await streamText("/v1/completions", { ...samplingParams(model), prompt }, signal, job,
    (choice) => choice.text, (piece) => appendText(el.output, piece));
}

function addTurn(role, content) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = content;
  turn.append(who, body);
  el.chat.append(turn);
  turn.scrollIntoView({ block: "nearest" });
  return { turn, body };
}

async function chat(model, signal, job) {
  const text = el.prompt.value;
  if (!text.trim()) throw new ApiError("Type a message first.");
  const before = state.messages.length;
  state.messages.push({ role: "user", content: text });
  const asked = addTurn("user", text);
  const reply = addTurn("assistant", "");
  reply.turn.classList.add("pending");
  el.prompt.value = "";
  let answer = "";
  try {
    await streamText("/v1/chat/completions", { ...samplingParams(model), messages: state.messages },
      signal, job, (choice) => choice.delta && choice.delta.content,
      (piece) => { answer += piece; appendText(reply.body, piece); });
  } catch (error) {
    if (error.name === "AbortError" && answer) {
      state.messages.push({ role: "assistant", content: answer }); // stopped: keep what came
    } else {
      // A failed turn is taken back, and the message put back to edit and resend.
      state.messages.length = before;
      asked.turn.remove();
      reply.turn.remove();
      el.prompt.value = text;
    }
    throw error;
  } finally {
    reply.turn.classList.remove("pending");
  }
  state.messages.push({ role: "assistant", content: answer });
}

async function images(model, signal, job) {
  const body = { model: model.id, n: numberOf(el.n, (v) => parseInt(v, 10)), response_format: "b64_json" };
  if (body.n === null) delete body.n;
  const labels = {};
  for (const select of el.labels.querySelectorAll("select")) {
    if (select.value !== "") labels[select.dataset.attribute] = select.value;
  }
  if (Object.keys(labels).length) body.labels = labels;
  const seed = numberOf(el.seed, (v) => parseInt(v, 10));
  if (seed !== null) body.seed = seed;
  const d = (model.aigc || {}).diffusion;
  if (d) {
    await diffuse(d, body, signal, job);
    return;
  }
  const result = await (await api("/v1/images/generations", body, signal)).json();
  const caption = Object.entries(labels).map(([k, v]) => `${k} ${v}`).join(", ");
  const shown = (result.data || []).map((item, i) => {
    const img = document.createElement("img");
    img.alt = `sample ${i + 1}${caption ? ` (${caption})` : ""}`;
    img.title = img.alt;
    img.src = `data:image/png;base64,${item.b64_json}`;
    return img;
  });
  el.images.replaceChildren(...shown);
  job.images = shown.length;
}

/**
 * A diffusion model's images, streamed: previews (the denoiser's estimate of each image
 * every few steps) replace one another in the grid, the progress bar follows the steps,
 * and the images take the previews' places as they come.
 */
async function diffuse(d, body, signal, job) {
  const steps = numberOf(el.steps, (v) => parseInt(v, 10));
  const guidance = numberOf(el.guidance, parseFloat);
  const inpainting = state.edit !== null && state.edit.mask.some((v) => v);
  // Inpainting takes the server's RePaint defaults (ddpm, 50 steps) unless they are changed.
  const own = inpainting && steps === d.num_inference_steps && el.scheduler.value === d.scheduler;
  if (steps !== null && !own) body.num_inference_steps = steps;
  if (guidance !== null) body.guidance_scale = guidance;
  if (el.scheduler.value && !own) body.scheduler = el.scheduler.value;
  if (d.text) {
    body.prompt = el.imagePrompt.value;
    if (el.negativePrompt.value.trim()) body.negative_prompt = el.negativePrompt.value;
  }
  const total = own ? INPAINT_STEPS : steps ?? d.num_inference_steps;
  Object.assign(body, { stream: true, partial_images: Math.max(0, Math.min(MAX_PREVIEWS, total - 1)) });
  const caption = d.text ? body.prompt.trim() : Object.values(body.labels || {}).join(", ");
  const shown = [];
  const show = (index, b64, step, of) => {
    let img = shown[index];
    if (!img) {
      img = shown[index] = document.createElement("img");
      img.alt = `sample ${index + 1}${caption ? ` (${caption})` : ""}`;
      el.images.append(img);
    }
    img.src = `data:image/png;base64,${b64}`;
    img.classList.toggle("preview", step !== null);
    if (step !== null) {
      img.dataset.step = String(step);
      img.title = `${img.alt}: step ${step} of ${of}`;
    } else {
      delete img.dataset.step;
      img.title = img.alt;
    }
  };
  let path = "/v1/images/generations";
  let kind = "image_generation";
  let request = body;
  if (state.edit) {
    path = "/v1/images/edits";
    kind = "image_edit";
    request = await editForm(body, inpainting);
  }
  el.images.replaceChildren();
  el.progress.max = total;
  el.progress.value = 0;
  el.progress.hidden = false;
  const doing = state.edit ? (inpainting ? "inpainting" : "redrawing") : "denoising";
  setStatus(`${doing}…`);
  const response = await api(path, request, signal);
  for await (const data of serverSentEvents(response)) {
    signal.throwIfAborted();
    const event = JSON.parse(data);
    if (event.error) throw new ApiError(event.error.message || "the stream failed", 0, event.error.code);
    if (event.type === `${kind}.partial_image`) {
      show(event.index ?? 0, event.b64_json, event.step, event.total_steps);
      el.progress.max = event.total_steps;
      el.progress.value = event.step;
      setStatus(`${doing}… step ${event.step} of ${event.total_steps}`);
    } else if (event.type === `${kind}.completed`) {
      show(event.index ?? 0, event.b64_json, null, null);
      job.images += 1;
      el.progress.value = el.progress.max;
    }
  }
  if (job.images === 0) throw new ApiError("the stream ended without images; see the server's log");
}

// ---------------------------------------------------------------------------
// restoration: the uploaded image and the restored one, side by side

function restoreHint(r) {
  const what = r.scale > 1 ? `super-resolves ${r.scale}× (trained on ${r.degradation})`
    : `removes ${r.degradation}`;
  const size = r.input_size ? ` Give a ${r.input_size}×${r.input_size} image.` : " Any size.";
  return `This model ${what}.${size}`;
}

/** The chosen file restored by POST /v1/images/edits, shown beside the file as sent. */
async function restoreImage(model, signal, job) {
  const seed = numberOf(el.seed, (v) => parseInt(v, 10));
  await wholeImage(model, signal, job, el.restoreImage, seed === null ? {} : { seed: String(seed) },
    "restore", "restored");
}

// translation: the uploaded image and its translation into the other domain

function showTranslate(t) {
  const names = { a2b: "A → B", b2a: "B → A" };
  const domains = t.domains || {};
  el.translateDirection.replaceChildren(...(t.directions || []).map((d) => new Option(
    `${names[d] || d} (${domains[d[0]] || d[0]} to ${domains[d[d.length - 1]] || d[d.length - 1]})`, d)));
  el.translateHint.textContent = `Sides must be multiples of ${t.multiple || 1} pixels`
    + ` (trained at ${t.image_size}×${t.image_size}).`;
}

/** The chosen file translated by POST /v1/images/edits, shown beside the file as sent. */
async function translateImage(model, signal, job) {
  await wholeImage(model, signal, job, el.translateImage,
    { direction: el.translateDirection.value }, "translate", "translated");
}

/** POST /v1/images/edits of a whole image (no mask, empty prompt) with ``fields``;
  shows the file as sent beside the answer. */
async function wholeImage(model, signal, job, input, fields, verb, caption) {
  const file = input.files && input.files[0];
  if (!file) throw new ApiError(`choose an image to ${verb} first`);
  const form = new FormData();
  form.append("model", model.id);
  form.append("prompt", "");
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  form.append("image", file, file.name);
  setStatus(`${verb === "restore" ? "restoring" : "translating"}…`);
  const result = await (await api("/v1/images/edits", form, signal)).json();
  const figure = (src, text) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = text;
    img.className = "compare";
    const cap = document.createElement("figcaption");
    fig.append(img, cap);
    img.addEventListener("load", () => {
      cap.textContent = `${text}, ${img.naturalWidth}×${img.naturalHeight}`;
    });
    return fig;
  };
  const url = await new Promise((resolve, reject) => { // a data: URL, as the page's CSP allows
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new ApiError(`${file.name} cannot be read`));
    reader.readAsDataURL(file);
  });
  const shown = (result.data || []).map((item) => figure(`data:image/png;base64,${item.b64_json}`, caption));
  el.images.replaceChildren(figure(url, "input"), ...shown);
  job.images = shown.length;
}

// ---------------------------------------------------------------------------
// audio: speech said from text, and recordings denoised; each clip shown as a player
// and a spectrogram

function showSpeech(a) {
  const tts = a.kind === "speech";
  el.speechInput.placeholder = tts ? "4 2 7" : "seven";
  el.speechHint.textContent = tts
    ? "Digits, said one by one (“427” is “four two seven”): what this model learnt to say."
    : "One digit, as a word or a numeral; the model draws the voice.";
  el.voiceFields.hidden = el.voice.disabled = el.speed.disabled = !tts;
  el.voice.replaceChildren(...(a.voices || []).map((v) => new Option(v, v)));
}

/** The text said by POST /v1/audio/speech, shown as a player and a spectrogram. */
async function speak(model, signal, job) {
  const text = el.speechInput.value;
  if (!text.trim()) throw new ApiError("Type the text to say first.");
  const body = { model: model.id, input: text, response_format: "wav" };
  if (model.aigc.kind === "speech") {
    body.voice = el.voice.value;
    const speed = numberOf(el.speed, parseFloat);
    if (speed !== null) body.speed = speed;
  }
  const seed = numberOf(el.seed, (v) => parseInt(v, 10));
  if (seed !== null) body.seed = seed;
  setStatus("speaking…");
  const sound = await (await api("/v1/audio/speech", body, signal)).blob();
  clearSounds();
  await showSound(sound, `“${text.trim()}”${body.voice ? ` in ${body.voice}` : ""}`, job);
}

/** The chosen recording denoised by POST /v1/audio/denoise, shown below the recording. */
async function denoiseSound(model, signal, job) {
  const file = el.denoiseFile.files && el.denoiseFile.files[0];
  if (!file) throw new ApiError("Choose a recording to denoise first.");
  const form = new FormData();
  form.append("model", model.id);
  form.append("response_format", "wav");
  form.append("file", file, file.name);
  setStatus("denoising…");
  const sound = await (await api("/v1/audio/denoise", form, signal)).blob();
  clearSounds();
  await showSound(file, "input", null);
  await showSound(sound, "denoised", job);
}

function clearSounds() {
  for (const url of state.soundUrls) URL.revokeObjectURL(url);
  state.soundUrls = [];
  el.sounds.replaceChildren();
}

/** A clip as a figure: a caption, a player of `blob` (an object URL, as the page's CSP
 * allows for media) and its spectrogram; counts the clip in `job`, if given. */
async function showSound(blob, caption, job) {
  const figure = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  const audio = document.createElement("audio");
  audio.controls = true;
  audio.preload = "metadata";
  audio.setAttribute("aria-label", caption);
  const url = URL.createObjectURL(blob);
  state.soundUrls.push(url);
  audio.src = url;
  const canvas = document.createElement("canvas");
  canvas.className = "spectrogram";
  figure.append(cap, audio, canvas);
  el.sounds.append(figure);
  let sound;
  try {
    sound = await decodeSound(blob);
  } catch {
    canvas.hidden = true; // the player may still play what this page cannot decode
    cap.textContent = `${caption} (no spectrogram: this browser cannot decode the file)`;
    return;
  }
  const seconds = sound.samples.length / sound.rate;
  drawSpectrogram(canvas, sound.samples);
  canvas.setAttribute("aria-label",
    `spectrogram of ${caption}: time to the right, 0 to ${sound.rate / 2} Hz upwards`);
  cap.textContent = `${caption}, ${seconds.toFixed(2)} s`;
  if (job) {
    job.clips += 1;
    job.seconds += seconds;
  }
}

/** An audio file's samples, mixed to mono, and their rate: a 16-bit PCM WAV (what the
 * server sends) is read here, other files as the browser decodes them (at 44.1 kHz). */
async function decodeSound(blob) {
  const bytes = await blob.arrayBuffer();
  const wav = readWav(bytes);
  if (wav) return wav;
  const decoded = await new OfflineAudioContext(1, 1, 44100).decodeAudioData(bytes);
  const samples = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    decoded.getChannelData(c).forEach((v, i) => { samples[i] += v / decoded.numberOfChannels; });
  }
  return { samples, rate: decoded.sampleRate };
}

/** The samples (mono, in [-1, 1)) and rate of a 16-bit PCM WAV file; null for any other
 * file. A WAV file is a RIFF file of chunks: "fmt " describes the samples, "data" holds
 * them, interleaved by channel, little-endian. */
function readWav(bytes) {
  const view = new DataView(bytes);
  const tag = (at) => String.fromCharCode(...new Uint8Array(bytes, at, 4));
  if (bytes.byteLength < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") return null;
  let format = null;
  for (let at = 12; at + 8 <= bytes.byteLength;) {
    const id = tag(at);
    const size = view.getUint32(at + 4, true);
    const start = at + 8;
    if (id === "fmt " && size >= 16) {
      format = {
        code: view.getUint16(start, true), // 1: integer PCM
        channels: view.getUint16(start + 2, true),
        rate: view.getUint32(start + 4, true),
        bits: view.getUint16(start + 14, true),
      };
    } else if (id === "data" && format) {
      if (format.code !== 1 || format.bits !== 16 || format.channels < 1) return null;
      const channels = format.channels;
      const frames = Math.floor(Math.min(size, bytes.byteLength - start) / (2 * channels));
      const samples = new Float32Array(frames);
      for (let i = 0; i < frames; i++) {
        let sum = 0;
        for (let c = 0; c < channels; c++) sum += view.getInt16(start + 2 * (i * channels + c), true);
        samples[i] = sum / (channels * 32768);
      }
      return { samples, rate: format.rate };
    }
    at = start + size + (size & 1); // chunks are padded to an even length
  }
  return null;
}

const FRAME = 512; // samples per STFT frame: a power of two, for the FFT
const HOP = 128; // samples between frames
const MAX_COLUMNS = 2048; // a longer recording is drawn with a longer hop
const RANGE_DB = 80; // the loudness shown, below the loudest bin

/** The discrete Fourier transform of (re, im) in place, by the iterative radix-2
 * Cooley–Tukey FFT: X[k] = sum_n x[n] e^(-2πikn/N), N = re.length a power of two. */
function fft(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) { // put the input in bit-reversed order
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let size = 2; size <= n; size *= 2) { // butterflies of DFTs of length size / 2
    const half = size / 2;
    for (let k = 0; k < half; k++) {
      const wr = Math.cos((-2 * Math.PI * k) / size);
      const wi = Math.sin((-2 * Math.PI * k) / size);
      for (let a = k; a < n; a += size) {
        const b = a + half;
        const tr = wr * re[b] - wi * im[b];
        const ti = wr * im[b] + wi * re[b];
        re[b] = re[a] - tr;
        im[b] = im[a] - ti;
        re[a] += tr;
        im[a] += ti;
      }
    }
  }
}

/** A colour per loudness in [0, 1]: black through purple and red to pale yellow. */
const RAMP = (() => {
  const stops = [[0, 0, 0], [60, 18, 110], [190, 45, 85], [250, 150, 40], [255, 250, 200]];
  const ramp = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = (i / 255) * (stops.length - 1);
    const s = Math.min(Math.floor(x), stops.length - 2);
    for (let c = 0; c < 3; c++) ramp[3 * i + c] = stops[s][c] + (x - s) * (stops[s + 1][c] - stops[s][c]);
  }
  return ramp;
})();

/** The spectrogram of `samples` on `canvas`, a pixel per frame and frequency bin: the
 * short-time Fourier transform (Hann window of FRAME samples, every HOP samples), its
 * power in decibels over the RANGE_DB below the loudest bin, low frequencies at the
 * bottom. */
function drawSpectrogram(canvas, samples) {
  const bins = FRAME / 2; // 0 up to (not including) half the sample rate
  const hop = Math.max(HOP, Math.ceil((samples.length - FRAME) / (MAX_COLUMNS - 1)));
  const columns = Math.max(1, Math.floor((samples.length - FRAME) / hop) + 1);
  const hann = Float64Array.from({ length: FRAME }, (_, i) => 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / FRAME));
  const re = new Float64Array(FRAME);
  const im = new Float64Array(FRAME);
  const db = new Float32Array(columns * bins); // (columns, bins)
  let loudest = -Infinity;
  for (let t = 0; t < columns; t++) {
    for (let i = 0; i < FRAME; i++) re[i] = (samples[t * hop + i] ?? 0) * hann[i]; // a short clip: zeros
    im.fill(0);
    fft(re, im);
    for (let k = 0; k < bins; k++) {
      const value = 10 * Math.log10(re[k] * re[k] + im[k] * im[k] + 1e-12);
      db[t * bins + k] = value;
      loudest = Math.max(loudest, value);
    }
  }
  canvas.width = columns;
  canvas.height = bins;
  const ctx = canvas.getContext("2d");
  const pixels = ctx.createImageData(columns, bins);
  for (let t = 0; t < columns; t++) {
    for (let k = 0; k < bins; k++) {
      const level = Math.min(1, Math.max(0, (db[t * bins + k] - loudest + RANGE_DB) / RANGE_DB));
      const colour = 3 * Math.round(level * 255);
      const at = 4 * ((bins - 1 - k) * columns + t);
      pixels.data.set(RAMP.subarray(colour, colour + 3), at);
      pixels.data[at + 3] = 255;
    }
  }
  ctx.putImageData(pixels, 0, 0);
}

// ---------------------------------------------------------------------------
// editing: an image to inpaint (a painted mask) or to redraw (image-to-image)

const INPAINT_STEPS = 50; // the server's RePaint default

function pngOf(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

/** The multipart form of POST /v1/images/edits for the JSON fields of `body`: the
 * image, and the painted mask (white = fill) or, with nothing painted, the strength. */
async function editForm(body, inpainting) {
  const form = new FormData();
  const fields = { ...body };
  if (fields.labels) { // edits read a conditional model's labels from the prompt
    fields.prompt = Object.entries(fields.labels).map(([k, v]) => `${k}=${v}`).join(", ");
    delete fields.labels;
  }
  for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
  const { canvas, mask, size } = state.edit;
  form.append("image", await pngOf(canvas), "image.png");
  if (inpainting) {
    const m = document.createElement("canvas");
    m.width = m.height = size;
    const ctx = m.getContext("2d");
    const pixels = ctx.createImageData(size, size);
    mask.forEach((v, i) => {
      pixels.data.fill(v ? 255 : 0, 4 * i, 4 * i + 3);
      pixels.data[4 * i + 3] = 255;
    });
    ctx.putImageData(pixels, 0, 0);
    form.append("mask", await pngOf(m), "mask.png");
  } else {
    form.append("strength", el.strength.value.trim() || "0.6");
  }
  return form;
}

/** The chosen file as the model's image: the centre square, at the model's size; its
 * transparent pixels (OpenAI's mask convention) start the mask. */
async function loadEditImage(file) {
  const size = state.imageSize;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    dropEditImage();
    setStatus(`${file.name} is not an image this browser can read.`, "error");
    return;
  }
  const side = Math.min(bitmap.width, bitmap.height);
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side,
    0, 0, size, size);
  const pixels = ctx.getImageData(0, 0, size, size);
  const mask = new Uint8Array(size * size);
  for (let i = 0; i < mask.length; i++) {
    mask[i] = pixels.data[4 * i + 3] < 128 ? 1 : 0;
    pixels.data[4 * i + 3] = 255; // transparent pixels are sent as black: the mask says the rest
  }
  ctx.putImageData(pixels, 0, 0);
  state.edit = { canvas, mask, size };
  el.editArea.hidden = false;
  setStatus(side !== size || bitmap.width !== bitmap.height
    ? `${file.name}: ${bitmap.width}×${bitmap.height}, edited as its centre square at ${size}×${size}`
    : "");
  drawEdit();
}

function dropEditImage() {
  state.edit = null;
  el.editImage.value = "";
  el.editArea.hidden = true;
}

/** The image, enlarged without smoothing, with the painted region in translucent red. */
function drawEdit() {
  if (!state.edit) return;
  const { canvas, mask, size } = state.edit;
  const view = el.editCanvas;
  const ctx = view.getContext("2d");
  const scale = view.width / size;
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(canvas, 0, 0, view.width, view.height);
  ctx.fillStyle = "rgba(255, 40, 40, 0.55)";
  mask.forEach((v, i) => {
    if (v) ctx.fillRect((i % size) * scale, Math.floor(i / size) * scale, scale, scale);
  });
}

/** Marks the pixels within the brush's radius of the pointer. */
function paintAt(event) {
  if (!state.edit) return;
  const { mask, size } = state.edit;
  const box = el.editCanvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * size;
  const y = ((event.clientY - box.top) / box.height) * size;
  const r = Math.max(0.5, Number(el.brush.value) / 2);
  for (let j = Math.floor(y - r); j <= Math.ceil(y + r); j++) {
    for (let i = Math.floor(x - r); i <= Math.ceil(x + r); i++) {
      const inside = (i + 0.5 - x) ** 2 + (j + 0.5 - y) ** 2 <= r * r;
      const under = i === Math.floor(x) && j === Math.floor(y);
      if (i >= 0 && j >= 0 && i < size && j < size && (inside || under)) mask[j * size + i] = 1;
    }
  }
  drawEdit();
}

function summary(job, seconds) {
  const count = ["image", "restore", "translate"].includes(job.kind)
    ? `${job.images} image${job.images === 1 ? "" : "s"}`
    : ["spoken", "speech", "denoise"].includes(job.kind)
      ? `${job.clips} clip${job.clips === 1 ? "" : "s"} of ${job.seconds.toFixed(2)} s`
      : job.usage !== null
        ? `${job.usage} token${job.usage === 1 ? "" : "s"}`
        : `${job.chars} character${job.chars === 1 ? "" : "s"}`; // stopped: no usage came
  return `${count}, ${seconds.toFixed(1)} s`;
}

async function onGenerate(event) {
  event.preventDefault();
  const model = currentModel();
  if (!model || state.controller || !el.form.reportValidity()) return;
  const a = model.aigc || {};
  const whole = {
    restore: restoreImage, translate: translateImage, spoken: speak, speech: speak, denoise: denoiseSound,
  };
  const run = a.kind === "image" ? images : whole[a.kind] || (a.chat ? chat : complete);
  const job = { kind: a.kind, chars: 0, usage: null, images: 0, clips: 0, seconds: 0 };
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  setStatus("generating…");
  const started = performance.now();
  try {
    await run(model, controller.signal, job);
    setStatus(`done (${summary(job, (performance.now() - started) / 1000)})`);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus(`stopped (${summary(job, (performance.now() - started) / 1000)})`);
    } else {
      showError(error);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

// ---------------------------------------------------------------------------
// status and wiring

function setStatus(message, kind = "") {
  el.status.textContent = message;
  el.status.className = kind;
}

function showError(error) {
  if (error.status === 401) {
    const key = el.key.value.trim();
    el.key.setAttribute("aria-invalid", "true");
    setStatus(key
      ? `The server refused this API key (${error.message}). Check the key in the “API key” field above.`
      : "This server needs an API key: type it in the “API key” field above.", "error");
    if (document.activeElement === document.body) el.key.focus();
    return;
  }
  setStatus(error.name === "ApiError" ? error.message : `Error: ${error.message}`, "error");
}

function setBusy(busy) {
  el.results.setAttribute("aria-busy", String(busy));
  el.generate.disabled = busy || !currentModel();
  el.stop.disabled = !busy;
  el.model.disabled = busy;
  el.reset.disabled = busy;
}

let keyTimer = null;
function onKeyChanged() {
  clearTimeout(keyTimer);
  const key = el.key.value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  keyTimer = setTimeout(loadModels, 300); // once typing pauses
}

el.key.value = sessionStorage.getItem(KEY_STORE) || "";
el.key.addEventListener("input", onKeyChanged);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault(); // Enter in the key field: load the models now
  clearTimeout(keyTimer);
  loadModels();
});
el.model.addEventListener("change", showModel);
el.form.addEventListener("submit", onGenerate);
el.stop.addEventListener("click", () => state.controller && state.controller.abort());
el.reset.addEventListener("click", () => {
  resetOutputs();
  setStatus("");
  el.prompt.focus();
});
el.prompt.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.isComposing) return;
  const chatting = Boolean((currentModel() || {}).aigc?.chat);
  if (event.ctrlKey || event.metaKey || (chatting && !event.shiftKey)) {
    event.preventDefault();
    el.form.requestSubmit();
  }
});
el.editImage.addEventListener("change", () => {
  const file = el.editImage.files && el.editImage.files[0];
  if (file) loadEditImage(file);
  else dropEditImage();
});
el.editCanvas.addEventListener("pointerdown", (event) => {
  state.painting = true;
  el.editCanvas.setPointerCapture(event.pointerId);
  paintAt(event);
});
el.editCanvas.addEventListener("pointermove", (event) => state.painting && paintAt(event));
for (const end of ["pointerup", "pointercancel"]) {
  el.editCanvas.addEventListener(end, () => { state.painting = false; });
}
el.clearMask.addEventListener("click", () => {
  if (state.edit) state.edit.mask.fill(0);
  drawEdit();
});
el.dropImage.addEventListener("click", dropEditImage);
loadModels();
