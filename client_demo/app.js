// lipstream demo client: avatars over REST, a WebRTC session, speech over the audio websocket.
// Plain ES module, no build step. REST / websocket shapes: see the README ("The demo page").

const $ = (id) => document.getElementById(id);
const SAMPLE_RATE = 16000;
const CHUNK_MS = 20;
const CHUNK_SAMPLES = (SAMPLE_RATE * CHUNK_MS) / 1000;
const ICE_GATHER_TIMEOUT_MS = 3000;

// Numbers for tests and curious users (the overlay shows the same).
const stats = {
  framesDecoded: 0,
  fps: 0,
  latencyMs: null,
  latencyP99Ms: null,
  firstFrameMs: null,
  // Received audio (the server sends the driving audio back, in sync). Chrome reports no
  // energy while the video element is muted.
  audioEnergy: 0,
  audioConcealed: 0, // fraction of received audio samples the jitter buffer had to invent
  connected: false,
  sessionId: null,
  events: [], // server events ({type, ...}), in arrival order
};
window.lipstreamStats = stats;

const ui = {
  avatars: [],
  selectedAvatar: null,
  session: null, // the live Session, if any
  mic: null, // the running Microphone, if any
  speaker: null, // the running FileSpeaker, if any
};

// ---------------------------------------------------------------- status line and events

function setStatus(text, kind = "info", context = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
  el.dataset.context = context;
  if (kind === "error") console.error(text);
}

function reportError(context, err) {
  setStatus(`${context}: ${err && err.message ? err.message : err}`, "error", context);
}

function clearError(context) {
  // An error that a later success answers (e.g. the API key was fixed) leaves the status line.
  if ($("status").dataset.context === context) setStatus("Pick a ready avatar and Connect.");
}

