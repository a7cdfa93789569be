// The browser page of `streamer serve`: stream a camera, a screen or a video file to a session, ask questions,
// watch the memory. Plain JS, no build step, nothing fetched from elsewhere (the page works offline).
// Protocol: README.md, "Websocket protocol".
"use strict";

const info = JSON.parse(document.getElementById("server-info").textContent);

const MAX_SIDE = 640;               // a sampled frame's longer side, in pixels
const JPEG_QUALITY = 0.85;
const MAX_WAITING_FRAMES = 2;       // frames still unsent on the socket beyond which a sample is skipped
const MAX_LOG = 200;
const TOKEN_CHARS = /^[A-Za-z0-9._~-]*$/;
// errors after which the server closes the connection: the close that follows is no surprise
const CLOSING = new Set(["unauthorized", "idle_timeout", "start_timeout", "too_many_connections", "draining"]);
const HINTS = {
  unauthorized: "Check the token.",
  too_many_sessions: "The server has as many sessions as it allows: try again later.",
  too_many_connections: "The server has too many connections waiting: try again later.",
  bad_image: "A frame could not be read as a JPEG or PNG image.",
  no_video: "Start a source first: the memory holds no video yet.",
  idle_timeout: "The session was closed after a long silence: press Start for a new one.",
  start_timeout: "The connection waited too long for a start message: press Start again.",
  message_too_large: "A message was over the server's size limit: use a smaller video.",
  draining: "The server is stopping: press Start to reconnect (save the memory first if it is needed).",
  frame_size_changed: "Every frame of a stream must have the same size: start a new session for another source.",
  frame_limit: "This session took as many frames as the server allows: start a new session.",
  bad_option: "Check the session's options.",
  bad_token: "A token for the page has only letters, digits and - . _ ~ (what secrets.token_urlsafe gives).",
  not_answering: "That answer had already finished.",
  connection_failed: "Is the server running, and is this its address?",
};

const $ = (id) => document.getElementById(id);

const state = {
  ws: null,
  opened: false,          // the socket opened (a close before that is a failure to connect)
  closingError: null,     // an error after which the server closes the connection
  userClosed: false,
  session: null,          // the `ready` reply
  fps: info.fps,          // the session's sampling rate
  frameSize: null,        // [width, height] of the session's frames, fixed by its first frame
  source: null,           // {kind, stream?, url?}
  run: 0,                 // bumped when sampling stops: a frame encoded for an older run is not sent
  timer: null,
  encoding: false,
  frameBytes: 0,          // the size of the last frame sent
  sourceStarted: 0,       // performance.now() when the current source started
  tsBase: 0,              // the stream time at which the current source started
  lastTs: -1,
  framesSent: 0,
  skipped: 0,
  questions: 0,
  cards: new Map(),       // question id -> {card, sentAt, firstAt}
};

// --- small helpers -------------------------------------------------------------------------------

