// semifer serve: the page's behaviour. Talks only to this server's /api (docs/web.md).
"use strict";

const $ = id => document.getElementById(id);
const {html} = Charts;
const state = {labels: [], maxUpload: 50, runsTimer: null, runData: {}, selected: null, runsKey: ""};

// ---------------------------------------------------------------- shared
function showMessage(id, text) {
  const box = $(id);
  box.textContent = text || "";
  box.hidden = !text;
}

// JSON from the API, or an Error carrying the server's message (FastAPI's "detail")
async function api(url, options) {
  let res;
  try {
    res = await fetch(url, options);
  } catch (e) {
    throw new Error(`the server cannot be reached (${e.message}); is semifer serve still running?`);
  }
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) {
    const detail = body && body.detail;
    const text = typeof detail === "string" ? detail : detail ? JSON.stringify(detail) : res.statusText;
    throw new Error(res.status === 413 || /too large/.test(text) ? text : `${text} (HTTP ${res.status})`);
  }
  return body;
}

function tooLarge(files) {
  const total = files.reduce((a, f) => a + f.size, 0);
  return total > state.maxUpload * 1048576
    ? `upload too large: ${(total / 1048576).toFixed(1)} MB, the limit is ${state.maxUpload} MB per request (semifer serve --max-upload-mb)`
    : null;
}

function showTab() {
  const name = (location.hash || "#photos").slice(1).split("?")[0];
  const tab = ["photos", "video", "webcam", "runs"].includes(name) ? name : "photos";
  document.querySelectorAll("section.tab").forEach(s => { s.hidden = s.id !== tab; });
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.tab === tab));
  if (tab === "runs") startRuns(); else stopRuns();
  if (tab !== "webcam") stopCamera();
}

// boxes (x1 y1 x2 y2 in image pixels) drawn over an image or video shown at any size
function drawBoxes(holder, faces, width, height) {
  holder.querySelectorAll(".face-box").forEach(b => b.remove());
  faces.forEach((f, i) => {
    const [x1, y1, x2, y2] = f.box, box = html("div", "face-box", holder);
    box.style.left = `${100 * x1 / width}%`;
    box.style.top = `${100 * y1 / height}%`;
    box.style.width = `${100 * (x2 - x1) / width}%`;
    box.style.height = `${100 * (y2 - y1) / height}%`;
    html("span", "", box, `${i + 1} ${f.label} ${Math.max(...f.probs).toFixed(2)}`);
  });
}