function logEvent(text, kind = "event") {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  const list = $("events");
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

// ---------------------------------------------------------------- the engine (header)

const ENGINE_NOTES = {
  preview: "the mouth follows loudness only (no lip-sync model): not MuseTalk",
  musetalk: "MuseTalk v1.5 lip-sync",
};

// Which engine the server runs and why (/readyz: open, no key); retried while it starts.
async function showEngine() {
  const el = $("engine");
  let body = null;
  try {
    body = await (await fetch("/readyz", { cache: "no-store" })).json();
  } catch {
    body = null; // not up (yet): retried below
  }
  if (!body || !body.engine) {
    el.textContent = body && body.status === "failed" ? "engine: failed to start" : "engine: starting…";
    if (!body || body.status !== "failed") setTimeout(showEngine, 2000);
    return;
  }
  el.textContent = `engine: ${body.engine}`;
  el.className = `engine ${body.engine}`;
  const note = document.createElement("span");
  note.className = "engine-reason";
  note.textContent = ` (${body.engine_reason || "no reason given"}; ${ENGINE_NOTES[body.engine] || ""})`;
  el.append(note);
  el.dataset.engine = body.engine;
}

// ---------------------------------------------------------------- REST

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function errorText(status, body) {
  if (body && typeof body === "object") {
    const detail = body.detail ?? body.error ?? body.message;
    if (typeof detail === "string") return `${status} ${detail}`;
    if (detail !== undefined) return `${status} ${JSON.stringify(detail)}`;
  }
  return `${status} ${typeof body === "string" && body ? body : "request failed"}`;
}

function parseBody(text) {
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

async function api(method, path, body) {
  const headers = authHeaders();
  const init = { method, headers, keepalive: method === "DELETE" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const data = parseBody(await res.text());
  if (!res.ok) throw new Error(`${method} ${path}: ${errorText(res.status, data)}`);
  return data;
}

// ---------------------------------------------------------------- avatars

const isReady = (a) => a.status === "ready";
const isFailed = (a) => a.status === "failed" || a.status === "error";

let avatarPoll = null; // re-list while some avatar is still being prepared

async function refreshAvatars() {
  clearTimeout(avatarPoll);
  try {
    const data = await api("GET", "/v1/avatars");
    ui.avatars = Array.isArray(data) ? data : data.avatars || [];
    renderAvatars();
    clearError("Could not list avatars");
  } catch (err) {
    reportError("Could not list avatars", err);
    return;
  }
  if (ui.avatars.some((a) => !isReady(a) && !isFailed(a))) {
    avatarPoll = setTimeout(refreshAvatars, 1000);
  }
}

function renderAvatars() {
  const list = $("avatar-list");
  list.replaceChildren();
  if (ui.avatars.length === 0) {
    const li = document.createElement("li");
    li.className = "note";
    li.textContent = "No avatars yet: upload a short video or a photo of a face.";
    list.append(li);
  }
  if (!ui.avatars.some((a) => a.id === ui.selectedAvatar && isReady(a))) {
    const firstReady = ui.avatars.find(isReady);
    ui.selectedAvatar = firstReady ? firstReady.id : null;
  }
  for (const avatar of ui.avatars) {
    const li = document.createElement("li");
    const label = document.createElement("label");
    const radio = document.createElement("input");
    radio.type = "radio";
    radio.name = "avatar";
    radio.value = avatar.id;
    radio.disabled = !isReady(avatar);
    radio.checked = avatar.id === ui.selectedAvatar;
    radio.addEventListener("change", () => {
      ui.selectedAvatar = avatar.id;
      updateButtons();
    });
    const name = document.createElement("span");
    name.textContent = avatar.name || avatar.id;
    const state = document.createElement("span");
    state.className = `badge ${isReady(avatar) ? "ok" : isFailed(avatar) ? "bad" : "busy"}`;
    state.textContent = isReady(avatar)
      ? "ready"
      : isFailed(avatar)
        ? `failed: ${avatar.error || "unknown error"}`
        : `${avatar.status} ${Math.round((avatar.progress || 0) * 100)}%`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.title = "Delete this avatar";
    remove.textContent = "×";
    remove.addEventListener("click", () => deleteAvatar(avatar));
    label.append(radio, name, state);
    li.append(label, remove);
    list.append(li);
  }
  updateButtons();
}

async function deleteAvatar(avatar) {
  if (!window.confirm(`Delete avatar "${avatar.name || avatar.id}"?`)) return;
  try {
    await api("DELETE", `/v1/avatars/${encodeURIComponent(avatar.id)}`);
    setStatus(`Deleted avatar ${avatar.name || avatar.id}.`);
  } catch (err) {
    reportError("Could not delete the avatar", err);
  }
  await refreshAvatars();
}

function uploadAvatar(file, name) {
  // XMLHttpRequest rather than fetch: it reports upload progress.
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("file", file);
    if (name) form.append("name", name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/avatars");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) $("upload-progress").value = e.loaded / e.total;
    };
    xhr.onload = () => {
      const body = parseBody(xhr.responseText);
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new Error(`POST /v1/avatars: ${errorText(xhr.status, body)}`));
    };
    xhr.onerror = () => reject(new Error("POST /v1/avatars: network error"));
    xhr.send(form);
  });
}

async function watchPreparation(id) {
  const note = $("upload-status");
  for (;;) {
    const avatar = await api("GET", `/v1/avatars/${encodeURIComponent(id)}`);
    $("prepare-progress").value = avatar.progress || 0;
    if (isReady(avatar)) {
      note.textContent = `Avatar ${avatar.name || id} is ready.`;
      ui.selectedAvatar = id;
      return avatar;
    }
    if (isFailed(avatar)) throw new Error(avatar.error || "preparation failed");
    note.textContent = `Preparing: ${avatar.status} ${Math.round((avatar.progress || 0) * 100)}%`;
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function onUpload(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  if (!file) return;
  $("upload-button").disabled = true;
  $("upload-progress").value = 0;
  $("prepare-progress").value = 0;
  $("upload-status").textContent = `Uploading ${file.name}…`;
  try {
    const created = await uploadAvatar(file, $("upload-name").value.trim());
    $("upload-progress").value = 1;
    await refreshAvatars();
    const ready = await watchPreparation(created.id);
    setStatus(`Avatar ${ready.name || ready.id} is ready: Connect to start a session.`, "ok");
  } catch (err) {
    $("upload-status").textContent = "Failed.";
    reportError("Upload failed", err);
  } finally {
    $("upload-button").disabled = false;
    await refreshAvatars();
  }
}

// ---------------------------------------------------------------- session (WebRTC + websocket)

function waitForIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS); // go on with what we have
    pc.addEventListener("icegatheringstatechange", check);
  });
}