// the exact value stays in data-value (what a test or a script reads); `shown` is what people read
function setText(id, value, shown) {
  const raw = value === null || value === undefined ? "" : String(value);
  $(id).dataset.value = raw;
  $(id).textContent = shown === undefined ? raw : shown;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

// a list of numbers, each rounded to `digits` decimals (trailing zeros dropped), two spaces apart
function numbers(list, digits) {
  return Array.isArray(list) ? list.map((v) => String(Number(Number(v).toFixed(digits)))).join("  ") : "";
}

function log(text, kind) {
  const entry = element("li", kind || "", `${new Date().toLocaleTimeString()}  ${text}`);
  const list = $("log");
  list.prepend(entry);
  while (list.children.length > MAX_LOG) list.lastChild.remove();
}

function showError(code, message) {
  const status = $("status");
  status.textContent = `${code}: ${message}`;
  status.dataset.code = code;
  status.className = "error";
  const hint = HINTS[code];
  $("status-hint").textContent = hint || "";
  $("status-hint").hidden = !hint;
  log(`${code}: ${message}`, "error");
}

function showStatus(text) {
  const status = $("status");
  status.textContent = text;
  status.dataset.code = "";
  status.className = "";
  $("status-hint").hidden = true;
}

function setConnection(label, stateName) {
  const badge = $("connection");
  badge.textContent = label;
  badge.dataset.state = stateName;
}

// --- the connect panel -----------------------------------------------------------------------------

function fillOptions() {
  setText("model", info.model);
  const select = $("opt-policy");
  for (const name of info.policies) {
    const option = element("option", "", name);
    option.value = name;
    option.selected = name === info.policy;
    select.append(option);
  }
  $("opt-budget").value = info.budget;
  $("opt-chunk-frames").value = info.chunk_frames;
  $("opt-fps").value = info.fps;
  $("token-row").hidden = !info.token;
  $("files").hidden = !info.files;
  $("max-new-tokens").max = info.max_new_tokens;
}

function checkToken() {
  const ok = TOKEN_CHARS.test($("token").value);
  $("token-hint").textContent = ok ? "" : HINTS.bad_token + " This one has other characters.";
  $("token-hint").hidden = ok;
  return ok;
}

function positiveNumber(id, label, integer) {
  const text = $(id).value.trim();
  const value = Number(text);
  if (text === "" || !Number.isFinite(value) || value <= 0 || (integer && !Number.isInteger(value))) {
    throw new Error(`${label} must be a ${integer ? "whole number" : "number"} above 0`);
  }
  return value;
}

// Only the options changed from the server's defaults, plus fps: it is the rate this page samples at, and the
// session's positions follow the rate its frames were sampled at.
function startOptions() {
  const options = {type: "start", fps: positiveNumber("opt-fps", "Frames per second", false)};
  const policy = $("opt-policy").value;
  if (policy !== info.policy) options.policy = policy;
  const budget = positiveNumber("opt-budget", "Budget", true);
  if (budget !== info.budget) options.budget = budget;
  const chunkFrames = positiveNumber("opt-chunk-frames", "Frames per chunk", true);
  if (chunkFrames !== info.chunk_frames) options.chunk_frames = chunkFrames;
  return options;
}

function socketUrl() {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/`;
}

function connect(event) {
  event.preventDefault();
  if (state.ws) return;
  if (!checkToken()) {
    showError("bad_token", "the token has characters a browser cannot send");
    return;
  }
  let options;
  try {
    options = startOptions();
  } catch (error) {
    showError("bad_option", error.message);
    return;
  }
  const url = socketUrl();
  // a browser cannot set an Authorization header on a websocket: the token travels as a subprotocol
  const ws = new WebSocket(url, ["bearer." + $("token").value]);
  Object.assign(state, {ws, opened: false, closingError: null, userClosed: false, session: null});
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {
    state.opened = true;
    setConnection("starting", "starting");
    ws.send(JSON.stringify(options));
    log(`connected to ${url}, sent ${JSON.stringify(options)}`);
  };
  ws.onmessage = (message) => receive(message.data);
  ws.onclose = (close) => closed(close, url);
  state.fps = options.fps;
  setConnection("connecting", "connecting");
  showStatus(`Connecting to ${url}…`);
  $("start").disabled = true;
  $("disconnect").disabled = false;
}

function disconnect() {
  if (!state.ws) return;
  state.userClosed = true;
  stopSource(false);
  state.ws.close(1000);
}

function closed(close, url) {
  const {opened, closingError, userClosed} = state;
  state.ws = null;
  state.session = null;
  stopSource(false);
  setSessionControls(false);
  $("start").disabled = false;
  $("disconnect").disabled = true;
  setConnection("not connected", "closed");
  for (const entry of state.cards.values()) {
    if (entry.card.dataset.state === "streaming") finishCard(entry.card, "error", "the connection closed");
  }
  const how = `code ${close.code}${close.reason ? ", " + close.reason : ""}`;
  if (userClosed) {
    showStatus("Disconnected.");
  } else if (!opened) {
    showError("connection_failed", `could not open a websocket to ${url} (${how})`);
  } else if (closingError) {
    log(`the server closed the connection after ${closingError} (${how})`);
  } else {
    showError("connection_closed", `the connection closed unexpectedly (${how})`);
  }
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify(message));
    return true;
  }
  showError("not_connected", "press Start first");
  return false;
}

function setSessionControls(on) {
  for (const id of ["source-camera", "source-screen", "source-file", "question", "max-new-tokens", "ask",
    "save", "load"]) {
    $(id).disabled = !on;
  }
  $("source-file-label").classList.toggle("disabled", !on);
}

// --- messages from the server ----------------------------------------------------------------------

const HANDLERS = {
  ready: onReady,
  progress: onProgress,
  stats: renderStats,
  warning: onWarning,
  token: onToken,
  answer: onAnswer,
  error: onError,
  saved: (m) => onFile(`saved the memory to ${m.path}: ${m.memory_tokens} tokens per layer, ${m.frames} frames`),
  loaded: onLoaded,
  ingest_done: (m) => log(`ingested ${m.source}: ${m.frames_read} frames read`),
  draining: (m) => {
    state.closingError = "draining";
    showError("draining", m.message);
  },
  pong: () => log("pong"),
};

function receive(data) {
  if (typeof data !== "string") return;  // the server sends only text
  let message;
  try {
    message = JSON.parse(data);
  } catch (error) {
    log(`unreadable message from the server: ${data.slice(0, 200)}`, "error");
    return;
  }
  const handler = HANDLERS[message.type];
  if (handler) handler(message);
  else log(`${message.type}: ${data.slice(0, 300)}`);
}

function onReady(message) {
  state.session = message;
  state.frameSize = null;
  state.tsBase = 0;
  state.lastTs = -1;
  state.framesSent = 0;
  state.skipped = 0;
  setText("frames-sent", 0);
  setText("frames-skipped", 0);
  setText("frame-size", "");
  setText("session-id", message.session);
  setText("session-model", message.model);
  setText("session-policy", message.policy);
  setText("session-budget", message.budget);
  setText("session-chunk-frames", `${message.chunk_frames} frames at ${state.fps} fps`);
  setConnection("connected", "open");
  setSessionControls(true);
  showStatus(`Session ${message.session} started: choose a video source.`);
  log(`session ${message.session} ready: ${message.model}, policy ${message.policy}, budget ${message.budget}`);
}

function onProgress(message) {
  setText("progress-pending", message.pending);
  setText("last-ratios", numbers(message.ratios, 3));
  setText("last-js", numbers(message.js, 4));
  log(`chunk ${message.chunks}: ${message.chunk_frames} frames, memory ${Number(message.memory_tokens).toFixed(1)}`
      + ` of ${message.full_tokens} tokens, ${message.evicted} evicted, ${Number(message.seconds).toFixed(2)} s`);
  send({type: "stats"});
}

function onWarning(message) {
  if (message.code === "frames_dropped") setText("frames-dropped", message.total_dropped);
  log(`warning ${message.code}: ${message.message}`, "warning");
}

function onError(message) {
  if (CLOSING.has(message.code)) state.closingError = message.code;
  if (message.request === "start" && state.ws) {
    // a refused start leaves a connection without a session: close it, so that Start can try again
    state.closingError = message.code;
    state.ws.close(1000);
  }
  const entry = message.id !== undefined ? state.cards.get(message.id) : undefined;
  if (entry && entry.card.dataset.state === "streaming") {
    finishCard(entry.card, "error", `${message.code}: ${message.message}`);
  }
  showError(message.code, message.message);
}

function onFile(text) {
  setText("files-result", text);
  log(text);
}

function onLoaded(message) {
  state.frameSize = null;  // the loaded stream's frame size is not known: the next frame sets it
  onFile(`loaded the memory from ${message.path}: ${message.memory_tokens} tokens per layer, ${message.frames} frames`);
  send({type: "stats"});
}

// --- the memory panel -------------------------------------------------------------------------------

function renderStats(stats) {
  // a mean over layers: 1234.4642857 tokens reads as 1234.5
  setText("memory-tokens", stats.memory_tokens, Number.isInteger(stats.memory_tokens) ?
    String(stats.memory_tokens) : stats.memory_tokens.toFixed(1));
  setText("full-tokens", stats.full_tokens);
  setText("budget", stats.budget);
  setText("memory-share", stats.full_tokens ? `${(100 * stats.memory_tokens / stats.full_tokens).toFixed(1)}%` : "");
  setText("frames-ingested", stats.frames_ingested);
  setText("frames-received", stats.frames_received);
  setText("chunks", stats.chunks);
  setText("evicted-tokens", stats.evicted_tokens);
  setText("frames-pending", stats.frames_pending);
  setText("chunks-queued", stats.chunks_queued);
  setText("frames-dropped", stats.frames_dropped);
  setText("last-ratios", numbers(stats.last_ratios, 3));
  setText("last-js", numbers(stats.last_js, 4));
  renderMeter(stats);
  renderLayers(stats.memory_tokens_per_layer || [], stats.budget);
  renderTimeline(stats.timeline || []);
  $("memory").dataset.stats = String(Number($("memory").dataset.stats) + 1);
}

function renderMeter(stats) {
  const full = Math.max(stats.full_tokens, 1);
  $("memory-fill").style.width = `${Math.min(100, 100 * stats.memory_tokens / full)}%`;
  const mark = $("budget-mark");
  mark.hidden = !(stats.budget && stats.budget < full);
  mark.style.left = `${100 * stats.budget / full}%`;
}

function renderLayers(perLayer, budget) {
  const chart = $("layers");
  chart.replaceChildren();
  // a budget far above what the layers hold would flatten the bars: it is drawn only when it is near them
  const most = Math.max(1, ...perLayer);
  const top = budget && budget <= 2 * most ? Math.max(most, budget) : most;
  perLayer.forEach((tokens, layer) => {
    const bar = element("div", "bar");
    bar.style.height = `${100 * tokens / top}%`;
    bar.title = `layer ${layer}: ${tokens} tokens`;
    chart.append(bar);
  });
  if (budget && budget <= top) {
    const line = element("div", "budget-line");
    line.style.bottom = `${100 * budget / top}%`;
    line.title = `budget: ${budget} tokens per layer on average`;
    chart.append(line);
  }
}

function renderTimeline(stretches) {
  const chart = $("timeline");
  chart.replaceChildren();
  for (const stretch of stretches) {
    const held = stretch.held;
    const bar = element("div", held === null ? "bar none" : "bar");
    bar.style.height = held === null ? "" : `${100 * held}%`;
    const share = held === null ? "no chunk is centred in this stretch"
      : `${(100 * held).toFixed(1)}% of its video tokens held`;
    const ofKept = typeof stretch.of_kept === "number"
      ? ` (${(100 * stretch.of_kept).toFixed(1)}% of what its chunks kept)` : "";
    bar.title = `${stretch.start_s.toFixed(1)}–${stretch.end_s.toFixed(1)} s: ${share}${ofKept}`;
    chart.append(bar);
  }
  const last = stretches[stretches.length - 1];
  setText("timeline-start", stretches.length ? "0 s" : "");
  setText("timeline-end", last ? `${last.end_s.toFixed(1)} s` : "");
}

// --- video sources and sampling ---------------------------------------------------------------------

async function startCamera() {
  await startStream("camera", () => navigator.mediaDevices.getUserMedia({video: true, audio: false}));
}

async function startScreen() {
  await startStream("screen", () => navigator.mediaDevices.getDisplayMedia({video: true, audio: false}));
}

async function startStream(kind, open) {
  if (!navigator.mediaDevices) {
    showError("no_media", "this browser gives no camera or screen here (a page needs https or localhost)");
    return;
  }
  let stream;
  try {
    stream = await open();
  } catch (error) {
    showError("no_media", `the ${kind} could not be opened: ${error.message || error.name}`);
    return;
  }
  stopSource(false);
  const video = $("preview");
  video.srcObject = stream;
  showPreview(true);
  for (const track of stream.getVideoTracks()) track.addEventListener("ended", () => stopSource(true));
  await play(video);
  beginSampling({kind, stream});
}

async function startFile() {
  const file = $("source-file").files[0];
  if (!file) return;
  stopSource(false);
  const video = $("preview");
  const url = URL.createObjectURL(file);
  video.srcObject = null;
  video.src = url;
  showPreview(true);
  video.onended = () => stopSource(true);
  await play(video);
  beginSampling({kind: `file ${file.name}`, url});
}

function showPreview(on) {
  $("preview").hidden = !on;
  $("no-source").hidden = on;
}

async function play(video) {
  try {
    await video.play();
  } catch (error) {
    showError("no_media", `the video does not play: ${error.message || error.name}`);
  }
}

function beginSampling(source) {
  state.source = source;
  state.run += 1;
  state.sourceStarted = performance.now();
  // a new source continues the stream's time, which never goes back
  state.tsBase = state.lastTs < 0 ? 0 : state.lastTs + 1 / state.fps;
  const run = state.run;
  state.timer = setInterval(() => sample(run), 1000 / state.fps);
  setText("source-name", source.kind);
  $("stop").disabled = false;
  showStatus(`Streaming the ${source.kind} at ${state.fps} frames per second: ask at any time.`);
  log(`sampling the ${source.kind} at ${state.fps} frames per second`);
}

// stopSource(flush): stop sampling and release the source; flush tells the server to ingest what is waiting
function stopSource(flush) {
  if (!state.source) return;
  clearInterval(state.timer);
  state.timer = null;
  state.run += 1;
  const video = $("preview");
  video.pause();
  video.onended = null;
  if (state.source.stream) state.source.stream.getTracks().forEach((track) => track.stop());
  if (state.source.url) URL.revokeObjectURL(state.source.url);
  video.srcObject = null;
  video.removeAttribute("src");
  video.load();
  showPreview(false);
  const stopped = `Stopped the ${state.source.kind} after ${state.framesSent} frames sent in all.`;
  if (state.ws && !$("status").dataset.code) showStatus(`${stopped} The memory still answers.`);
  log(stopped);
  state.source = null;
  $("stop").disabled = true;
  setText("source-name", "none");
  $("source-file").value = "";
  if (flush && state.ws && state.ws.readyState === WebSocket.OPEN) send({type: "flush"});
}

function frameSize(width, height) {
  const scale = Math.min(1, MAX_SIDE / Math.max(width, height),
    Math.sqrt(info.max_frame_pixels / (width * height)));
  return [Math.max(1, Math.floor(width * scale)), Math.max(1, Math.floor(height * scale))];
}

function streamTime(video) {
  const since = state.source.url ? video.currentTime : (performance.now() - state.sourceStarted) / 1000;
  return state.tsBase + since;
}

function sample(run) {
  const video = $("preview");
  const ws = state.ws;
  if (run !== state.run || !ws || ws.readyState !== WebSocket.OPEN || !state.session) return;
  if (video.readyState < HTMLMediaElement.HAVE_CURRENT_DATA || !video.videoWidth || video.paused) return;
  const ts = streamTime(video);
  if (ts <= state.lastTs) return;  // a file that has not moved on since the last sample
  if (state.encoding || ws.bufferedAmount > MAX_WAITING_FRAMES * state.frameBytes) {
    state.skipped += 1;
    setText("frames-skipped", state.skipped);
    return;
  }
  // every frame of a session has one size (the server refuses another): the first frame's, fitted
  if (!state.frameSize) {
    state.frameSize = frameSize(video.videoWidth, video.videoHeight);
    setText("frame-size", state.frameSize.join("×"));
  }
  const canvas = drawFrame(video, state.frameSize);
  state.encoding = true;
  state.lastTs = ts;
  canvas.toBlob((blob) => sendFrame(run, ts, blob), "image/jpeg", JPEG_QUALITY);
}

function drawFrame(video, [width, height]) {
  const canvas = drawFrame.canvas || (drawFrame.canvas = document.createElement("canvas"));
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  // a source whose shape changes (a resized window) is fitted inside the session's frame, not stretched
  const scale = Math.min(width / video.videoWidth, height / video.videoHeight);
  const w = video.videoWidth * scale;
  const h = video.videoHeight * scale;
  context.fillStyle = "#000";
  context.fillRect(0, 0, width, height);
  context.drawImage(video, (width - w) / 2, (height - h) / 2, w, h);
  return canvas;
}

async function sendFrame(run, ts, blob) {
  try {
    if (!blob) throw new Error("the frame could not be encoded as JPEG");
    const data = await blob.arrayBuffer();
    const ws = state.ws;
    if (run !== state.run || !ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({type: "frame", ts}));
    ws.send(data);
    state.frameBytes = data.byteLength;
    state.framesSent += 1;
    setText("frames-sent", state.framesSent);
  } catch (error) {
    log(error.message, "error");
  } finally {
    state.encoding = false;
  }
}

// --- questions and answers ----------------------------------------------------------------------------

function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const message = {type: "ask", id: `q${++state.questions}`, question};
  const limit = $("max-new-tokens").value.trim();
  if (limit) message.max_new_tokens = Number(limit);
  if (!send(message)) return;
  const card = answerCard(message.id, question);
  state.cards.set(message.id, {card, sentAt: performance.now(), firstAt: null});
  $("answers").prepend(card);
  $("question").value = "";
}

function answerCard(id, question) {
  const card = element("div", "answer");
  card.dataset.id = id;
  card.dataset.state = "streaming";
  const head = element("div", "head");
  head.append(element("span", "question", question));
  const cancel = element("button", "cancel", "Stop answer");
  cancel.type = "button";
  cancel.addEventListener("click", () => send({type: "cancel", id}));
  head.append(cancel);
  card.append(head, element("div", "text"), element("div", "meta"));
  return card;
}

function finishCard(card, cardState, note) {
  card.dataset.state = cardState;
  card.querySelector(".cancel").remove();
  if (note) card.querySelector(".meta").textContent = note;
}

function onToken(message) {
  const entry = state.cards.get(message.id);
  if (!entry || entry.card.dataset.state !== "streaming") return;
  if (entry.firstAt === null) entry.firstAt = performance.now();
  entry.card.querySelector(".text").textContent += message.text;
}

function onAnswer(message) {
  const entry = state.cards.get(message.id);
  if (!entry) return;
  const {card} = entry;
  card.querySelector(".text").textContent = message.text;
  if (message.cancelled) {
    finishCard(card, "cancelled", "stopped: the text above is what was generated before the stop");
    return;
  }
  finishCard(card, "done");
  const stats = message.stats || {};
  const clientTtft = entry.firstAt === null ? null : (entry.firstAt - entry.sentAt) / 1000;
  const parts = [
    element("span", "ttft", `TTFT ${clientTtft === null ? "–" : clientTtft.toFixed(3) + " s"} here, `
      + `${Number(stats.ttft_s).toFixed(3)} s on the server`),
    element("span", "speed", `${Number(stats.tokens_per_s).toFixed(1)} tokens/s`),
    element("span", "seen", `${plural(stats.tokens, "token")}, saw ${plural(stats.frames, "frame")}`
      + (stats.frames_behind ? ` (${stats.frames_behind} not ingested yet)` : "")),
  ];
  card.querySelector(".meta").replaceChildren(...parts.flatMap((part, i) => (i ? [" · ", part] : [part])));
}

// --- save and load --------------------------------------------------------------------------------------

function snapshot(kind) {
  const path = $("snapshot-path").value.trim();
  if (!path) {
    showError("bad_option", "give a path to save the memory to or load it from");
    return;
  }
  send({type: kind, path});
}

// --- wiring ------------------------------------------------------------------------------------------------

function main() {
  fillOptions();
  $("start-form").addEventListener("submit", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("token").addEventListener("input", checkToken);
  $("source-camera").addEventListener("click", startCamera);
  $("source-screen").addEventListener("click", startScreen);
  $("source-file").addEventListener("change", startFile);
  $("stop").addEventListener("click", () => stopSource(true));
  $("ask-form").addEventListener("submit", ask);
  $("files-form").addEventListener("submit", (event) => event.preventDefault());
  $("save").addEventListener("click", () => snapshot("save"));
  $("load").addEventListener("click", () => snapshot("load"));
}

main();