// ---------------------------------------------------------------- photos
async function uploadPhotos(files) {
  showMessage("photo-message", "");
  $("photo-csv").hidden = true;
  $("photo-results").innerHTML = "";
  if (!files.length) return;
  const big = tooLarge(files);
  if (big) { showMessage("photo-message", big); return; }
  const form = new FormData();
  files.forEach(f => form.append("files", f, f.name));
  $("photo-status").textContent = `analysing ${files.length} photo(s)...`;
  const t0 = performance.now();
  let data;
  try {
    data = await api("/api/photos", {method: "POST", body: form});
  } catch (e) {
    $("photo-status").textContent = "";
    showMessage("photo-message", e.message);
    return;
  }
  const nFaces = data.results.reduce((a, r) => a + r.faces.length, 0);
  $("photo-status").textContent = `${data.results.length} photo(s), ${nFaces} face(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  if (data.csv) { $("photo-csv").href = data.csv; $("photo-csv").hidden = false; }
  data.results.forEach((r, i) => renderPhoto(r, files[i]));
}

function renderPhoto(r, file) {
  const card = html("div", "card photo-card", $("photo-results"));
  html("h2", "", card, r.name);
  if (r.width) {
    const holder = html("div", "photo", card);
    const img = html("img", "", holder);
    img.src = URL.createObjectURL(file);
    img.alt = r.name;
    img.onload = () => URL.revokeObjectURL(img.src);
    drawBoxes(holder, r.faces, r.width, r.height);
  }
  if (r.error) html("p", "error", card, r.error);
  r.faces.forEach((f, k) => {
    const face = html("div", "face", card);
    html("h3", "", face, `Face ${k + 1}: ${f.label}`);
    Charts.bars(face, f.probs, state.labels);
  });
}

function setupPhotos() {
  const input = $("photo-input"), drop = $("photo-drop");
  input.addEventListener("change", () => uploadPhotos([...input.files]));
  ["dragenter", "dragover"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach(t => drop.addEventListener(t, e => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", e => uploadPhotos([...e.dataTransfer.files]));
}

// ---------------------------------------------------------------- video
function setupVideo() {
  $("video-form").addEventListener("submit", async e => {
    e.preventDefault();
    const file = $("video-input").files[0];
    showMessage("video-message", "");
    $("video-result").hidden = true;
    if (!file) return;
    const big = tooLarge([file]);
    if (big) { showMessage("video-message", big); return; }
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("smooth", $("video-smooth").value || "0");
    form.append("every", $("video-every").value || "1");
    $("video-submit").disabled = true;
    $("video-progress").hidden = false;
    $("video-bar").removeAttribute("value");
    $("video-progress-text").textContent = `uploading ${file.name}...`;
    try {
      const job = await api("/api/videos", {method: "POST", body: form});
      await followVideo(job.id);
    } catch (err) {
      showMessage("video-message", err.message);
      $("video-progress").hidden = true;
    } finally {
      $("video-submit").disabled = false;
    }
  });
}

async function followVideo(id) {
  for (;;) {
    const job = await api(`/api/videos/${id}`);
    const bar = $("video-bar");
    if (job.total > 0) { bar.max = job.total; bar.value = Math.min(job.done, job.total); } else bar.removeAttribute("value");
    $("video-progress-text").textContent = job.status === "queued" ? "waiting for the previous video to finish..."
      : `${job.status}: frame ${job.done}${job.total ? " of " + job.total : ""}`;
    if (job.status === "error") throw new Error(job.error);
    if (job.status === "done") { renderVideo(job); return; }
    await new Promise(r => setTimeout(r, 600));
  }
}

function renderVideo(job) {
  const base = `/api/videos/${job.id}/files/`;
  $("video-progress-text").textContent = `done: ${job.frames} frames, ${job.faces} faces in ${job.seconds} s`;
  $("video-result").hidden = false;
  const files = $("video-files");
  files.innerHTML = "";
  const names = {"predictions.csv": "predictions.csv", "abaw": "ABAW labels (.txt)", "annotated.mp4": "annotated video (mp4)",
                 "annotated.webm": "annotated video (webm)"};
  for (const [key, rel] of Object.entries(job.files)) {
    const a = html("a", "button", files, `Download ${names[key] || key}`);
    a.href = base + rel;
    a.setAttribute("download", "");
  }
  const tl = job.timeline;
  Charts.line($("video-timeline"), {
    title: `Class probabilities per frame (first face; smoothing ${job.smooth})`, xlabel: "seconds", ymin: 0, ymax: 1,
    width: 1000, height: 260, empty: "no face in any frame",
    series: job.labels.map((label, k) => ({label, color: Charts.CLASS_COLORS[k], x: tl.t,
                                            y: tl.probs.map(p => (p ? p[k] : null))})),
  });
  const player = $("video-player");
  player.hidden = !job.files["annotated.webm"];
  if (!player.hidden) player.src = base + job.files["annotated.webm"];
  const thumbs = $("video-thumbs");
  thumbs.innerHTML = "";
  job.thumbs.forEach(rel => { const img = html("img", "", thumbs); img.src = base + rel; img.alt = rel; });
}

// ---------------------------------------------------------------- webcam
const cam = {stream: null, running: false, frames: 0, t0: 0};

async function startCamera() {
  showMessage("cam-message", "");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showMessage("cam-message", "This browser gives this page no camera access: it needs a secure address " +
      "(http://127.0.0.1 or http://localhost on this machine, or https).");
    return;
  }
  try {
    cam.stream = await navigator.mediaDevices.getUserMedia({video: {width: {ideal: 640}, height: {ideal: 480}}, audio: false});
  } catch (e) {
    showMessage("cam-message", `The camera could not be opened (${e.name}: ${e.message}).`);
    return;
  }
  const video = $("cam-video");
  video.srcObject = cam.stream;
  await video.play().catch(() => {});
  cam.running = true; cam.frames = 0; cam.t0 = performance.now();
  $("cam-start").disabled = true; $("cam-stop").disabled = false;
  camLoop();
}

function stopCamera() {
  cam.running = false;
  if (cam.stream) cam.stream.getTracks().forEach(t => t.stop());
  cam.stream = null;
  $("cam-start").disabled = false; $("cam-stop").disabled = true;
}

// one frame in flight at a time: the loop runs at the rate the server's CPU sustains
async function camLoop() {
  const video = $("cam-video"), canvas = document.createElement("canvas");
  while (cam.running) {
    if (!video.videoWidth) { await new Promise(r => setTimeout(r, 100)); continue; }
    const scale = Math.min(1, 640 / video.videoWidth);
    canvas.width = Math.round(video.videoWidth * scale);
    canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise(r => canvas.toBlob(r, "image/jpeg", 0.85));
    const form = new FormData();
    form.append("files", blob, "webcam.jpg");
    form.append("live", "1");
    try {
      const r = (await api("/api/photos", {method: "POST", body: form})).results[0];
      if (!cam.running) break;
      cam.frames++;
      drawBoxes(video.parentElement, r.faces, r.width, r.height);
      const bars = $("cam-bars");
      bars.innerHTML = "";
      if (r.faces.length) Charts.bars(bars, r.faces[0].probs, state.labels);
      const fps = cam.frames / ((performance.now() - cam.t0) / 1000);
      $("cam-status").textContent = `${cam.frames} frames, ${fps.toFixed(1)} frames/s; ` +
        (r.faces.length ? `${r.faces.length} face(s): ${r.faces.map(f => f.label).join(", ")}` : "no face");
      showMessage("cam-message", "");
    } catch (e) {
      showMessage("cam-message", e.message);
      await new Promise(r => setTimeout(r, 1000));
    }
  }
}

// ---------------------------------------------------------------- runs
function startRuns() {
  if (state.runsTimer) return;
  refreshRuns();
  state.runsTimer = setInterval(refreshRuns, 3000);  // metrics.jsonl grows while a run trains
}

function stopRuns() {
  clearInterval(state.runsTimer);
  state.runsTimer = null;
}

async function refreshRuns() {
  let listing;
  try {
    listing = await api("/api/runs");
  } catch (e) {
    showMessage("run-message", e.message);
    return;
  }
  showMessage("run-message", listing.runs.length ? "" :
    `No run directories (folders with a metrics.jsonl) under ${listing.root || "--runs"}.`);
  if (state.selected === null) state.selected = new Set(listing.runs.slice(0, 4).map(r => r.name));
  let changed = false;
  for (const r of listing.runs) {
    const have = state.runData[r.name];
    if (state.selected.has(r.name) && (!have || have.version !== r.version)) {
      try {
        state.runData[r.name] = await api(`/api/run?name=${encodeURIComponent(r.name)}`);
        changed = true;
      } catch (e) { showMessage("run-message", e.message); }
    }
  }
  const key = JSON.stringify([listing.runs.map(r => [r.name, r.version]), [...state.selected]]);
  if (changed || key !== state.runsKey) {
    state.runsKey = key;
    renderRunList(listing.runs);
    renderRuns(listing.runs.filter(r => state.selected.has(r.name) && state.runData[r.name]).map(r => state.runData[r.name]),
               listing.runs.map(r => r.name));
  }
  $("run-status").textContent = `${listing.runs.length} run(s) under ${listing.root || "(no --runs)"}; ` +
    `checked ${new Date().toLocaleTimeString()}, every 3 s`;
}

function runColor(allNames, name) { return Charts.RUN_COLORS[allNames.indexOf(name) % Charts.RUN_COLORS.length]; }

function renderRunList(runs) {
  const list = $("run-list"), names = runs.map(r => r.name);
  list.innerHTML = "";
  runs.forEach(r => {
    const item = html("label", "run-item", list);
    const box = html("input", "", item);
    box.type = "checkbox";
    box.checked = state.selected.has(r.name);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(r.name); else state.selected.delete(r.name);
      refreshRuns();
    });
    html("i", "", item).style.background = runColor(names, r.name);
    item.appendChild(document.createTextNode(r.name + " "));
    if (r.training) html("span", "badge live", item, "training");
    else if (r.finished) html("span", "badge", item, "finished");
    const best = r.best ? `best macro-F1 ${r.best.macro_f1.toFixed(4)} @ ${r.best.step}` : "no eval yet";
    html("small", "", item, `${r.algorithm}, step ${r.last_step}${r.total_steps ? "/" + r.total_steps : ""}; ${best}`);
  });
}

function renderRuns(runs, allNames) {
  const color = r => runColor(allNames, r.name), labels = runs.length ? runs[0].labels : state.labels;
  const f1 = [];
  runs.forEach(r => {
    f1.push({label: `${r.name} macro-F1`, color: color(r), x: r.eval.step, y: r.eval.macro_f1});
    f1.push({label: `${r.name} accuracy`, color: color(r), x: r.eval.acc_step, y: r.eval.accuracy, dash: true, width: 1.2});
  });
  Charts.line($("chart-f1"), {title: "Validation macro-F1 (accuracy dashed)", xlabel: "step", ymin: 0, ymax: 1, series: f1});
  const mask = [];
  runs.forEach(r => {
    const m = r.train.mask_rate, a = r.train.pseudo_acc;
    if (m) mask.push({label: `${r.name} accepted`, color: color(r), x: m.step, y: m.value});
    if (a) mask.push({label: `${r.name} accuracy of accepted`, color: color(r), x: a.step, y: a.value, dash: true, width: 1.2});
  });
  Charts.line($("chart-mask"), {title: "Pseudo-labels: share of the unlabeled batch accepted", xlabel: "step", ymin: 0, ymax: 1,
                                series: mask, empty: "no pseudo-labels logged (a supervised run?)"});
  const th = $("chart-thresholds");
  th.innerHTML = "";
  labels.forEach((name, k) => {
    const box = html("div", "chart", th);
    Charts.line(box, {title: name, ymin: 0, ymax: 1.02, width: 300, height: 150, legend: false, empty: "no thresholds logged",
                      series: runs.filter(r => r.train.thresholds).map(r => ({label: r.name, color: color(r),
                        x: r.train.thresholds.step, y: r.train.thresholds.value.map(v => v[k])}))});
  });
  const key = html("div", "", th);   // one legend for the 8 panels: the runs' colours
  key.style.gridColumn = "1 / -1";
  Charts.legend(key, runs.map(r => ({label: r.name, color: color(r)})));
  const mix = $("chart-mix");
  mix.innerHTML = "";
  runs.forEach(r => {
    const c = r.train.pseudo_class_mix;
    Charts.stack(html("div", "chart", mix), {title: r.name, x: c ? c.step : [], rows: c ? c.value : [], labels});
  });
  const rounds = $("rounds");
  rounds.innerHTML = "";
  runs.filter(r => r.rounds.length).forEach(r => {
    html("h3", "", rounds, `${r.name}: pseudo-labels accepted per class at each round`);
    const t = html("table", "rounds", rounds), head = html("tr", "", t);
    ["round", "step", ...labels].forEach(h => html("th", "", head, h));
    r.rounds.forEach(x => {
      const tr = html("tr", "", t);
      [x.round ?? "", x.step, ...(x.accepted_per_class || labels.map(() => ""))].forEach(v => html("td", "", tr, String(v)));
    });
  });
  const cms = $("confusions");
  cms.innerHTML = "";
  runs.forEach(r => {
    if (!r.confusion) { html("p", "muted", cms, `${r.name}: no evaluation yet`); return; }
    const f = r.confusion.macro_f1 === null || r.confusion.macro_f1 === undefined ? "" : `, macro-F1 ${r.confusion.macro_f1.toFixed(4)}`;
    Charts.confusion(cms, r.confusion.matrix, labels, `${r.name}: step ${r.confusion.step}${f}`);
  });
  const cfg = $("configs");
  cfg.innerHTML = "";
  runs.forEach(r => {
    const d = html("details", "", cfg);
    html("summary", "", d, `${r.name} (${r.algorithm})`);
    html("pre", "", d, r.config || "(no config.yaml)");
  });
}

// ---------------------------------------------------------------- start
async function main() {
  setupPhotos();
  setupVideo();
  $("cam-start").addEventListener("click", startCamera);
  $("cam-stop").addEventListener("click", stopCamera);
  try {
    const info = await api("/api/info");
    state.labels = info.labels;
    state.maxUpload = info.max_upload_mb;
    $("model-info").textContent = `model ${info.model.split("/").slice(-3).join("/")} · detector ${info.detector}`;
  } catch (e) {
    showMessage("photo-message", e.message);
  }
  window.addEventListener("hashchange", showTab);
  showTab();
  document.body.dataset.ready = "1";  // for tests and screenshots: handlers are in place
}

main();