function websocketUrl(audioWs, token) {
  const url = new URL(audioWs, window.location.href);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (token && !url.searchParams.has("token")) url.searchParams.set("token", token);
  return url.toString();
}

function percentiles(field) {
  // GET /v1/sessions/{id} -> {..., latency_ms: {p50, p99, n}, first_frame_ms: {p50, p99, n}}
  if (!field || typeof field !== "object") return { p50: null, p99: null };
  return { p50: field.p50 ?? null, p99: field.p99 ?? null };
}

class Session {
  constructor(avatarId) {
    this.avatarId = avatarId;
    this.id = null;
    this.pc = null;
    this.ws = null;
    this.timers = [];
    this.closed = false;
    this.lastFrames = null; // {frames, t} for fps from deltas
  }

  async open() {
    const pc = new RTCPeerConnection();
    this.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const remote = new MediaStream();
    pc.ontrack = (e) => {
      remote.addTrack(e.track);
      const video = $("video");
      if (video.srcObject !== remote) video.srcObject = remote;
      video.play().catch((err) => reportError("Video playback", err));
    };
    pc.onconnectionstatechange = () => this.onConnectionState(pc.connectionState);

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    const answer = await api("POST", "/v1/sessions", {
      avatar_id: this.avatarId,
      sdp: pc.localDescription.sdp,
      type: "offer",
    });
    this.id = answer.session_id;
    stats.sessionId = this.id;
    await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
    await this.openWebsocket(websocketUrl(answer.audio_ws, answer.token));
    this.timers.push(setInterval(() => this.pollStats(), 500));
    this.timers.push(setInterval(() => this.pollLatency(), 1000));
  }

