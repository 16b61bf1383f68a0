// The Attention view: query × key weights of one layer from POST /v1/inspect/attention, drawn on
// canvases: a thumbnail per head (and their average) to scan the layer, and one large heatmap with
// the tokens on both axes for the head picked. Decoder-only and encoder-only models have one kind
// of attention (self); an encoder-decoder has encoder self-, decoder self- and cross-attention.

import { postJSON } from "./api.js";
import { attentionColor, css, legend } from "./colors.js";
import { $, clearError, h, hideTip, reportError, showTipAt, sizeCanvas, tokenText } from "./dom.js";
import { on, selectedModel, state } from "./state.js";

const KIND_TITLES = { self: "self-attention", encoder: "encoder self-attention", decoder: "decoder self-attention (masked)", cross: "cross-attention (decoder reads encoder)" };
const MASKED = "#eceff3"; // a query cannot see this key (causal mask): not a weight

let response = null;
let fromGeneration = null; // {ids, promptLength} when the text is the last generation
let cursor = null; // [query, key] under the mouse or the keyboard

// --- the request ------------------------------------------------------------------------------

function encoderDecoder() {
  const model = selectedModel();
  return Boolean(model && model.family === "encoder-decoder");
}

async function load(layer = 0) {
  if (!state.model) return;
  clearError();
  const started = performance.now();
  const body = { model: state.model, layer };
  if (fromGeneration) body.token_ids = fromGeneration.ids;
  else body.text = $("attention-text").value;
  if (encoderDecoder()) body.target = $("attention-target").value;
  $("attention-run").disabled = true;
  $("attention-stats").textContent = "computing…";
  try {
    response = await postJSON("v1/inspect/attention", body);
  } catch (error) {
    $("attention-stats").textContent = "";
    reportError(error);
    return;
  } finally {
    $("attention-run").disabled = false;
  }
  fillSelectors();
  draw();
  const ms = performance.now() - started;
  $("attention-panel").dataset.ms = ms.toFixed(1);
  $("attention-panel").dataset.renders = String(Number($("attention-panel").dataset.renders || 0) + 1);
  const count = response.tokens.length + (response.target_tokens ? response.target_tokens.length : 0);
  $("attention-stats").textContent = `${count} tokens · ${response.layers} layers × ${response.heads} heads · ${Math.round(ms)} ms`;
}

function fillSelectors() {
  const layer = $("attention-layer");
  if (layer.options.length !== response.layers) {
    layer.replaceChildren(...Array.from({ length: response.layers }, (_, i) => h("option", { value: i }, `${i}`)));
  }
  layer.value = String(response.layer);
  const kinds = Object.keys(response.kinds);
  const kind = $("attention-kind");
  const previous = kind.value;
  kind.replaceChildren(...kinds.map((k) => h("option", { value: k }, KIND_TITLES[k] || k)));
  kind.value = kinds.includes(previous) ? previous : kinds[0];
  $("attention-kind-label").hidden = kinds.length < 2;
  const head = $("attention-head");
  const chosen = head.value;
  head.replaceChildren(h("option", { value: "average" }, "average of heads"), ...Array.from({ length: response.heads }, (_, i) => h("option", { value: i }, `head ${i}`)));
  head.value = [...head.options].some((o) => o.value === chosen) ? chosen : "average";
}

// --- what is shown ----------------------------------------------------------------------------

function current() {
  const kind = response.kinds[$("attention-kind").value];
  const list = (name) => (name === "target_tokens" ? response.target_tokens : response.tokens);
  const head = $("attention-head").value;
  const weights = head === "average" ? kind.average : kind.heads[Number(head)];
  const causal = response.family === "decoder" || $("attention-kind").value === "decoder";
  return { kind, weights, queries: list(kind.queries), keys: list(kind.keys), causal, head };
}

// The top of the colour scale. Under a causal mask the first query can only attend to itself
// (weight 1), so that row is left out: it would wash every other row out. Heavier cells saturate.
function maxOf(weights, causal) {
  let max = 0;
  for (const row of causal && weights.length > 1 ? weights.slice(1) : weights) for (const w of row) if (w > max) max = w;
  return max || 1;
}

// The weights as an image of one pixel per cell (to be scaled up without smoothing).
function image(weights, causal, max) {
  const n = weights.length;
  const m = weights[0].length;
  const canvas = document.createElement("canvas");
  canvas.width = m;
  canvas.height = n;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(m, n);
  const masked = [0xec, 0xef, 0xf3];
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      const rgb = causal && j > i + (m - n) ? masked : attentionColor(weights[i][j] / max);
      const at = (i * m + j) * 4;
      pixels.data[at] = rgb[0];
      pixels.data[at + 1] = rgb[1];
      pixels.data[at + 2] = rgb[2];
      pixels.data[at + 3] = 255;
    }
  }
  context.putImageData(pixels, 0, 0);
  return canvas;
}

