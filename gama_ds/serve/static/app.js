// The page's side of gama-ds serve: pick or record a clip, draw the fbank the model sees, ask
// through the same /v1/chat/completions any OpenAI client uses, and show the answer as it streams.
"use strict";

const $ = (id) => document.getElementById(id);
const FORMATS = ["wav", "mp3", "flac", "ogg"];
let info = { model: "", api_key_required: false };
let clip = null; // {data: base64, format}
let recorder = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function needKey(response) {
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("api-key").focus();
  }
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

// 16-bit PCM WAV of decoded audio, every channel kept: the server takes the first channel after
// subtracting the mean, as training did.
function encodeWav(decoded) {
  const channels = decoded.numberOfChannels, n = decoded.length, rate = decoded.sampleRate;
  const buffer = new ArrayBuffer(44 + n * channels * 2);
  const view = new DataView(buffer);
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + n * channels * 2, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
  view.setUint16(22, channels, true); view.setUint32(24, rate, true);
  view.setUint32(28, rate * channels * 2, true); view.setUint16(32, channels * 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, n * channels * 2, true);
  const data = [];
  for (let c = 0; c < channels; c++) data.push(decoded.getChannelData(c));
  let offset = 44;
  for (let i = 0; i < n; i++) {
    for (let c = 0; c < channels; c++) {
      const s = Math.max(-1, Math.min(1, data[c][i]));
      view.setInt16(offset, s < 0 ? s * 0x8000 : s * 0x7fff, true);
      offset += 2;
    }
  }
  return buffer;
}

async function toWav(buffer) {
  const context = new AudioContext();
  try {
    return encodeWav(await context.decodeAudioData(buffer));
  } finally {
    context.close();
  }
}

function formatOf(file) {
  const ext = (file.name.split(".").pop() || "").toLowerCase();
  if (FORMATS.includes(ext)) return ext;
  if (ext === "oga" || ext === "opus") return "ogg";
  return null;
}

// Colours from dark to bright for the spectrogram (a few stops, interpolated).
const STOPS = [[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]];
function colour(v) {
  const x = (v / 255) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), t = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * t));
}

function drawSpectrogram(spec) {
  const canvas = $("spectrogram");
  const bytes = Uint8Array.from(atob(spec.data), (c) => c.charCodeAt(0));
  canvas.width = spec.frames;
  canvas.height = spec.bins;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(spec.frames, spec.bins);
  for (let f = 0; f < spec.frames; f++) {
    for (let b = 0; b < spec.bins; b++) {
      const [r, g, bl] = colour(bytes[f * spec.bins + b]);
      const p = ((spec.bins - 1 - b) * spec.frames + f) * 4; // low frequencies at the bottom
      image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = bl; image.data[p + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  canvas.dataset.frames = spec.frames;
  const seconds = (spec.frames * spec.frame_shift_ms) / 1000;
  $("spectrogram-note").textContent =
    `The fbank the model sees: ${spec.frames} frames (${seconds.toFixed(2)} s) x ${spec.bins} mel bins` +
    (spec.frames >= spec.max_frames ? "; the model hears only this first part of the clip." : ".");
}

async function useClip(buffer, format, label, blob) {
  showError("");
  $("spectrogram").removeAttribute("data-frames");
  if (!format) {
    buffer = await toWav(buffer); // a format the server does not read: decoded here, sent as WAV
    format = "wav";
  }
  clip = { data: toBase64(buffer), format };
  $("clip-status").textContent = `${label} (${format}, ${(buffer.byteLength / 1e6).toFixed(2)} MB)`;
  $("player").src = URL.createObjectURL(blob || new Blob([buffer]));
  $("player").hidden = false;
  const response = await fetch("/api/spectrogram", { method: "POST", headers: headers(), body: JSON.stringify(clip) });
  if (!response.ok) {
    needKey(response);
    showError(await errorMessage(response));
    return;
  }
  drawSpectrogram(await response.json());
}

$("file").addEventListener("change", async () => {
  const file = $("file").files[0];
  if (!file) return;
  try {
    await useClip(await file.arrayBuffer(), formatOf(file), file.name, file);
  } catch (e) {
    showError(`${file.name}: ${e.message || e}`);
  }
});

$("record").addEventListener("click", async () => {
  if (recorder && recorder.state === "recording") {
    recorder.stop();
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").textContent = "Record";
      const blob = new Blob(chunks, { type: recorder.mimeType });
      try {
        // MediaRecorder writes webm or ogg/opus; decoded here and sent as WAV.
        const wav = await toWav(await blob.arrayBuffer());
        await useClip(wav, "wav", "recording", new Blob([wav], { type: "audio/wav" }));
      } catch (e) {
        showError(`recording: ${e.message || e}`);
      }
    };
    recorder.start();
    $("record").textContent = "Stop";
    $("clip-status").textContent = "recording...";
  } catch (e) {
    showError(`cannot record: ${e.message || e}`);
  }
});

function readNumber(id, parse) {
  const text = $(id).value.trim();
  return text === "" ? undefined : parse(text);
}

$("ask").addEventListener("click", async () => {
  const answer = $("answer");
  showError("");
  const question = $("question").value.trim();
  if (!question) {
    showError("Write a question first.");
    return;
  }
  const content = [{ type: "text", text: question }];
  if (clip) content.push({ type: "input_audio", input_audio: clip });
  const body = {
    model: info.model,
    messages: [{ role: "user", content }],
    stream: true,
    temperature: readNumber("temperature", parseFloat),
    max_tokens: readNumber("max-tokens", (x) => parseInt(x, 10)),
  };
  answer.textContent = "";
  answer.dataset.state = "streaming";
  $("ask").disabled = true;
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      needKey(response);
      throw new Error(await errorMessage(response));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let pending = "", finished = false;
    while (!finished) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = pending.indexOf("\n\n")) >= 0) {
        const event = pending.slice(0, cut);
        pending = pending.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") { finished = true; break; }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) answer.textContent += choice.delta.content;
          }
        }
      }
    }
    answer.dataset.state = "done";
  } catch (e) {
    answer.dataset.state = "error";
    showError(e.message || String(e));
  } finally {
    $("ask").disabled = false;
  }
});

(async () => {
  const response = await fetch("/api/info");
  info = await response.json();
  $("model-name").textContent = info.model;
  $("key-box").hidden = !info.api_key_required;
  const key = sessionStorage.getItem("gama-ds-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => sessionStorage.setItem("gama-ds-api-key", $("api-key").value.trim()));
})();