  openWebsocket(url) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("audio websocket failed to open"));
      ws.onmessage = (e) => this.onServerMessage(e.data);
      ws.onclose = (e) => {
        if (this.closed) return;
        // The server closes it when the session ends (DELETE elsewhere, idle timeout, the
        // avatar was deleted); without it no audio can be sent, so the session is over.
        const reason = e.reason ? `: ${e.reason}` : "";
        const kind = e.code === 1000 ? "warn" : "error";
        setStatus(`The audio websocket closed (code ${e.code}${reason}).`, kind);
        disconnect();
      };
    });
  }

  onServerMessage(data) {
    if (typeof data !== "string") return;
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      logEvent(`unreadable server message: ${data}`, "error");
      return;
    }
    stats.events.push(event);
    const { type, ...rest } = event;
    const details = Object.keys(rest).length ? ` ${JSON.stringify(rest)}` : "";
    logEvent(`${type}${details}`, type === "error" ? "error" : "event");
    if (type === "error") setStatus(`Server: ${event.message || data}`, "error");
    if (type === "session_ended" && !this.closed) {
      setStatus(`The server ended the session (${event.reason || "no reason given"}).`, "warn");
      disconnect();
    }
  }

  onConnectionState(state) {
    logEvent(`connection ${state}`, "local");
    if (state === "connected") {
      stats.connected = true;
      setStatus(`Connected: session ${this.id}.`, "ok");
      $("unmute").hidden = !$("video").muted;
    } else if (state === "failed" || state === "closed") {
      stats.connected = false;
      if (!this.closed) {
        setStatus(`Connection ${state}.`, "error");
        disconnect();
      }
    } else if (state === "disconnected") {
      setStatus("Connection interrupted; waiting for it to recover…", "warn");
    }
    updateButtons();
  }

  sendPcm(int16) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(int16);
  }

  sendControl(type) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type }));
      logEvent(`sent ${type}`, "local");
    } else {
      setStatus(`Cannot send "${type}": the audio websocket is not open.`, "error");
    }
  }

  async pollStats() {
    if (!this.pc) return;
    try {
      const report = await this.pc.getStats();
      report.forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio") {
          stats.audioEnergy = s.totalAudioEnergy || 0;
          stats.audioConcealed = (s.concealedSamples || 0) / Math.max(1, s.totalSamplesReceived || 0);
        }
        if (s.type !== "inbound-rtp" || s.kind !== "video") return;
        const frames = s.framesDecoded || 0;
        const now = performance.now();
        let fps = s.framesPerSecond;
        if (fps === undefined && this.lastFrames) {
          fps = ((frames - this.lastFrames.frames) * 1000) / (now - this.lastFrames.t);
        }
        this.lastFrames = { frames, t: now };
        stats.framesDecoded = frames;
        stats.fps = fps || 0;
      });
      renderOverlay();
    } catch (err) {
      reportError("getStats", err);
    }
  }

  async pollLatency() {
    if (!this.id) return;
    try {
      const res = await fetch(`/v1/sessions/${this.id}`, { headers: authHeaders() });
      if (res.status === 404 && !this.closed) {
        setStatus("The session has ended on the server.", "warn");
        disconnect();
        return;
      }
      const info = parseBody(await res.text());
      if (!res.ok) throw new Error(errorText(res.status, info));
      const latency = percentiles(info.latency_ms);
      stats.latencyMs = latency.p50;
      stats.latencyP99Ms = latency.p99;
      stats.firstFrameMs = percentiles(info.first_frame_ms).p50;
      renderOverlay();
    } catch (err) {
      reportError("Session info", err);
    }
  }

  async close() {
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    // DELETE first, so the server ends the session for that reason, not "peer closed".
    if (this.id) {
      try {
        await api("DELETE", `/v1/sessions/${this.id}`);
      } catch (err) {
        // The server may already have ended it (idle timeout, peer closed): not worth an error.
        if (!String(err.message).includes(" 404 ")) reportError("Disconnect", err);
      }
    }
    if (this.ws) this.ws.close(1000, "client disconnect");
    if (this.pc) this.pc.close();
  }
}

function renderOverlay() {
  const ms = (v) => (v === null || v === undefined ? "–" : Math.round(v));
  $("ov-frames").textContent = stats.framesDecoded;
  $("ov-fps").textContent = stats.fps ? stats.fps.toFixed(1) : "–";
  $("ov-p50").textContent = ms(stats.latencyMs);
  $("ov-p99").textContent = ms(stats.latencyP99Ms);
  $("ov-first").textContent = ms(stats.firstFrameMs);
}

async function connect() {
  if (ui.session || !ui.selectedAvatar) return;
  const session = new Session(ui.selectedAvatar);
  ui.session = session;
  updateButtons();
  setStatus("Connecting…");
  try {
    await session.open();
    if (!stats.connected) setStatus(`Session ${session.id} open; waiting for media…`);
  } catch (err) {
    reportError("Connect failed", err);
    await disconnect();
  }
  updateButtons();
}

async function disconnect() {
  const session = ui.session;
  if (!session) return;
  ui.session = null;
  stopMic();
  stopSpeaking();
  await session.close();
  const video = $("video");
  video.srcObject = null;
  $("unmute").hidden = true;
  Object.assign(stats, {
    connected: false,
    fps: 0,
    latencyMs: null,
    latencyP99Ms: null,
    firstFrameMs: null,
    sessionId: null,
  });
  renderOverlay();
  if ($("status").classList.contains("ok") || $("status").classList.contains("info")) {
    setStatus("Disconnected.");
  }
  updateButtons();
}

// ---------------------------------------------------------------- microphone