function drawThumbnails() {
  const kind = response.kinds[$("attention-kind").value];
  const causal = current().causal;
  const maps = [["average", kind.average], ...kind.heads.map((w, i) => [String(i), w])];
  const selected = $("attention-head").value;
  // One row of thumbnails when the width allows: 56 to 84 px each.
  const room = Math.floor(($("attention-grid").clientWidth - 8 * (maps.length - 1)) / maps.length) - 10;
  const size = Math.max(56, Math.min(84, room));
  const nodes = maps.map(([name, weights]) => {
    const canvas = h("canvas", { class: "thumb", "aria-hidden": "true" });
    const context = sizeCanvas(canvas, size, size);
    context.imageSmoothingEnabled = false;
    context.drawImage(image(weights, causal, maxOf(weights, causal)), 0, 0, size, size);
    const button = h("button", { type: "button", class: `thumb-button${name === selected ? " selected" : ""}`, dataset: { head: name }, "aria-pressed": String(name === selected) }, canvas, h("span", {}, name === "average" ? "average" : `head ${name}`));
    button.addEventListener("click", () => {
      $("attention-head").value = name;
      draw();
    });
    return button;
  });
  $("attention-grid").replaceChildren(...nodes);
}

function labelText(token) {
  const text = token.token;
  return text.length > 14 ? `${text.slice(0, 13)}…` : text;
}

function visibleLabel(text) {
  return text.replace(/ /g, "·").replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

let layout = null; // where the big heatmap's cells are, for the mouse

function drawHeatmap() {
  const { weights, queries, keys, causal } = current();
  const n = queries.length;
  const m = keys.length;
  const canvas = $("attention-canvas");
  const probe = canvas.getContext("2d");
  probe.font = "12px ui-monospace, monospace";
  const labelWidth = (list) => Math.min(120, Math.max(...list.map((t) => probe.measureText(visibleLabel(labelText(t))).width)) + 10);
  const left = labelWidth(queries);
  const top = labelWidth(keys) * 0.75 + 8;
  // Cells as big as the width and most of the window's height allow, so that the whole map shows.
  const across = Math.max(200, $("attention-zoom").clientWidth - left - 16);
  const down = Math.max(200, window.innerHeight * 0.85 - top);
  const cell = Math.max(2, Math.min(28, Math.floor(across / m), Math.floor(down / n)));
  const width = left + cell * m + 8;
  const height = top + cell * n + 8;
  const context = sizeCanvas(canvas, width, height);
  const max = maxOf(weights, causal);
  context.imageSmoothingEnabled = false;
  context.drawImage(image(weights, causal, max), left, top, cell * m, cell * n);
  // Labels: all of them when a cell is tall enough for a line of text, else every k-th.
  const every = Math.max(1, Math.ceil(12 / cell));
  context.fillStyle = "#1f2933";
  context.font = "12px ui-monospace, monospace";
  context.textBaseline = "middle";
  context.textAlign = "right";
  for (let i = 0; i < n; i += every) context.fillText(visibleLabel(labelText(queries[i])), left - 6, top + cell * (i + 0.5));
  context.textAlign = "left";
  for (let j = 0; j < m; j += every) {
    context.save();
    context.translate(left + cell * (j + 0.5), top - 6);
    context.rotate(-Math.PI / 4);
    context.fillText(visibleLabel(labelText(keys[j])), 0, 0);
    context.restore();
  }
  if (fromGeneration && response.kinds.self && fromGeneration.promptLength < n) {
    // Where the prompt ends and the output begins.
    const at = fromGeneration.promptLength * cell;
    context.strokeStyle = "#c2410c";
    context.setLineDash([4, 3]);
    context.beginPath();
    context.moveTo(left, top + at);
    context.lineTo(left + cell * m, top + at);
    context.moveTo(left + at, top);
    context.lineTo(left + at, top + cell * n);
    context.stroke();
    context.setLineDash([]);
  }
  if (cursor) {
    context.strokeStyle = "#d97706";
    context.lineWidth = 2;
    context.strokeRect(left + cursor[1] * cell, top + cursor[0] * cell, cell, cell);
  }
  layout = { left, top, cell, n, m };
  const items = [legend("attention weight", (t) => css(attentionColor(t / max)), 0, max, "0", `${max < 0.995 ? "≥ " : ""}${max.toFixed(2)}`)];
  if (causal) items.push(h("span", { class: "legend-item" }, h("span", { class: "swatch", style: `background: ${MASKED}` }), " masked: a token cannot attend to later ones"));
  if (fromGeneration && response.kinds.self) items.push(h("span", { class: "legend-item" }, h("span", { class: "dash-sample" }), " prompt | output"));
  $("attention-legend").replaceChildren(...items);
}

function caption() {
  const { head, queries, keys } = current();
  const kind = $("attention-kind").value;
  const who = head === "average" ? `the average of ${response.heads} heads` : `head ${head}`;
  $("attention-caption").textContent = `${response.model} · layer ${response.layer} of ${response.layers} · ${KIND_TITLES[kind] || kind} · ${who} · ${queries.length} queries × ${keys.length} keys`;
}

function draw() {
  if (!response) return;
  $("attention-panel").hidden = false;
  caption();
  drawThumbnails();
  drawHeatmap();
}

function describeCell(i, j) {
  const { weights, queries, keys } = current();
  return [
    h("div", {}, `query ${i} `, h("span", { class: "tok" }, tokenText(queries[i].token)), ` → key ${j} `, h("span", { class: "tok" }, tokenText(keys[j].token))),
    h("div", {}, h("strong", {}, weights[i][j].toFixed(4)), " of the query's attention"),
  ];
}

function cellAt(event) {
  if (!layout) return null;
  const box = $("attention-canvas").getBoundingClientRect();
  const j = Math.floor((event.clientX - box.left - layout.left) / layout.cell);
  const i = Math.floor((event.clientY - box.top - layout.top) / layout.cell);
  return i >= 0 && j >= 0 && i < layout.n && j < layout.m ? [i, j] : null;
}

function wireCanvas() {
  const canvas = $("attention-canvas");
  canvas.addEventListener("mousemove", (event) => {
    const at = cellAt(event);
    if (!at) return hideTip();
    showTipAt(event.clientX, event.clientY, ...describeCell(...at));
  });
  canvas.addEventListener("mouseleave", hideTip);
  canvas.addEventListener("keydown", (event) => {
    const move = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] }[event.key];
    if (!move || !layout) return;
    event.preventDefault();
    const [i, j] = cursor || [0, 0];
    cursor = [Math.min(layout.n - 1, Math.max(0, i + move[0])), Math.min(layout.m - 1, Math.max(0, j + move[1]))];
    drawHeatmap();
    const box = canvas.getBoundingClientRect();
    showTipAt(box.left + layout.left + (cursor[1] + 1) * layout.cell, box.top + layout.top + (cursor[0] + 1) * layout.cell, ...describeCell(...cursor));
  });
  canvas.addEventListener("blur", () => {
    cursor = null;
    hideTip();
  });
}

