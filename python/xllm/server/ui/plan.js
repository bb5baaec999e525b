// The memory planner page: fills the form (query string, presets), calls POST /v0/plan and
// GET /v0/system, and draws memory vs context as an SVG chart with zoom and hover.
"use strict";

const $ = (sel) => document.querySelector(sel);
const COLORS = { gguf: "#7b3fb5", fp16: "#2456c7", int8: "#e07b00", int4: "#16873a" };
const PRESETS = [ // shapes of well-known Hub models, usable offline
  { label: "Llama 3.1 8B", hf: "meta-llama/Llama-3.1-8B-Instruct", params: 8.03e9, layers: 32, hidden_size: 4096, heads: 32, kv_heads: 8, head_dim: 128, vocab: 128256, context_length: 131072 },
  { label: "Qwen2.5 7B", hf: "Qwen/Qwen2.5-7B-Instruct", params: 7.62e9, layers: 28, hidden_size: 3584, heads: 28, kv_heads: 4, head_dim: 128, vocab: 152064, context_length: 32768 },
  { label: "Mistral 7B", hf: "mistralai/Mistral-7B-Instruct-v0.3", params: 7.25e9, layers: 32, hidden_size: 4096, heads: 32, kv_heads: 8, head_dim: 128, vocab: 32768, context_length: 32768 },
  { label: "Llama 3.1 70B", hf: "meta-llama/Llama-3.1-70B-Instruct", params: 70.6e9, layers: 80, hidden_size: 8192, heads: 64, kv_heads: 8, head_dim: 128, vocab: 128256, context_length: 131072 },
  { label: "Llama 2 7B (MHA)", hf: "meta-llama/Llama-2-7b-hf", params: 6.74e9, layers: 32, hidden_size: 4096, heads: 32, kv_heads: 32, head_dim: 128, vocab: 32000, context_length: 4096 },
];
const MANUAL = ["params", "layers", "hidden_size", "heads", "kv_heads", "head_dim", "vocab", "context_length"];
const NUMBERS = [...MANUAL, "ctx_size", "parallel", "safety_margin_mb", "gpu_memory_utilization"];
const form = $("#form");
let gpuList = [];
let lastChart = null;

function gb(bytes) {
  if (bytes >= 1e9) return (bytes / 1e9).toFixed(bytes >= 1e11 ? 0 : 2) + " GB";
  if (bytes >= 1e6) return (bytes / 1e6).toFixed(0) + " MB";
  return (bytes / 1e3).toFixed(bytes >= 1e4 ? 0 : 1) + " KB";
}

function el(tag, attrs = {}, text = "") {
  const ns = ["svg", "path", "line", "circle", "text", "g", "rect"].includes(tag) ? "http://www.w3.org/2000/svg" : null;
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== "") e.textContent = text;
  return e;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem("xllm-key");
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const err = data.error;
    throw new Error(typeof err === "string" ? err : (err && err.message) || "HTTP " + r.status);
  }
  return data;
}

function showSource() {
  const source = $("#source").value;
  for (const label of document.querySelectorAll("[data-source]")) label.hidden = label.dataset.source !== source;
}

async function refreshGpus() {
  const body = $("#gpus tbody");
  try {
    const system = await api("GET", "/v0/system");
    gpuList = system.gpus;
    body.replaceChildren();
    for (const g of gpuList) {
      const box = el("input", { type: "checkbox", checked: "", "data-gpu": g.index });
      const row = el("tr", { "data-gpu": g.index });
      const use = el("td"); use.append(box); row.append(use);
      for (const v of [g.index, g.name, gb(g.total_bytes), gb(g.total_bytes - g.free_bytes), gb(g.free_bytes)]) row.append(el("td", {}, String(v)));
      body.append(row);
    }
    $("#gpu-message").textContent = gpuList.length ? "" : "No NVIDIA GPU found (no driver or no GPU): plans are for CPU and RAM, or type a what-if amount.";
    $("#gpus").hidden = !gpuList.length;
  } catch (e) {
    $("#gpu-message").textContent = "Cannot read the GPUs: " + e.message;
  }
}