class VoiceGate {
  // Splits the microphone into utterances: chunks are sent while the level is above a
  // threshold (plus a short pre-roll before and a hangover after), and {"type":"end"} once
  // it has stayed below for HANGOVER_MS. Silence between utterances is not sent, so the
  // avatar idles and the server's playback events mark each utterance.
  static THRESHOLD = 0.01; // RMS, full scale = 1 (about -40 dBFS)
  static PREROLL_CHUNKS = 10; // 200 ms kept from before the onset
  static HANGOVER_MS = 600;

  constructor(session) {
    this.session = session;
    this.preroll = [];
    this.active = false;
    this.quietMs = 0;
  }

  push(chunk) {
    let sum = 0;
    for (let i = 0; i < chunk.length; i++) sum += (chunk[i] / 32768) ** 2;
    const loud = Math.sqrt(sum / chunk.length) > VoiceGate.THRESHOLD;
    if (!this.active) {
      this.preroll.push(chunk);
      if (this.preroll.length > VoiceGate.PREROLL_CHUNKS) this.preroll.shift();
      if (!loud) return;
      this.active = true;
      for (const c of this.preroll) this.session.sendPcm(c);
      this.preroll = [];
      this.quietMs = 0;
      return;
    }
    this.session.sendPcm(chunk);
    this.quietMs = loud ? 0 : this.quietMs + CHUNK_MS;
    if (this.quietMs >= VoiceGate.HANGOVER_MS) this.finish();
  }

  finish() {
    if (!this.active) return;
    this.active = false;
    this.session.sendControl("end");
  }
}

async function startMic() {
  const session = ui.session;
  if (!session) return;
  if (!window.isSecureContext || !navigator.mediaDevices) {
    throw new Error("the microphone needs a secure page (https:// or http://localhost)");
  }
  stopSpeaking();
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const ctx = new AudioContext();
  const gate = new VoiceGate(session);
  try {
    await ctx.audioWorklet.addModule(new URL("audio-worklet.js", import.meta.url));
    const node = new AudioWorkletNode(ctx, "pcm16-resampler", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      processorOptions: { targetRate: SAMPLE_RATE, chunkMs: CHUNK_MS },
    });
    node.port.onmessage = (e) => gate.push(e.data);
    ctx.createMediaStreamSource(stream).connect(node);
    node.connect(ctx.destination); // the node outputs silence; connecting keeps it pulled
    await ctx.resume();
  } catch (err) {
    stream.getTracks().forEach((t) => t.stop());
    await ctx.close();
    throw err;
  }
  ui.mic = { stream, ctx, gate };
  logEvent("microphone on", "local");
}

function stopMic() {
  if (!ui.mic) return;
  ui.mic.stream.getTracks().forEach((t) => t.stop());
  ui.mic.ctx.close();
  ui.mic.gate.finish(); // the utterance in progress, if any, is complete
  ui.mic = null;
  logEvent("microphone off", "local");
}

async function toggleMic() {
  try {
    if (ui.mic) {
      stopMic();
    } else {
      await startMic();
    }
  } catch (err) {
    reportError("Microphone", err);
  }
  updateButtons();
}

// ---------------------------------------------------------------- speak a file