// --- wiring -----------------------------------------------------------------------------------

function useLastGeneration() {
  const record = state.generation;
  if (!record) {
    reportError(new Error("Generate something first: its prompt and output will be shown here."));
    return;
  }
  if (record.model !== state.model) {
    // Another tokenizer: its ids mean nothing here, so the text goes in as text.
    const prompt = record.mode === "chat" ? JSON.parse(record.promptText).at(-1).content : record.promptText;
    fromGeneration = null;
    $("attention-text").value = `${prompt}${record.mode === "chat" ? "\n" : ""}${record.text}`;
  } else {
    const ids = [...record.promptIds, ...record.tokens.map((t) => t.id)];
    fromGeneration = { ids, promptLength: record.promptIds.length };
    $("attention-text").value = record.mode === "chat" ? `(the chat prompt and its reply: ${ids.length} tokens)` : record.promptText + record.text;
  }
  load(0);
}

export function setup() {
  $("attention-run").addEventListener("click", () => load(Number($("attention-layer").value) || 0));
  $("attention-last").addEventListener("click", useLastGeneration);
  $("attention-text").addEventListener("input", () => (fromGeneration = null));
  $("attention-target").addEventListener("input", () => (fromGeneration = null));
  $("attention-layer").addEventListener("change", (event) => load(Number(event.target.value)));
  $("attention-head").addEventListener("change", draw);
  $("attention-kind").addEventListener("change", draw);
  wireCanvas();
  window.addEventListener("resize", () => response && !$("view-attention").hidden && drawHeatmap());
  on("model", (model) => {
    const seq2seq = Boolean(model && model.family === "encoder-decoder");
    $("attention-target-label").hidden = !seq2seq;
    $("attention-last").hidden = seq2seq;
    $("attention-text-hint").textContent = seq2seq ? "what the encoder reads" : "the prompt and output of the last generation, or anything";
    response = null;
    fromGeneration = null;
    $("attention-panel").hidden = true;
    if (seq2seq && !$("attention-target").value) $("attention-target").value = $("attention-text").value;
  });
  on("view", (view) => {
    if (view === "attention" && response) drawHeatmap();
  });
}