async function loadStored() {
  try {
    const tags = await api("GET", "/api/tags");
    for (const m of tags.models) {
      $("#stored").append(el("option", { value: m.name }));
      $("#preset").append(el("option", { value: "model:" + m.name }, m.name + " (stored)"));
    }
  } catch (e) { /* the presets still work */ }
}

function applyPreset(value) {
  if (value.startsWith("model:")) {
    $("#source").value = "model";
    form.elements.model.value = value.slice(6);
  } else if (value.startsWith("hub:")) {
    const p = PRESETS[Number(value.slice(4))];
    $("#source").value = "manual";
    form.elements.hf.value = p.hf;
    for (const k of MANUAL) form.elements[k].value = p[k];
  }
  showSource();
}

function request() {
  const f = form.elements;
  const body = {};
  const source = $("#source").value;
  if (source === "model") body.model = f.model.value.trim();
  if (source === "hf") body.hf = f.hf.value.trim();
  for (const k of NUMBERS) {
    if (!MANUAL.includes(k) || source === "manual") {
      if (f[k].value !== "") body[k] = Number(f[k].value);
    }
  }
  for (const k of ["quant", "kv_type", "backend"]) if (f[k].value) body[k] = f[k].value;
  if (f.vram_mb.value.trim()) body.vram_mb = f.vram_mb.value.split(",").map(Number);
  const chosen = [...document.querySelectorAll("#gpus input[data-gpu]")];
  if (chosen.length && !body.vram_mb && chosen.some((b) => !b.checked)) {
    body.gpus = chosen.filter((b) => b.checked).map((b) => Number(b.dataset.gpu));
  }
  return body;
}

async function compute(event) {
  if (event) event.preventDefault();
  $("#error").hidden = true;
  $("#compute").disabled = true;
  try {
    const plan = await api("POST", "/v0/plan", request());
    show(plan);
  } catch (e) {
    $("#error").textContent = e.message;
    $("#error").hidden = false;
    $("#results").hidden = true;
  } finally {
    $("#compute").disabled = false;
  }
}

function show(p) {
  $("#results").hidden = false;
  const m = p.model;
  $("#verdict").replaceChildren(
    el("strong", { class: p.fits ? "fits" : "nofit", id: "fits" }, p.fits ? "Fits." : "Does not fit."),
    " " + m.name + ": " + (m.params / 1e9).toFixed(2) + "B parameters, " + m.layers + " layers, " + m.kv_heads + "/" + m.heads + " KV heads" + (m.gqa ? " (GQA)" : "") +
    "; " + p.backend + ", weights " + p.quant + ", KV cache " + p.kv_type + ", " + p.ctx_size + " × " + p.parallel + " tokens." + (p.message ? " " + p.message : ""));
  const rows = [["Weights", p.weights_bytes], ["KV cache per token", p.kv_bytes_per_token], ["KV cache at " + p.ctx_size, p.kv_bytes],
    ["Activations, compute buffers", p.activations_bytes], ["Backend overhead", p.overhead_bytes], ["Total", p.total_bytes], ["Available (free − margin)", p.available_bytes]];
  $("#summary tbody").replaceChildren(...rows.map(([k, v]) => { const r = el("tr"); r.append(el("td", {}, k), el("td", {}, gb(v))); return r; }));
  if (p.gpu_layers !== null) {
    const r = el("tr"); r.append(el("td", {}, "GPU layers that fit"), el("td", { id: "gpu-layers" }, p.gpu_layers + " of " + p.layers)); $("#summary tbody").append(r);
  }
  $("#devices tbody").replaceChildren(...p.devices.map((d) => {
    const r = el("tr");
    r.append(el("td", {}, d.kind.toUpperCase() + " " + d.index + " " + d.name), el("td", {}, gb(d.free_bytes)), el("td", {}, gb(d.planned_bytes)),
      el("td", { class: d.fits ? "fits" : "nofit" }, d.fits ? "yes" : "no"));
    return r;
  }));
  const byQuant = {};
  for (const row of p.max_context) (byQuant[row.quant] = byQuant[row.quant] || {})[row.kv_type] = row;
  const rec = p.recommendation;
  $("#max-contexts tbody").replaceChildren(...Object.entries(byQuant).map(([q, kvs]) => {
    const r = el("tr"); r.append(el("td", {}, q));
    for (const kv of ["f16", "q8_0", "q4_0"]) {
      const c = kvs[kv];
      const best = q === rec.quant && kv === rec.kv_type;
      r.append(el("td", { class: best ? "best max-context" : "max-context", "data-quant": q, "data-kv": kv }, c ? c.max_context.toLocaleString("en") + (c.limited_by_model ? "*" : "") : "–"));
    }
    return r;
  }));
  $("#recommendation").replaceChildren("Recommended: weights ", el("strong", {}, rec.quant), ", KV cache ", el("strong", {}, rec.kv_type),
    ", up to ", el("output", { id: "recommended-context", "data-value": rec.max_context }, rec.max_context.toLocaleString("en")), " tokens: " + rec.reason + ". (* the model's own context limit)");
  lastChart = p.chart;
  drawChart(p.chart, null);
}