async function decodeTo16kMono(file) {
  const bytes = await file.arrayBuffer();
  // decodeAudioData resamples to the context's rate; rendering through a one-channel
  // context mixes down to mono.
  const decoded = await new OfflineAudioContext(1, 1, SAMPLE_RATE).decodeAudioData(bytes);
  const length = Math.max(1, Math.ceil(decoded.duration * SAMPLE_RATE));
  const offline = new OfflineAudioContext(1, length, SAMPLE_RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const mono = (await offline.startRendering()).getChannelData(0);
  const pcm = new Int16Array(mono.length);
  for (let i = 0; i < mono.length; i++) {
    const v = Math.max(-1, Math.min(1, mono[i]));
    pcm[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
  }
  return pcm;
}

class FileSpeaker {
  // Sends PCM in 20 ms chunks at real-time pace (against the clock, so timer jitter
  // does not accumulate), then {"type":"end"}.
  constructor(session, pcm, onDone) {
    this.session = session;
    this.pcm = pcm;
    this.onDone = onDone;
    this.sent = 0; // chunks
    this.total = Math.ceil(pcm.length / CHUNK_SAMPLES);
    this.start = performance.now();
    this.timer = setInterval(() => this.tick(), 5);
  }

  tick() {
    const due = Math.min(this.total, Math.floor((performance.now() - this.start) / CHUNK_MS) + 1);
    for (; this.sent < due; this.sent++) {
      const begin = this.sent * CHUNK_SAMPLES;
      this.session.sendPcm(this.pcm.slice(begin, begin + CHUNK_SAMPLES));
    }
    if (this.sent === this.total) {
      this.stop();
      this.session.sendControl("end");
      this.onDone();
    }
  }

  stop() {
    clearInterval(this.timer);
  }
}

async function speakFile() {
  const file = $("speak-file").files[0];
  const session = ui.session;
  if (!file || !session) return;
  stopSpeaking();
  if (ui.mic) stopMic();
  try {
    const pcm = await decodeTo16kMono(file);
    const seconds = (pcm.length / SAMPLE_RATE).toFixed(1);
    logEvent(`speaking ${file.name} (${seconds} s)`, "local");
    ui.speaker = new FileSpeaker(session, pcm, () => {
      ui.speaker = null;
      updateButtons();
    });
  } catch (err) {
    reportError(`Could not decode ${file.name}`, err);
  }
  updateButtons();
}

function stopSpeaking() {
  if (!ui.speaker) return;
  ui.speaker.stop();
  ui.speaker = null;
}

function interrupt() {
  stopSpeaking();
  if (ui.session) ui.session.sendControl("clear");
  updateButtons();
}

// ---------------------------------------------------------------- wiring

function updateButtons() {
  const live = ui.session !== null;
  const avatar = ui.avatars.find((a) => a.id === ui.selectedAvatar);
  $("connect").disabled = live || !avatar || !isReady(avatar);
  $("disconnect").disabled = !live;
  $("mic").disabled = !live;
  $("mic").textContent = ui.mic ? "Stop microphone" : "Start microphone";
  $("mic").setAttribute("aria-pressed", String(ui.mic !== null));
  $("interrupt").disabled = !live;
  $("speak").disabled = !live || !$("speak-file").files.length;
}

function init() {
  const keyInput = $("api-key");
  keyInput.value = localStorage.getItem("lipstream.apiKey") || "";
  keyInput.addEventListener("change", () => {
    localStorage.setItem("lipstream.apiKey", keyInput.value.trim());
    refreshAvatars();
  });
  $("api-key-form").addEventListener("submit", (e) => e.preventDefault());
  $("refresh-avatars").addEventListener("click", refreshAvatars);
  $("upload-form").addEventListener("submit", onUpload);
  $("connect").addEventListener("click", connect);
  $("disconnect").addEventListener("click", disconnect);
  $("mic").addEventListener("click", toggleMic);
  $("speak").addEventListener("click", speakFile);
  $("speak-file").addEventListener("change", updateButtons);
  $("interrupt").addEventListener("click", interrupt);
  $("unmute").addEventListener("click", () => {
    const video = $("video");
    video.muted = false;
    video.play().catch((err) => reportError("Video playback", err));
    $("unmute").hidden = true;
  });
  window.addEventListener("pagehide", () => ui.session && ui.session.close());
  if (!window.RTCPeerConnection) {
    setStatus("This browser lacks WebRTC: the demo cannot connect.", "error");
  } else if (!window.isSecureContext) {
    setStatus(
      "Not a secure page (https:// or localhost): the microphone is unavailable; Speak a file works.",
      "warn",
    );
  } else {
    setStatus("Pick a ready avatar and Connect.");
  }
  renderOverlay();
  refreshAvatars();
  showEngine();
}

init();