// --- the chart -------------------------------------------------------------------------------

function drawChart(chart, domain) {
  const box = $("#chart");
  const W = Math.max(box.clientWidth || 800, 320), H = Math.round(Math.min(420, W * 0.6));
  const pad = { l: 64, r: 16, t: 16, b: 52 };
  const xs = chart.contexts;
  const [x0, x1] = domain || [0, xs[xs.length - 1]];
  const ymax = 1.1 * Math.max(chart.available_bytes, ...chart.series.flatMap((s) => s.bytes.filter((_, i) => xs[i] >= x0 && xs[i] <= x1)));
  const sx = (x) => pad.l + (x - x0) / (x1 - x0 || 1) * (W - pad.l - pad.r);
  const sy = (y) => H - pad.b - y / ymax * (H - pad.t - pad.b);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "memory vs context" });
  const clip = el("g");
  const axis = el("g", { class: "axis" });
  for (let i = 0; i <= 5; i++) {
    const y = ymax * i / 5, x = x0 + (x1 - x0) * i / 5;
    axis.append(el("line", { class: "grid-line", x1: pad.l, x2: W - pad.r, y1: sy(y), y2: sy(y) }));
    axis.append(el("text", { x: pad.l - 6, y: sy(y) + 4, "text-anchor": "end" }, gb(y)));
    axis.append(el("text", { x: sx(x), y: H - pad.b + 16, "text-anchor": "middle" }, Math.round(x).toLocaleString("en")));
  }
  axis.append(el("text", { x: (W + pad.l) / 2, y: H - 8, "text-anchor": "middle" }, "context per sequence (tokens), KV cache " + chart.kv_type));
  svg.append(axis, clip);
  const inside = (x) => x >= x0 && x <= x1;
  for (const s of chart.series) {
    const pts = xs.map((x, i) => [x, s.bytes[i]]).filter(([x]) => inside(x));
    const d = pts.map(([x, y], i) => (i ? "L" : "M") + sx(x).toFixed(1) + "," + sy(y).toFixed(1)).join("");
    clip.append(el("path", { class: "trace", "data-quant": s.quant, d, stroke: COLORS[s.quant] || "#333" }));
    if (s.max_context > 0 && inside(s.max_context)) {
      clip.append(el("circle", { class: "max-point", "data-quant": s.quant, cx: sx(s.max_context), cy: sy(chart.available_bytes), r: 5, fill: COLORS[s.quant] || "#333" }));
    }
  }
  clip.append(el("line", { class: "free", x1: pad.l, x2: W - pad.r, y1: sy(chart.available_bytes), y2: sy(chart.available_bytes) }));
  const legend = el("g", { class: "legend" });
  [...chart.series.map((s) => [s.quant + " (max " + s.max_context.toLocaleString("en") + ")", COLORS[s.quant] || "#333"]), ["free memory", "#c62828"]].forEach(([t, c], i) => {
    legend.append(el("rect", { x: pad.l + 10, y: pad.t + 4 + i * 18, width: 12, height: 3, fill: c }), el("text", { x: pad.l + 28, y: pad.t + 9 + i * 18 }, t));
  });
  svg.append(legend);
  const guide = el("line", { class: "grid-line", y1: pad.t, y2: H - pad.b, visibility: "hidden" });
  const band = el("rect", { y: pad.t, height: H - pad.t - pad.b, fill: "rgba(36,86,199,.15)", visibility: "hidden" });
  svg.append(guide, band);
  box.replaceChildren(svg);
  const tip = el("div", { class: "tip" }); tip.hidden = true; box.append(tip);
  const toX = (ev) => { const r = svg.getBoundingClientRect(); return x0 + ((ev.clientX - r.left) * W / r.width - pad.l) / (W - pad.l - pad.r) * (x1 - x0); };
  let dragFrom = null;
  svg.addEventListener("mousemove", (ev) => {
    const x = Math.min(Math.max(toX(ev), x0), x1);
    if (dragFrom !== null) {
      band.setAttribute("x", Math.min(sx(dragFrom), sx(x))); band.setAttribute("width", Math.abs(sx(x) - sx(dragFrom))); band.setAttribute("visibility", "visible");
    }
    let i = 0; while (i < xs.length - 1 && xs[i + 1] <= x) i++;
    const j = Math.min(i + 1, xs.length - 1), t = xs[j] === xs[i] ? 0 : (x - xs[i]) / (xs[j] - xs[i]);
    guide.setAttribute("x1", sx(x)); guide.setAttribute("x2", sx(x)); guide.setAttribute("visibility", "visible");
    tip.replaceChildren(Math.round(x).toLocaleString("en") + " tokens", ...chart.series.map((s) => { const d = el("div", {}, s.quant + ": " + gb(s.bytes[i] + t * (s.bytes[j] - s.bytes[i]))); d.style.color = COLORS[s.quant]; return d; }), el("div", {}, "free: " + gb(chart.available_bytes)));
    tip.hidden = false;
    const r = box.getBoundingClientRect();
    tip.style.left = Math.min(ev.clientX - r.left + 12, r.width - 160) + "px"; tip.style.top = (ev.clientY - r.top + 12) + "px";
  });
  svg.addEventListener("mouseleave", () => { tip.hidden = true; guide.setAttribute("visibility", "hidden"); dragFrom = null; band.setAttribute("visibility", "hidden"); });
  svg.addEventListener("mousedown", (ev) => { dragFrom = toX(ev); ev.preventDefault(); });
  svg.addEventListener("mouseup", (ev) => {
    const from = dragFrom; dragFrom = null; band.setAttribute("visibility", "hidden");
    if (from === null) return;
    const to = toX(ev);
    if (Math.abs(sx(to) - sx(from)) > 8) drawChart(chart, [Math.max(Math.min(from, to), 0), Math.min(Math.max(from, to), xs[xs.length - 1])]);
  });
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const at = toX(ev), k = ev.deltaY < 0 ? 0.8 : 1.25, end = xs[xs.length - 1];
    const lo = Math.max(0, at - (at - x0) * k), hi = Math.min(end, at + (x1 - at) * k);
    if (hi - lo > 4) drawChart(chart, [lo, hi]);
  }, { passive: false });
  svg.addEventListener("dblclick", () => drawChart(chart, null));
}

// --- start -----------------------------------------------------------------------------------

async function start() {
  PRESETS.forEach((p, i) => $("#preset").append(el("option", { value: "hub:" + i }, p.label + " (shape)")));
  $("#preset").addEventListener("change", (e) => applyPreset(e.target.value));
  $("#source").addEventListener("change", showSource);
  $("#refresh").addEventListener("click", refreshGpus);
  form.addEventListener("submit", compute);
  const key = $("#api-key");
  key.value = sessionStorage.getItem("xllm-key") || "";
  key.addEventListener("change", () => { sessionStorage.setItem("xllm-key", key.value); refreshGpus(); loadStored(); });
  window.addEventListener("resize", () => { if (lastChart) drawChart(lastChart, null); });
  // the query string fills the form: ?model=...&ctx_size=...&run=1 computes at once
  const q = new URLSearchParams(location.search);
  if (q.has("hf")) $("#source").value = "hf";
  if (q.has("params")) $("#source").value = "manual";
  if (q.has("model")) $("#source").value = "model";
  for (const [k, v] of q) if (form.elements[k] && k !== "source") form.elements[k].value = v;
  showSource();
  await Promise.all([refreshGpus(), loadStored()]);
  if (q.get("run") === "1") await compute();
}

start();
